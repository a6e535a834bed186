"""The detectron2 install step: fixes apply or fail loudly, and the installed package carries them."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("install_detectron2", os.path.join(ROOT, "tools", "install_detectron2.py"))
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)


def test_fix_applies_and_counts(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("a = np.bool)\nb = np.bool)\n")
    fix = install.SourceFix("numpy_aliases", "why", "pkg/m.py", "np.bool)", "bool)")
    assert fix.apply(str(tmp_path)) == 2
    assert (tmp_path / "pkg" / "m.py").read_text() == "a = bool)\nb = bool)\n"


def test_fix_that_no_longer_applies_fails_loudly(tmp_path):
    (tmp_path / "m.py").write_text("nothing to see\n")
    fix = install.SourceFix("pillow_linear", "why", "m.py", "Image.LINEAR", "Image.BILINEAR")
    with pytest.raises(install.FixNoLongerApplies, match="pillow_linear"):
        fix.apply(str(tmp_path))
    with pytest.raises(install.FixNoLongerApplies, match="does not exist"):
        install.SourceFix("x", "why", "missing.py", "a", "b").apply(str(tmp_path))


def test_every_known_incompatibility_has_a_fix():
    names = {fix.name for fix in install.FIXES}
    assert names == {"lazy_C", "no_extension_build", "pillow_linear", "numpy_aliases", "pkg_resources",
                     "gloo_launch", "cpu_ddp"}


def _installed_detectron2_is_v06_sdist():
    import detectron2

    return detectron2.__version__ == "0.6" and not os.path.exists(
        os.path.join(os.path.dirname(detectron2.__file__), "_C.so")
    ) and importlib.util.find_spec("detectron2._C") is None


@pytest.mark.skipif(not _installed_detectron2_is_v06_sdist(), reason="detectron2 was not installed from the v0.6 sdist")
def test_installed_sources_carry_every_fix():
    import detectron2

    site = os.path.dirname(os.path.dirname(detectron2.__file__))
    for fix in install.FIXES:
        if not fix.path.startswith("detectron2/"):
            continue  # setup.py is not installed
        with open(os.path.join(site, fix.path)) as f:
            text = f.read()
        assert fix.new in text, f"{fix.name}: replacement missing in {fix.path}"
        if fix.old not in fix.new:
            assert fix.old not in text, f"{fix.name}: original text still in {fix.path}"


def test_verify_passes_on_installed_detectron2():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "install_detectron2.py"), "--verify"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, [line for line in proc.stdout.splitlines() if line.startswith("MISSING")] or proc.stderr[-2000:]


def _all_reduce_worker(out_dir):
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    value = torch.tensor([float(comm.get_rank() + 1)])
    dist.all_reduce(value)
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}"), "w") as f:
        f.write(f"{dist.get_backend()} {value.item()}")
    dist.destroy_process_group()  # a group left to interpreter exit can abort the worker (SIGABRT)


def test_launch_runs_two_processes_without_gpu(tmp_path):
    """gloo_launch: detectron2's launch() spawns CPU workers that can communicate."""
    import torch
    from detectron2.engine import launch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    launch(_all_reduce_worker, 2, dist_url="auto", args=(str(tmp_path),))
    for rank in range(2):
        assert (tmp_path / f"rank{rank}").read_text() == "gloo 3.0"


def test_verify_names_what_an_incomplete_detectron2_lacks(tmp_path):
    """A user's own detectron2 is kept; --verify tells them which checks it fails."""
    fake = tmp_path / "detectron2"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "0.0-fake"\n')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "install_detectron2.py"), "--verify"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0
    for name in ("lazy_C", "pillow_linear", "numpy_aliases", "pkg_resources", "gloo_launch_and_cpu_ddp"):
        assert f"MISSING  {name}" in proc.stdout, proc.stdout
    assert "5 check(s) missing" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--source", "upstream"], "needs --commit with a full 40-hex-digit commit id"),
    (["--source", "upstream", "--commit", "main"], "needs --commit with a full 40-hex-digit commit id"),
    (["--commit", "a" * 40], "--commit applies to --source upstream only"),
])
def test_upstream_source_only_at_a_pinned_commit(args, message):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "install_detectron2.py"), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_make_install_reruns_when_the_lock_changes():
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    stamp_rule = next(line for line in makefile.splitlines() if line.startswith("$(STAMP):"))
    assert "$(LOCK)" in stamp_rule


def test_the_lock_check_names_every_package_that_differs(tmp_path, capsys):
    """tools/check_lock.py (run by `make install`): a pin the environment matches passes, a wrong
    version and a missing package each fail with one line naming them."""
    import importlib.metadata

    check = _load_check_lock()
    pytest_version = importlib.metadata.version("pytest")
    lock = tmp_path / "constraints.txt"
    lock.write_text(f"# a comment\npytest=={pytest_version}\n")
    assert check.lock_differences(str(lock)) == {} and check.main([str(lock)]) == 0
    lock.write_text(f"pytest=={pytest_version}\npytest==0.0.1\nno-such-package-pgp==1.0\n")
    assert check.lock_differences(str(lock)) == {"pytest": ("0.0.1", pytest_version), "no-such-package-pgp": ("1.0", None)}
    assert check.main([str(lock)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "no-such-package-pgp 1.0 (installed: none)" in error and "pytest 0.0.1" in error
    assert check.main([str(tmp_path / "missing.txt")]) == 2


def _load_check_lock():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_lock", os.path.join(ROOT, "tools", "check_lock.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

#!/usr/bin/env python
"""Install detectron2 into the running Python environment, from packages only.

What it installs:

1. an importable detectron2 is kept as it is (a user who has one keeps theirs; ``--verify``
   tells them which of the checks below it fails);
2. by default, the PyPI sdist ``pb1-detectron2==0.6`` (upstream v0.6 Python sources), checked
   against its sha256, built as pure Python after applying :data:`FIXES`, each of which names
   one known incompatibility of v0.6 with today's torch / NumPy / Pillow / setuptools. A fix
   whose original text is no longer found fails the install loudly instead of silently
   producing a half-patched package;
3. only when asked (``--source upstream --commit SHA``): upstream's git source at that exact
   commit. It needs a C++ toolchain and network access to the git host, and gets the same
   verification, which tells whether that commit carries the fixes this project needs.

Verification (:data:`VERIFY_SCRIPT`, after every install and with ``--verify``) runs one named
behavioural check per fix, two CPU processes communicating through detectron2's ``launch()``
and a CPU ``create_ddp_model`` among them, and prints ``ok`` or ``MISSING`` for each.

Faster R-CNN needs none of detectron2's compiled ops (torchvision provides nms and roi_align),
so the pure-Python build trains and evaluates every model this project uses.

Usage::

    python tools/install_detectron2.py            # install (no-op when detectron2 imports)
    python tools/install_detectron2.py --verify   # only check the installed detectron2
    python tools/install_detectron2.py --source upstream --commit <40-hex sha>
"""
import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import List, Optional, Tuple

UPSTREAM_GIT = "git+https://github.com/facebookresearch/detectron2.git"
SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

_LAZY_C = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:  # pure-Python build: only rotated/deformable ops need _C\n"
    "    _C = None\n"
)


class FixNoLongerApplies(RuntimeError):
    """The text a fix replaces is not in the source: the sdist changed under us."""


@dataclasses.dataclass(frozen=True)
class SourceFix:
    """One named text substitution in the detectron2 sources.

    Attributes:
        name: short identifier printed by the installer.
        reason: the incompatibility it removes.
        path: file relative to the sdist root.
        old: exact text that must occur in the file (at least once).
        new: replacement text.
    """

    name: str
    reason: str
    path: str
    old: str
    new: str

    def apply(self, root: str) -> int:
        """Apply to the tree at ``root``; returns the number of replacements made."""
        file_path = os.path.join(root, self.path)
        if not os.path.isfile(file_path):
            raise FixNoLongerApplies(f"fix '{self.name}': {self.path} does not exist")
        with open(file_path, encoding="utf-8") as f:
            text = f.read()
        count = text.count(self.old)
        if count == 0:
            raise FixNoLongerApplies(
                f"fix '{self.name}': expected text not found in {self.path}: {self.old!r}"
            )
        with open(file_path, "w", encoding="utf-8") as f:
            f.write(text.replace(self.old, self.new))
        return count


def _numpy_alias_fixes() -> List[SourceFix]:
    """NumPy >= 1.24 removed np.bool / np.int / np.float / np.str (aliases of the builtins)."""
    uses = {
        "detectron2/evaluation/pascal_voc_evaluation.py": ["np.bool)"],
        "detectron2/data/build.py": ["dtype=np.int)", "dtype=np.int\n"],
        "detectron2/structures/masks.py": ["np.bool)"],
        "detectron2/utils/visualizer.py": ["np.bool)"],
        "detectron2/utils/video_visualizer.py": ["dtype=np.bool)"],
        "detectron2/evaluation/sem_seg_evaluation.py": ["dtype=np.int)", "np.float)"],
        "detectron2/data/datasets/pascal_voc.py": ["dtype=np.str)"],
    }
    fixes = []
    for path, olds in uses.items():
        for old in olds:
            new = old.replace("np.", "", 1)
            fixes.append(SourceFix("numpy_aliases", "np.bool/np.int/np.float/np.str removed", path, old, new))
    return fixes


FIXES: Tuple[SourceFix, ...] = (
    # No compiled extension: the four modules that import it at top level must still import.
    *(
        SourceFix("lazy_C", "no compiled extension in the sdist", path, "from detectron2 import _C\n", _LAZY_C)
        for path in (
            "detectron2/layers/deform_conv.py",
            "detectron2/layers/rotated_boxes.py",
            "detectron2/layers/roi_align_rotated.py",
            "detectron2/evaluation/fast_eval_api.py",
        )
    ),
    SourceFix(
        "no_extension_build",
        "the sdist lacks detectron2/layers/csrc; build pure Python",
        "setup.py",
        "ext_modules=get_extensions(),",
        "ext_modules=[],",
    ),
    SourceFix(
        "pillow_linear",
        "Pillow >= 10 removed Image.LINEAR (it was an alias of BILINEAR)",
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR",
        "interp=Image.BILINEAR",
    ),
    *_numpy_alias_fixes(),
    SourceFix(
        "pkg_resources",
        "setuptools >= 81 no longer ships pkg_resources",
        "detectron2/model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
    ),
    SourceFix(
        "pkg_resources",
        "setuptools >= 81 no longer ships pkg_resources",
        "detectron2/model_zoo/model_zoo.py",
        "import pkg_resources\n",
        "",
    ),
    SourceFix(
        "gloo_launch",
        "launch() hard-codes NCCL and asserts CUDA; use gloo without a GPU",
        "detectron2/engine/launch.py",
        '    assert torch.cuda.is_available(), "cuda is not available. Please check your installation."\n',
        '    backend = "NCCL" if torch.cuda.is_available() else "GLOO"\n',
    ),
    SourceFix(
        "gloo_launch",
        "launch() hard-codes NCCL and asserts CUDA; use gloo without a GPU",
        "detectron2/engine/launch.py",
        'backend="NCCL",',
        "backend=backend,",
    ),
    SourceFix(
        "gloo_launch",
        "launch() hard-codes NCCL and asserts CUDA; use gloo without a GPU",
        "detectron2/engine/launch.py",
        "    assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "    torch.cuda.set_device(local_rank)\n",
        '    if backend == "NCCL":\n'
        "        assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "        torch.cuda.set_device(local_rank)\n",
    ),
    SourceFix(
        "cpu_ddp",
        "create_ddp_model passes CUDA device_ids, which DDP rejects for a CPU model",
        "detectron2/engine/defaults.py",
        'if "device_ids" not in kwargs:',
        'if "device_ids" not in kwargs and next(model.parameters()).is_cuda:',
    ),
)

# Behavioural checks, run in the target interpreter after installing (and by --verify). Each one
# failed on the unpatched v0.6 sources with today's packages; each prints "ok NAME" or
# "MISSING NAME: why", and the script exits 1 if any is missing.
VERIFY_SCRIPT = r"""
import inspect, os, sys, tempfile


def check_lazy_C():
    import detectron2.layers, detectron2.evaluation  # noqa: F401  (modules that imported _C at top level)


def check_pillow_linear():
    import detectron2.data.transforms  # noqa: F401  (Image.LINEAR as a default argument)


def check_numpy_aliases():
    from detectron2.data import build as data_build
    data_build.print_instances_class_histogram([{"annotations": [{"category_id": 0}, {"category_id": 1}]}], ["a", "b"])
    from detectron2.evaluation import pascal_voc_evaluation, sem_seg_evaluation
    from detectron2.structures import masks
    from detectron2.utils import visualizer, video_visualizer
    from detectron2.data.datasets import pascal_voc
    for mod in (pascal_voc_evaluation, sem_seg_evaluation, data_build, masks, visualizer, video_visualizer, pascal_voc):
        src = inspect.getsource(mod)
        for alias in ("np.bool)", "np.int)", "np.float)", "np.str)", "dtype=np.int\n"):
            assert alias not in src, f"{alias!r} (removed from NumPy) in {mod.__name__}"


def check_pkg_resources():
    from detectron2 import model_zoo
    path = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    assert os.path.isfile(path), path


def _worker(out_dir):
    import torch
    import torch.distributed as dist
    from torch import nn
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.utils import comm
    value = torch.tensor([float(comm.get_rank() + 1)])
    dist.all_reduce(value)
    model = create_ddp_model(nn.Linear(2, 2), broadcast_buffers=False)  # cpu_ddp
    model(torch.ones(1, 2)).sum().backward()
    with open(os.path.join(out_dir, str(comm.get_rank())), "w") as f:
        f.write(f"{dist.get_backend()} {value.item()}")
    dist.destroy_process_group()  # a group left to interpreter exit can abort the worker (SIGABRT)


def check_gloo_launch_and_cpu_ddp():
    import torch
    from detectron2.engine import launch
    if torch.cuda.is_available():
        return  # the CPU path is what this checks
    for attempt in (1, 2):
        # "auto" finds a free port and releases it before the workers bind it: another process
        # may take it in between, so a failed launch is tried once more
        with tempfile.TemporaryDirectory() as out:
            try:
                launch(_worker, 2, dist_url="auto", args=(out,))
            except Exception:  # noqa: BLE001
                if attempt == 2:
                    raise
                continue
            results = sorted(open(os.path.join(out, name)).read() for name in os.listdir(out))
        assert results == ["gloo 3.0", "gloo 3.0"], results
        return


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")
    import detectron2
    missing = 0
    for name, check in [(n[len("check_"):], f) for n, f in list(globals().items()) if n.startswith("check_")]:
        try:
            check()
            print(f"ok       {name}", flush=True)
        except BaseException as e:  # noqa: BLE001 - report every check
            missing += 1
            lines = str(e).strip().splitlines()
            print(f"MISSING  {name}: {type(e).__name__}: {lines[0] if lines else ''}", flush=True)
    where = os.path.dirname(detectron2.__file__)
    print(f"detectron2 {detectron2.__version__} at {where}: " + ("verified" if not missing else f"{missing} check(s) missing"))
    sys.exit(1 if missing else 0)
"""


def _run(cmd: List[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def detectron2_importable(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import detectron2"], capture_output=True)
    return probe.returncode == 0


def installed_from_our_sdist(python: str) -> bool:
    """Whether the importable detectron2 is a build of ``pb1-detectron2`` (ours to upgrade)."""
    probe = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; m.version({SDIST_NAME!r})"], capture_output=True
    )
    return probe.returncode == 0


def verify(python: str) -> None:
    """Run :data:`VERIFY_SCRIPT` in ``python``; raises CalledProcessError when a check is missing."""
    print("+ verifying the installed detectron2", flush=True)
    with tempfile.TemporaryDirectory(prefix="d2_verify_") as tmp:
        script = os.path.join(tmp, "verify_detectron2.py")
        with open(script, "w") as f:
            f.write(VERIFY_SCRIPT)
        subprocess.run([python, script], check=True)


def download_sdist(python: str, dest: str) -> str:
    """Fetch the sdist through pip (honours the user's pip index/proxy); returns its path."""
    # --no-build-isolation: computing the sdist's metadata imports torch, present in this env.
    _run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
          "-d", dest, f"{SDIST_NAME}=={SDIST_VERSION}"])
    archives = [f for f in os.listdir(dest) if f.endswith(".tar.gz")]
    if len(archives) != 1:
        raise RuntimeError(f"expected one sdist archive in {dest}, found {archives}")
    path = os.path.join(dest, archives[0])
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{archives[0]}: sha256 {digest} differs from the verified {SDIST_SHA256}")
    return path


def apply_fixes(root: str, fixes=FIXES) -> None:
    """Apply every fix to the source tree at ``root``; raise FixNoLongerApplies on the first miss."""
    for fix in fixes:
        count = fix.apply(root)
        print(f"  fix {fix.name:<20} {fix.path} ({count}x): {fix.reason}")


def prepare_sdist_tree(archive: str, workdir: str) -> str:
    """Extract the sdist, apply the fixes and place model-zoo configs where setup.py globs them."""
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    (root,) = [os.path.join(workdir, d) for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d))]
    apply_fixes(root)
    # setup.py collects configs from a top-level configs/ (absent in this sdist) and would
    # otherwise delete the copy inside the package: give it the top-level folder it expects.
    zoo_configs = os.path.join(root, "detectron2", "model_zoo", "configs")
    if not os.path.isdir(zoo_configs):
        raise FixNoLongerApplies("model_zoo_configs: detectron2/model_zoo/configs missing from the sdist")
    shutil.copytree(zoo_configs, os.path.join(root, "configs"))
    return root


def install_from_sdist(python: str) -> None:
    with tempfile.TemporaryDirectory(prefix="d2_sdist_") as tmp:
        archive = download_sdist(python, os.path.join(tmp, "dl"))
        root = prepare_sdist_tree(archive, os.path.join(tmp, "src"))
        # --no-deps: v0.6 pins black==21.4b2 and wants future/pydot, none needed to train;
        # the project's setup.py lists the runtime dependencies.
        _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--force-reinstall", root])


def install_from_upstream(python: str, commit: str) -> None:
    """Upstream's source at exactly ``commit`` (40 hex digits: a branch or tag could move)."""
    _run([python, "-m", "pip", "install", "--no-build-isolation", f"{UPSTREAM_GIT}@{commit}"])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verify", action="store_true", help="only verify the installed detectron2")
    parser.add_argument("--python", default=sys.executable, help="interpreter to install into")
    parser.add_argument("--source", choices=["sdist", "upstream"], default="sdist",
                        help="sdist (default): the verified pb1-detectron2 0.6 with its fixes; upstream: the git "
                             "source at --commit")
    parser.add_argument("--commit", default="", help="upstream commit to install (40 hex digits), with --source upstream")
    args = parser.parse_args(argv)
    if args.source == "upstream" and not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        parser.error("--source upstream needs --commit with a full 40-hex-digit commit id (a branch or tag can move)")
    if args.commit and args.source != "upstream":
        parser.error("--commit applies to --source upstream only")

    if args.verify:
        verify(args.python)
        return 0
    if detectron2_importable(args.python) and args.source == "sdist":
        if not installed_from_our_sdist(args.python):
            print("detectron2 already importable: keeping it (run with --verify to see what it lacks)")
            return 0
        try:  # our own earlier build: keep it only if it carries today's fixes
            verify(args.python)
            return 0
        except subprocess.CalledProcessError:
            print("the installed pb1-detectron2 lacks a fix: rebuilding it", flush=True)
    if args.source == "upstream":
        install_from_upstream(args.python, args.commit)
    else:
        install_from_sdist(args.python)
    verify(args.python)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FixNoLongerApplies as e:
        print(f"error: {e}. The detectron2 sdist changed; update tools/install_detectron2.py.", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as e:
        print(f"error: command failed with exit code {e.returncode}: {' '.join(map(str, e.cmd))[:300]}",
              file=sys.stderr)
        sys.exit(e.returncode or 1)

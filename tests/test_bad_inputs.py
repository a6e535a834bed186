"""Bad input and hostile files against every tool: no code runs from a checkpoint or config, a
failing run leaves earlier runs byte-identical, concurrent runs are refused, and each bad input
ends with one ``error:`` line and exit code 2 (see docs/checks.md)."""
import fractions
import hashlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from pgp_det.checkpoint import PrunedCheckpointer, load_model
from pgp_det.config import load_config
from pgp_det.data import DatasetFormatError, check_dataset_available, generate_synthetic_dataset, register_coco_layout, validate_dataset
from pgp_det.engine.preflight import check_training_run
from pgp_det.errors import UserInputError
from pgp_det.utils.io import atomic_write
from pgp_det.utils.output_dir import claim_output_dir
from pgp_det.utils.safe_load import read_checkpoint_file
from test_synthetic_data import read_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
CONFIG = os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml")
QUICK = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "1", "DATALOADER.NUM_WORKERS", "0"]


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_tool(tool, *args, env=None):
    # third-party warnings are silenced so that stderr holds what the tool itself says
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(TOOLS, tool), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def assert_one_line_error(proc, message):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def tree_digest(directory):
    """{relative path: sha256} of every file under ``directory``."""
    return {path: hashlib.sha256(data).hexdigest() for path, data in read_tree(directory).items()}


@pytest.fixture(scope="module", autouse=True)
def synthetic_set():
    """The synthetic set under ROOT/datasets, where the tools (run from ROOT) look for it."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        check_dataset_available("synth_voc_test")
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def cfg():
    config = load_config(CONFIG)
    config.freeze()
    return config


@pytest.fixture(scope="module")
def files(tmp_path_factory, cfg):
    """Good and hostile weights files for the synthetic R18-FPN config, and a finished-looking run."""
    d = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model = build_model(cfg)
    state = model.state_dict()
    paths = {"dir": str(d)}
    PrunedCheckpointer(model, save_dir=str(d)).save("good", tag_last_checkpoint=False)
    paths["good"] = str(d / "good.pth")

    paths["marker"] = str(d / "payload_ran")
    torch.save({"model": state, "extra": _Payload(paths["marker"])}, d / "evil.pth")
    paths["evil_pth"] = str(d / "evil.pth")
    with open(d / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"w": _Payload(paths["marker"])}, "__author__": "x"}, f, protocol=2)
    paths["evil_pkl"] = str(d / "evil.pkl")

    torch.save({"model": state, "extra": fractions.Fraction(1, 3)}, d / "legacy.pth")  # an object, harmless
    paths["legacy"] = str(d / "legacy.pth")
    (d / "text.pth").write_text("these are not weights\n")
    paths["text_pth"] = str(d / "text.pth")
    with open(d / "list.pkl", "wb") as f:
        pickle.dump([1, 2, 3], f)
    paths["list_pkl"] = str(d / "list.pkl")
    (d / "garbage.pkl").write_bytes(b"\x80\x02}q\x00(X\x01")  # a truncated pickle
    paths["garbage_pkl"] = str(d / "garbage.pkl")
    # the first 1,000 bytes of a checkpoint named .pkl: the unpickler's message spans two lines
    (d / "trunc.pkl").write_bytes((d / "good.pth").read_bytes()[:1000])
    paths["trunc_pkl"] = str(d / "trunc.pkl")
    torch.save({"model": {"some.other.net.weight": torch.zeros(3, 3)}}, d / "other.pth")
    paths["other"] = str(d / "other.pth")

    # a finished-looking training run: the files a later run must leave alone
    run = d / "run"
    run.mkdir()
    PrunedCheckpointer(model, save_dir=str(run)).save("model_final")
    (run / "config.yaml").write_text(cfg.dump())
    (run / "metrics.json").write_text('{"iteration": 1, "total_loss": 1.0}\n')
    paths["run"] = str(run)
    return paths


# -- loading never executes code ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["evil_pth", "evil_pkl"])
def test_malicious_checkpoint_is_refused_by_the_loader(files, kind):
    with pytest.raises(UserInputError, match="was refused: it .*(posix|os).system"):
        read_checkpoint_file(files[kind])
    assert not os.path.exists(files["marker"])


@pytest.mark.parametrize(
    "tool, args",
    [
        ("train_net.py", ["--config-file", CONFIG, "--eval-only", "MODEL.WEIGHTS", "{w}", "OUTPUT_DIR", "{out}"]),
        ("train_net.py", ["--config-file", CONFIG, *QUICK, "MODEL.WEIGHTS", "{w}", "OUTPUT_DIR", "{out}"]),
        ("eval_map_fps.py", ["--model", "m={cfg}:{w}", "--skip-eval", "--dataset-images", "0", "--output", "{out}"]),
        ("export_model.py", ["--config-file", CONFIG, "--weights", "{w}", "--dataset", "synth_voc_test",
                             "--output", "{out}"]),
        ("prune_net.py", ["--config-file", CONFIG, "--ratio", "0.5", "--output", "{out}", "MODEL.WEIGHTS", "{w}"]),
        ("sweep.py", ["--config-file", CONFIG, "--oneshot", "--ratios", "0.5", "--output", "{out}",
                      "MODEL.WEIGHTS", "{w}"]),
        ("profile_latency.py", ["--config-file", CONFIG, "--weights", "{w}", "--input-size", "64x64",
                                "--output", "{out}/table.json"]),
    ],
    ids=["train_net-eval", "train_net-train", "eval_map_fps", "export_model", "prune_net", "sweep-oneshot",
         "profile_latency"],
)
@pytest.mark.parametrize("kind", ["evil_pth", "evil_pkl"])
def test_no_tool_runs_a_checkpoints_payload(files, tmp_path, tool, args, kind):
    out = tmp_path / "out"
    args = [a.format(w=files[kind], out=out, cfg=CONFIG) for a in args]
    proc = run_tool(tool, *args)
    assert not os.path.exists(files["marker"]), "the payload ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"checkpoint '{files[kind]}' was refused" in proc.stderr
    if tool != "sweep.py":  # sweep prints its own line after the tool's
        assert_one_line_error(proc, "was refused")
    assert not out.exists() or not tree_digest(out), "a refused run wrote files"


def test_trusted_legacy_checkpoint_needs_the_explicit_opt_in(files, cfg):
    with pytest.raises(UserInputError, match="--trust-weights"):
        load_model(cfg, files["legacy"])
    model = load_model(cfg, files["legacy"], trusted=True)
    reference = load_model(cfg, files["good"])
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_detectron2_and_caffe2_pickles_load_through_the_restricted_unpickler(files, cfg, tmp_path):
    reference = load_model(cfg, files["good"])
    arrays = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    zoo = tmp_path / "zoo.pkl"
    with open(zoo, "wb") as f:  # detectron2's model zoo layout, in the protocol of Python-2-era files
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    model = load_model(cfg, str(zoo))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    caffe2 = tmp_path / "caffe2.pkl"
    blobs = {"conv1_w": np.arange(6, dtype=np.float32).reshape(2, 3), "conv1_w_momentum": np.zeros((2, 3))}
    with open(caffe2, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=4)
    loaded = read_checkpoint_file(str(caffe2))
    assert loaded["__author__"] == "Caffe2" and list(loaded["model"]) == ["conv1_w"]
    assert np.array_equal(loaded["model"]["conv1_w"], blobs["conv1_w"])


@pytest.mark.parametrize(
    "kind, message",
    [("text_pth", "not a PyTorch checkpoint"), ("list_pkl", "holds a list, not a dict of weights"),
     ("garbage_pkl", "not a valid pickle"), ("trunc_pkl", "not a valid pickle")],
)
def test_unreadable_weights_are_one_line(files, tmp_path, kind, message):
    out = tmp_path / "out"
    proc = run_tool("train_net.py", "--config-file", CONFIG, *QUICK, "MODEL.WEIGHTS", files[kind], "OUTPUT_DIR", str(out))
    assert_one_line_error(proc, message)
    assert not out.exists()


def _pruned_model(cfg):
    """``cfg``'s model at random init with a few channels removed from three groups."""
    from pgp_det.pruning import derive_channel_groups, hard_prune

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    groups = derive_channel_groups(model)
    names = [name for name, group in groups.items() if group.prunable][:3]
    hard_prune(model, {name: [0, 2, 5] for name in names}, groups=groups)
    return model


def _save_model_zoo_pkl(path, state: dict, record) -> None:
    """A pickle in detectron2's model zoo layout (numpy weights, ``__author__``) with a record."""
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "someone",
                     "pgp_architecture": record}, f, protocol=4)


def test_pruned_model_in_the_model_zoo_pkl_layout_loads_like_a_pth(cfg, tmp_path):
    from pgp_det.checkpoint import architecture_record

    model = _pruned_model(cfg)
    record = architecture_record(model)
    path = tmp_path / "pruned.pkl"
    # numpy integers, as a record converted along with numpy weights may hold
    _save_model_zoo_pkl(path, model.state_dict(), {k: np.int64(v) for k, v in record.items()})
    loaded = load_model(cfg, str(path))
    assert architecture_record(loaded) == record
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_malformed_record_in_a_pkl_is_one_line(cfg, tmp_path):
    model = _pruned_model(cfg)
    path = tmp_path / "pruned.pkl"
    _save_model_zoo_pkl(path, model.state_dict(), {"backbone.fpn.out": "many"})
    with pytest.raises(UserInputError, match="malformed 'pgp_architecture' entry"):
        load_model(cfg, str(path))


def test_unreachable_target_is_refused_even_when_nothing_would_be_pruned(tmp_path):
    """A floor above every group's width: the pre-flight's "nothing will be pruned" warning must
    not skip the reachability check of the FLOPs target."""
    out = tmp_path / "out"
    proc = run_tool("train_net.py", "--config", "synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml", *QUICK,
                    "PRUNING.ROUNDING.MIN_CHANNELS", "10000", "OUTPUT_DIR", str(out))
    assert_one_line_error(proc, "is unreachable")
    assert not out.exists()


def test_a_message_on_several_lines_is_printed_as_one(capsys):
    from pgp_det.utils.cli import OneLineArgumentParser, run_tool as run_main

    def fails(args):
        raise UserInputError("cannot read checkpoint 'x.pkl': not a valid pickle (A load persistent id\n  but none)")

    assert run_main(OneLineArgumentParser(), [], fails) == 2
    assert capsys.readouterr().err == "error: cannot read checkpoint 'x.pkl': not a valid pickle (A load persistent id but none)\n"


def test_output_dir_that_cannot_be_created_is_one_line(tmp_path):
    """/proc takes no new folder, even from root (whose access check passes)."""
    out = "/proc/pgp_det_no_such_folder"
    proc = run_tool("train_net.py", "--config-file", CONFIG, *QUICK, "OUTPUT_DIR", out)
    assert_one_line_error(proc, f"OUTPUT_DIR '{out}'")
    assert not os.path.exists(out)


def test_checkpoint_matching_no_tensor_is_an_error(files, tmp_path, cfg):
    with pytest.raises(UserInputError, match="holds no tensor of this model"):
        load_model(cfg, files["other"], strict=False)
    proc = run_tool("prune_net.py", "--config-file", CONFIG, "--ratio", "0.5", "--output", str(tmp_path / "p"),
                    "MODEL.WEIGHTS", files["other"])
    assert_one_line_error(proc, "holds no tensor of this model")
    assert not (tmp_path / "p").exists()


def test_yaml_config_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "yaml_payload_ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f'_BASE_: "{CONFIG}"\nMODEL:\n  WEIGHTS: !!python/object/apply:os.system ["touch {marker}"]\n')
    proc = run_tool("train_net.py", "--config-file", str(config), "OUTPUT_DIR", str(tmp_path / "out"))
    assert_one_line_error(proc, "uses a YAML tag")
    assert not marker.exists()


# -- runs cannot harm each other ------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resume", *QUICK, "MODEL.ROI_HEADS.NUM_CLASSES", "3"],
         "MODEL.ROI_HEADS.NUM_CLASSES is 3 but dataset 'synth_voc_train' has 6"),
        (["--resume", *QUICK, "PRUNING.ENABLED", "True", "PRUNING.TARGET.CHANNELS.RATIO", "1.5"], "PRUNING.TARGET.CHANNELS.RATIO"),
        (["--resume", *QUICK, "MODEL.FPN.OUT_CHANNELS", "32"], "was saved from a different architecture"),
        (QUICK, "already holds a training run"),  # a valid run, but not --resume
    ],
    ids=["class-count", "bad-pruning-key", "other-architecture", "fresh-run-into-existing"],
)
def test_failing_run_leaves_an_earlier_run_byte_identical(files, extra, message):
    before = tree_digest(files["run"])
    proc = run_tool("train_net.py", "--config-file", CONFIG, *extra, "OUTPUT_DIR", files["run"])
    assert_one_line_error(proc, message)
    assert tree_digest(files["run"]) == before
    # the earlier run is still usable
    proc = run_tool("eval_map_fps.py", "--run-dir", files["run"], "--skip-eval", "--dataset-images", "0", "--runs", "1",
                    "--warmup", "0", "--input-size", "64x64", "--output", os.path.join(files["dir"], "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_second_run_into_a_folder_in_use_is_refused_at_once(tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen(
        [sys.executable, os.path.join(TOOLS, "train_net.py"), "--config-file", CONFIG, "SOLVER.MAX_ITER", "100000",
         "SOLVER.IMS_PER_BATCH", "1", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not (out / ".pgp_det.lock").exists():
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        # refused, not queued: run_tool's timeout would end a second run that waited for the first
        second = run_tool("train_net.py", "--config-file", CONFIG, "--resume", *QUICK, "OUTPUT_DIR", str(out))
        assert_one_line_error(second, f"OUTPUT_DIR '{out}' is in use by another run (pid {first.pid}")
    finally:
        first.kill()
        first.wait()


def test_temporary_file_of_a_killed_write_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a process killed in the middle of an atomic write leaves its temporary file behind
    script = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); from pgp_det.utils.io import atomic_write\n"
        "def write(tmp):\n    open(tmp, 'wb').write(b'half'); os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(os.path.join(sys.argv[2], 'model_final.pth'), write)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, ROOT, str(out)])
    assert proc.returncode == -signal.SIGKILL
    left = [name for name in os.listdir(out) if name.startswith(".model_final.pth")]
    assert len(left) == 1 and not (out / "model_final.pth").exists()
    with claim_output_dir(str(out)) as output:
        output.start_writing()
    assert os.listdir(out) == []


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("new")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(str(path), failing)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_generated_dataset_has_ordinary_permissions(tmp_path):
    root = tmp_path / "synthetic"
    old = os.umask(0o022)
    try:
        generate_synthetic_dataset(str(root), seed=3, num_train=2, num_test=1)
    finally:
        os.umask(old)
    assert root.stat().st_mode & 0o777 == 0o755
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o755, name
        for name in filenames:
            assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o644, name


# -- one line and exit 2 for each bad input -----------------------------------------------------


def test_resume_problems_are_one_line(files, tmp_path):
    out = tmp_path / "resume"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000999.pth")
    proc = run_tool("train_net.py", "--config-file", CONFIG, "--resume", *QUICK, "OUTPUT_DIR", str(out))
    assert_one_line_error(proc, "names 'model_0000999.pth', which does not exist")
    (out / "last_checkpoint").write_text("")
    proc = run_tool("train_net.py", "--config-file", CONFIG, "--resume", *QUICK, "OUTPUT_DIR", str(out))
    assert_one_line_error(proc, "last_checkpoint' is empty")
    os.remove(out / "last_checkpoint")
    proc = run_tool("train_net.py", "--config-file", CONFIG, "--resume", *QUICK, "MODEL.WEIGHTS", "missing.pth",
                    "OUTPUT_DIR", str(out))
    assert_one_line_error(proc, "MODEL.WEIGHTS file 'missing.pth' does not exist")
    assert os.listdir(out) == []


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    proc = run_tool("train_net.py", "--config-file", CONFIG, *QUICK, "OUTPUT_DIR", str(target))
    assert_one_line_error(proc, "is a file, not a folder")
    proc = run_tool("prune_net.py", "--config-file", CONFIG, "--ratio", "0.5", "--output", str(target / "sub"))
    assert_one_line_error(proc, "lies under the file")
    assert target.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_dir_that_is_not_writable_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    proc = run_tool("train_net.py", "--config-file", CONFIG, *QUICK, "OUTPUT_DIR", str(locked / "out"))
    assert_one_line_error(proc, "permission denied")


def test_yaml_syntax_error_is_one_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("MODEL:\n  WEIGHTS: [unclosed\n")
    proc = run_tool("train_net.py", "--config-file", str(config))
    assert_one_line_error(proc, "is not valid YAML")


def test_whole_number_for_a_float_key_names_the_fix(tmp_path):
    with pytest.raises(UserInputError, match=r"PRUNING\.TARGET\.LATENCY\.FPS holds a float: write 40\.0$"):
        load_config(CONFIG, ["PRUNING.TARGET.LATENCY.FPS", "40"])
    config = tmp_path / "lr.yaml"
    config.write_text(f'_BASE_: "{os.path.abspath(CONFIG)}"\nSOLVER:\n  BASE_LR: 1\n')
    with pytest.raises(UserInputError, match=r"SOLVER\.BASE_LR holds a float: write 1\.0$"):
        load_config(str(config))
    load_config(CONFIG, ["PRUNING.TARGET.LATENCY.FPS", "40.0"])  # the float itself is taken


def test_option_after_the_overrides_gets_a_hint(tmp_path):
    proc = run_tool("train_net.py", "--config-file", CONFIG, "SOLVER.MAX_ITER", "2", "--eval-only")
    assert_one_line_error(proc, "option --eval-only comes after the KEY VALUE config overrides")
    proc = run_tool("prune_net.py", "--config-file", CONFIG, "--ratio", "0.5", "MODEL.WEIGHTS", "", "--output", "x")
    assert_one_line_error(proc, "option --output comes after the KEY VALUE config overrides")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sample-image", "{notimage}"], "is not an image"),
        (["--sample-image", "{image}", "--input-size", "0x0"], "--input-size '0x0': height and width must each be >= 32"),
        (["--sample-image", "{image}", "--box-atol", "-1"], "--box-atol -1.0: a tolerance is a number >= 0"),
        (["--sample-image", "{image}", "--score-atol", "nan"], "--score-atol nan: a tolerance is a number >= 0"),
    ],
    ids=["not-an-image", "zero-size", "negative-tolerance", "nan-tolerance"],
)
def test_export_bad_inputs_are_one_line(files, tmp_path, args, message):
    (tmp_path / "not_an_image.jpg").write_text("plain text")
    image = os.path.join(ROOT, "datasets", "synthetic", "JPEGImages", "000000.jpg")
    args = [a.format(notimage=tmp_path / "not_an_image.jpg", image=image) for a in args]
    proc = run_tool("export_model.py", "--config-file", CONFIG, "--weights", files["good"], *args,
                    "--output", str(tmp_path / "export"))
    assert_one_line_error(proc, message)
    assert not (tmp_path / "export").exists()


def write_coco(tmp_path, mutate):
    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    src = os.path.join(ROOT, "datasets", "synthetic", "JPEGImages", "000000.jpg")
    for name in ("a.jpg", "b.jpg"):
        (images_dir / name).write_bytes(open(src, "rb").read())
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 256, "height": 256},
                   {"id": 2, "file_name": "b.jpg", "width": 256, "height": 256}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0, "area": 400},
                        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [30, 30, 20, 20], "iscrowd": 0, "area": 400}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    mutate(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path), str(images_dir)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["annotations"][1].update(id=1), "annotation id 1 is listed more than once"),
        (lambda d: d["images"][1].update(id=1), "image id 1 is listed more than once"),
        (lambda d: d["categories"][1].update(name="cat"), "category name 'cat' is listed more than once"),
    ],
    ids=["annotation-ids", "image-ids", "category-names"],
)
def test_coco_duplicates_are_refused(tmp_path, mutate, message):
    json_file, images = write_coco(tmp_path, mutate)
    name = f"dup_{tmp_path.name}"
    with pytest.raises(DatasetFormatError, match=message):
        register_coco_layout(name, json_file, images)
        validate_dataset(name)


def test_coco_duplicate_annotation_id_through_train_net(tmp_path):
    json_file, images = write_coco(tmp_path, lambda d: d["annotations"][1].update(id=1))
    proc = run_tool("train_net.py", "--config-file", CONFIG, "--register-coco", "mine", json_file, images, *QUICK,
                    "DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", "2",
                    "OUTPUT_DIR", str(tmp_path / "out"))
    assert_one_line_error(proc, "annotation id 1 is listed more than once")
    assert not (tmp_path / "out").exists()


def test_evaluating_on_a_dataset_with_another_class_count_is_refused(files, tmp_path):
    json_file, images = write_coco(tmp_path, lambda d: None)
    proc = run_tool("eval_map_fps.py", "--register-coco", "two_classes", json_file, images,
                    "--model", f"m={CONFIG}:{files['good']}", "--dataset", "two_classes", "--output", str(tmp_path / "r"))
    assert_one_line_error(proc, "MODEL.ROI_HEADS.NUM_CLASSES is 6 but dataset 'two_classes' has 2 classes")
    voc = os.path.join(ROOT, "datasets", "synthetic")
    proc = run_tool("eval_map_fps.py", "--register-voc", "voc_two", voc, "test", "circle,square",
                    "--model", f"m={CONFIG}:{files['good']}", "--dataset", "voc_two", "--output", str(tmp_path / "r"))
    assert_one_line_error(proc, "has 2 classes (circle, square)")
    assert not (tmp_path / "r").exists()


def test_min_channels_above_every_width_warns(cfg, caplog, tmp_path, files):
    warned = cfg.clone()
    warned.defrost()
    warned.PRUNING.ENABLED = True
    warned.PRUNING.ROUNDING.MIN_CHANNELS = 100000
    warned.OUTPUT_DIR = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="pgp_det"):
        check_training_run(warned, eval_only=False, resume=False)
    assert any("nothing will be pruned" in r.getMessage() for r in caplog.records)
    proc = run_tool("prune_net.py", "--config-file", CONFIG, "--ratio", "0.5", "--min-channels", "100000",
                    "--output", str(tmp_path / "p"), "MODEL.WEIGHTS", files["good"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: PRUNING.ROUNDING.MIN_CHANNELS (--min-channels) 100000" in proc.stderr


def test_sweep_checks_every_variant_before_the_first_training(tmp_path):
    out = tmp_path / "sweep"
    proc = run_tool("sweep.py", "--config-file", CONFIG, "--baseline", "--flops-reductions", "0.5",
                    "--variant", "ok=PRUNING.CRITERION.NAME l2", "--variant", "bad=PRUNING.SCHEDULE.NAME nonsense",
                    "--output", str(out))
    assert_one_line_error(proc, "run 'bad_flops0.5': PRUNING.SCHEDULE.NAME = 'nonsense' is invalid")
    assert not out.exists()


def test_argument_parser_errors_are_one_line():
    proc = run_tool("prune_net.py", "--config-file", CONFIG, "--ratio", "abc")
    assert_one_line_error(proc, "--ratio")


@pytest.mark.parametrize(
    "tool, args, message",
    [
        ("eval_map_fps.py", ["--runtime", "tensorrt"], "argument --runtime: invalid choice: 'tensorrt'"),
        ("eval_map_fps.py", ["--runtime", "onnxruntime_int8", "--calibration-dir", "{missing}"], "is not a folder"),
        ("eval_map_fps.py", ["--runtime", "onnxruntime_int8", "--calibration-dir", "{texts}"],
         "calibration image '{texts}/a.jpg' is not an image PIL can read"),
        ("eval_map_fps.py", ["--runtime", "onnxruntime", "--onnx", "m={notonnx}"], "is not an ONNX model"),
        ("eval_map_fps.py", ["--runtime", "onnxruntime", "--onnx", "other={notonnx}"], "--onnx names other, not a model's label"),
        ("eval_map_fps.py", ["--runtime", "onnxruntime", "onnxruntime"], "--runtime names a runtime twice"),
        ("eval_map_fps.py", ["--runtime", "pytorch_cudagraphs"],
         "--runtime pytorch_cudagraphs captures CUDA graphs: add --device cuda"),
        ("eval_map_fps.py", ["--runtime", "pytorch", "onnxruntime", "--batch-size", "8"],
         "--batch-size 8: the exported graphs of --runtime onnxruntime take one image"),
        ("eval_map_fps.py", ["--batch-size", "0"], "--batch-size 0: time at least 1 image per call"),
        ("export_model.py", ["--int8", "--format", "torchscript"], "--int8 quantizes the ONNX export: add onnx to --format"),
        ("export_model.py", ["--int8", "--calibration-dir", "{texts}"], "is not an image PIL can read"),
        ("export_model.py", ["--int8", "--calibration-images", "0"], "--calibration-images 0: calibrate on at least 1 image"),
    ],
    ids=["unknown-runtime", "no-calibration-folder", "calibration-file-not-an-image", "onnx-file-not-onnx",
         "onnx-for-unknown-label", "runtime-twice", "cudagraphs-on-cpu", "batch-in-exported-graph", "batch-zero", "int8-without-onnx", "export-calibration-not-image",
         "export-no-calibration-images"],
)
def test_runtime_and_int8_bad_inputs_are_one_line_and_write_nothing(files, tmp_path, tool, args, message):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.jpg").write_text("not a picture")
    (tmp_path / "model.onnx").write_text("not a graph")
    values = dict(missing=tmp_path / "missing", texts=texts, notonnx=tmp_path / "model.onnx")
    args = [a.format(**values) for a in args]
    image = os.path.join(ROOT, "datasets", "synthetic", "JPEGImages", "000000.jpg")
    if tool == "eval_map_fps.py":
        head = ["--model", f"m={CONFIG}:{files['good']}", "--skip-eval", "--dataset-images", "0"]
    else:
        head = ["--config-file", CONFIG, "--weights", files["good"], "--sample-image", image]
    proc = run_tool(tool, *head, *args, "--output", str(tmp_path / "out"))
    assert_one_line_error(proc, message.format(**values))
    assert not (tmp_path / "out").exists()

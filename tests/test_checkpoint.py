"""Checkpoints of hard-pruned detectors: a freshly built model is rebuilt to the saved
architecture (weights, optimizer momentum and scheduler follow), a checkpoint that does not fit
fails with one clear error, and a failed save never damages the previous checkpoint."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from pgp_det.checkpoint import ARCHITECTURE_KEY, PrunedCheckpointer, apply_architecture, architecture_record, load_model
from pgp_det.config import get_pgp_cfg
from pgp_det.errors import UserInputError
from pgp_det.pruning import derive_channel_groups, hard_prune
from test_pruning_groups import build_detector, detector_cfg
from test_surgery_equivalence import eval_outputs, make_image
from test_surgery_optimizer import sgd, training_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = "R18-FPN"
SYNTH_CONFIG = os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml")


def random_removals(model, seed, keep_at_least=1):
    """Random channels of every group (frozen ones included), keeping 1/4 to 3/4 of each."""
    generator = torch.Generator().manual_seed(seed)
    removals = {}
    for name, group in derive_channel_groups(model, allow_frozen=True).items():
        kept = max(keep_at_least, int(group.size * (0.25 + 0.5 * torch.rand(1, generator=generator).item())))
        removals[name] = torch.randperm(group.size, generator=generator)[: group.size - kept].tolist()
    return removals


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def assert_same_outputs(a, b):
    image = make_image(seed=4)
    out_a, out_b = eval_outputs(a, image), eval_outputs(b, image)
    assert len(out_a["scores"]) > 0
    for key in ("proposal_boxes", "boxes", "scores", "classes"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0, msg=key)


def momentum_by_position(optimizer):
    """Momentum buffers in param-group order (None where a parameter has no state)."""
    return [
        optimizer.state.get(p, {}).get("momentum_buffer") for group in optimizer.param_groups for p in group["params"]
    ]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """An R18-FPN trained one step, hard-pruned in every group, trained another step (momentum in
    the pruned shapes), and saved with its optimizer and LR scheduler as model_0001.pth."""
    model = build_detector(ARCH)
    optimizer = sgd(model)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.1)
    training_step(model, optimizer, seed=0)
    hard_prune(model, random_removals(model, seed=0), optimizer=optimizer, allow_frozen=True)
    training_step(model, optimizer, seed=1)
    scheduler.step()
    model.eval()
    directory = str(tmp_path_factory.mktemp("pruned"))
    PrunedCheckpointer(model, directory, optimizer=optimizer, scheduler=scheduler).save("model_0001", iteration=1)
    return model, optimizer, scheduler, directory


def test_record_is_saved_and_names_every_group(pruned):
    model, _, _, directory = pruned
    saved = torch.load(os.path.join(directory, "model_0001.pth"), map_location="cpu", weights_only=True)
    record = saved[ARCHITECTURE_KEY]
    assert record == architecture_record(model)
    dense = architecture_record(build_detector(ARCH))
    assert record.keys() == dense.keys()
    assert all(record[name] < dense[name] for name in record)  # every group was pruned
    with open(os.path.join(directory, "last_checkpoint")) as f:
        assert f.read() == "model_0001.pth"


def test_load_model_rebuilds_the_pruned_detector(pruned):
    model, _, _, directory = pruned
    cfg = detector_cfg(ARCH)
    reloaded = load_model(cfg, os.path.join(directory, "model_0001.pth"))
    assert not reloaded.training
    assert shapes(reloaded) == shapes(model)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert_same_outputs(model, reloaded)


def test_resume_restores_model_optimizer_and_scheduler(pruned):
    model, optimizer, scheduler, directory = pruned
    fresh = build_detector(ARCH, seed=5)  # other weights: everything must come from the file
    fresh_optimizer = sgd(fresh)
    fresh_scheduler = torch.optim.lr_scheduler.MultiStepLR(fresh_optimizer, milestones=[1], gamma=0.1)
    checkpointer = PrunedCheckpointer(fresh, directory, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    extra = checkpointer.resume_or_load("", resume=True)

    assert checkpointer.architecture_changed and extra["iteration"] == 1
    assert shapes(fresh) == shapes(model)
    assert_same_outputs(model, fresh.eval())
    owned = {id(p) for p in fresh.parameters()}
    assert all(id(p) in owned for group in fresh_optimizer.param_groups for p in group["params"])
    saved, restored = momentum_by_position(optimizer), momentum_by_position(fresh_optimizer)
    assert all(m is not None for m in saved)  # every trained parameter has momentum
    for a, b in zip(saved, restored):
        assert (a is None and b is None) or torch.equal(a, b)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 1
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]

    # the next step is the step the saved run would have taken
    original, original_optimizer = copy.deepcopy((model, optimizer))
    training_step(original, original_optimizer, seed=2)
    training_step(fresh, fresh_optimizer, seed=2)
    for (key, a), b in zip(original.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)


class _Trainer:
    """The part of detectron2's DefaultTrainer a checkpointer sees."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.iter = 0

    def state_dict(self):
        return {"iteration": self.iter, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.iter = state["iteration"]
        self.optimizer.load_state_dict(state["optimizer"])


def test_optimizer_of_a_trainer_checkpointable_follows_the_model(pruned, tmp_path):
    """detectron2's DefaultTrainer hands the checkpointer itself, not its optimizer."""
    model, optimizer, _, _ = pruned
    PrunedCheckpointer(model, str(tmp_path), trainer=_Trainer(optimizer)).save("model_final")
    fresh = build_detector(ARCH, seed=6)
    fresh_optimizer = sgd(fresh)
    checkpointer = PrunedCheckpointer(fresh, str(tmp_path), trainer=_Trainer(fresh_optimizer))
    checkpointer.resume_or_load("", resume=True)
    assert checkpointer.architecture_changed
    owned = {id(p) for p in fresh.parameters()}
    assert all(id(p) in owned for group in fresh_optimizer.param_groups for p in group["params"])
    for a, b in zip(momentum_by_position(optimizer), momentum_by_position(fresh_optimizer)):
        assert torch.equal(a, b)


def test_checkpoint_of_another_architecture_fails_clearly(pruned):
    model, _, _, directory = pruned
    path = os.path.join(directory, "model_0001.pth")
    fpn_inner = architecture_record(model)["backbone.fpn.inner"]  # the first group FPN_OUT_CHANNELS sizes
    assert fpn_inner > 8
    narrow = build_model(detector_cfg(ARCH, "MODEL.FPN.OUT_CHANNELS", 8))
    before = shapes(narrow)
    with pytest.raises(UserInputError, match=(
        f"checkpoint '{path}' was saved from a different architecture: group backbone.fpn.inner has {fpn_inner} "
        "channels in the checkpoint but 8 in the model built from the config; use the config the checkpoint"
    )):
        PrunedCheckpointer(narrow).load(path)
    assert shapes(narrow) == before  # nothing was pruned

    with pytest.raises(UserInputError, match="different architecture: it has channel group backbone.bottom_up.stem, which"):
        apply_architecture(build_model(detector_cfg(ARCH)), architecture_record(build_model(detector_cfg("R50-FPN"))))
    record = architecture_record(model)
    del record["roi_heads.box_head.fc2"]
    with pytest.raises(UserInputError, match="channel group roi_heads.box_head.fc2 of the model built from the config is not in"):
        apply_architecture(build_model(detector_cfg(ARCH)), record)


def test_pruned_checkpoint_without_record_fails_clearly(pruned, tmp_path):
    model, _, _, _ = pruned
    DetectionCheckpointer(model, str(tmp_path)).save("plain")  # detectron2's own: no record
    path = str(tmp_path / "plain.pth")
    first = next(k for k, v in build_model(detector_cfg(ARCH)).state_dict().items() if v.shape != model.state_dict()[k].shape)
    with pytest.raises(UserInputError, match=(
        rf"checkpoint '{path}' does not match the model of its config: \d+ tensors differ in shape \(first: "
        rf"{first}: checkpoint .*\); if it is a pruned model, it lacks the 'pgp_architecture' record"
    )):
        load_model(detector_cfg(ARCH), path)


def test_strict_loading_refuses_partial_checkpoints_and_training_loads_accept_them(pruned, tmp_path):
    model, _, _, _ = pruned
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("roi_heads.")}
    path = str(tmp_path / "partial.pth")
    torch.save({"model": state, ARCHITECTURE_KEY: architecture_record(model)}, path)
    with pytest.raises(UserInputError, match=r"model tensors are missing \(first: roi_heads\."):
        load_model(detector_cfg(ARCH), path)
    fresh = build_model(detector_cfg(ARCH))
    PrunedCheckpointer(fresh).load(path)  # e.g. a pruned backbone to train heads on
    assert shapes(fresh) == shapes(model)
    assert torch.equal(fresh.backbone.fpn_output2.weight, model.backbone.fpn_output2.weight)

    # fine-tuning to another class set: only the predictor's output rows differ
    other_classes = build_model(detector_cfg(ARCH, "MODEL.ROI_HEADS.NUM_CLASSES", 5))
    full = str(tmp_path / "full.pth")
    PrunedCheckpointer(model, str(tmp_path)).save("full")
    PrunedCheckpointer(other_classes).load(full)
    assert other_classes.roi_heads.box_predictor.cls_score.weight.shape[0] == 6
    assert torch.equal(other_classes.roi_heads.box_head.fc1.weight, model.roi_heads.box_head.fc1.weight)
    with pytest.raises(UserInputError, match="first: roi_heads.box_predictor"):
        load_model(detector_cfg(ARCH, "MODEL.ROI_HEADS.NUM_CLASSES", 5), full)


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("this object cannot be pickled")


def test_failed_save_keeps_the_previous_checkpoint(pruned, tmp_path):
    model, _, _, _ = pruned
    directory = str(tmp_path)
    checkpointer = PrunedCheckpointer(model, directory)
    checkpointer.save("model_0001")
    path = os.path.join(directory, "model_0001.pth")
    with open(path, "rb") as f:
        good = f.read()
    for name in ("model_0001", "model_0002"):  # overwrite an existing file, write a new one
        with pytest.raises(RuntimeError, match="cannot be pickled"):
            checkpointer.save(name, extra=_Unpicklable())  # torch.save fails after opening its file
    with open(path, "rb") as f:
        assert f.read() == good
    assert sorted(os.listdir(directory)) == ["last_checkpoint", "model_0001.pth"]  # no temporary files
    with open(os.path.join(directory, "last_checkpoint")) as f:
        assert f.read() == "model_0001.pth"
    assert shapes(load_model(detector_cfg(ARCH), path)) == shapes(model)


def synth_cfg(*overrides):
    cfg = get_pgp_cfg()
    cfg.merge_from_file(SYNTH_CONFIG)
    cfg.merge_from_list(list(overrides))
    return cfg


def test_train_net_eval_only_evaluates_a_pruned_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(synth_cfg())
    hard_prune(model, random_removals(model, seed=1, keep_at_least=8), allow_frozen=True)
    PrunedCheckpointer(model, str(tmp_path)).save("pruned", tag_last_checkpoint=False)
    small = ["MODEL.RPN.POST_NMS_TOPK_TEST", "100", "TEST.DETECTIONS_PER_IMAGE", "50"]

    def run(*extra):
        out = tmp_path / f"eval{len(extra)}"
        command = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config", "synthetic/faster_rcnn_R_18_FPN_synth.yaml",
                   "--eval-only", "MODEL.WEIGHTS", str(tmp_path / "pruned.pth"), *small, *extra, "OUTPUT_DIR", str(out)]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT), out

    proc, out = run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.json").is_file()
    assert "AP50" in (out / "results.json").read_text()

    proc, out = run("MODEL.FPN.OUT_CHANNELS", "8")  # not the config the checkpoint was trained with
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different architecture: group backbone.fpn" in errors[0], proc.stderr[-2000:]
    assert not (out / "results.json").exists()

"""The PGP hook inside detectron2 training: targets reached, masks, resume after a kill, two
processes deciding alike, and PRUNING settings checked at start-up."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pgp_det.config import get_pgp_cfg
from pgp_det.pruning.hook import resolve_pruning_iterations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
CONFIG = ["--config", "synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml"]
# tiny schedule: steps after 4, 8, 12 and 15 iterations; 24 iterations in all; no final evaluation
TINY = [
    "SOLVER.MAX_ITER", "24", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "(20,)",
    "SOLVER.CHECKPOINT_PERIOD", "8", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(160,)",
    "INPUT.MAX_SIZE_TRAIN", "240", "DATASETS.TEST", "()",
    "PRUNING.START", "0", "PRUNING.INTERVAL", "4", "PRUNING.END", "15", "PRUNING.COST_INPUT_SIZE", "(256, 384)",
]


def train(out, *extra, num_gpus=1, resume=False, wait=True):
    flags = ["--resume"] if resume else []
    command = [sys.executable, TRAIN_NET, *CONFIG, *flags, "--num-gpus", str(num_gpus), *TINY, *extra,
               "OUTPUT_DIR", str(out)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def checkpoint_architecture(path):
    return torch.load(path, map_location="cpu", weights_only=False)["pgp_architecture"]


def pruning_log(out):
    with open(os.path.join(out, "pruning_log.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pgp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pgp")
    train(out)
    return out


def test_hook_reaches_flops_target_and_keeps_training(pgp_run):
    from pgp_det.benchmark.flops import count_flops
    from pgp_det.checkpoint import load_model

    log = pruning_log(pgp_run)
    assert [s["iteration"] for s in log["steps"]] == [4, 8, 12, 15]
    with open(os.path.join(pgp_run, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any("pruning/gflops" in r for r in records)

    cfg = get_pgp_cfg()
    cfg.merge_from_file(os.path.join(pgp_run, "config.yaml"))
    pruned = load_model(cfg, os.path.join(pgp_run, "model_final.pth"))
    from detectron2.modeling import build_model

    dense = build_model(cfg).eval()
    pruned_gflops = count_flops(pruned, 256, 384)["gflops"]
    reduction = 1 - pruned_gflops / count_flops(dense, 256, 384)["gflops"]
    assert reduction >= 0.5 - 0.01, reduction  # the target, measured by fvcore on the real model
    assert log["steps"][-1]["gflops"] == pytest.approx(pruned_gflops, rel=0.01)


def test_resume_after_kill_ends_with_the_same_architecture(pgp_run, tmp_path):
    proc = train(tmp_path, wait=False)
    last = tmp_path / "last_checkpoint"
    deadline = time.time() + 300
    # kill -9 once the mid-schedule checkpoint (after 8 iterations, two of four steps done) is there
    while time.time() < deadline and not (last.exists() and "model_0000007" in last.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "model_final.pth").exists()
    state = torch.load(tmp_path / "model_0000007.pth", map_location="cpu", weights_only=False)
    assert state["trainer"]["hooks"]["PGPHook"]["steps_done"] == 2

    train(tmp_path, resume=True)
    resumed = checkpoint_architecture(tmp_path / "model_final.pth")
    assert resumed == checkpoint_architecture(pgp_run / "model_final.pth")
    assert [s["step"] for s in pruning_log(tmp_path)["steps"]] == [1, 2, 3, 4]


def test_two_processes_take_identical_decisions(tmp_path):
    train(tmp_path, "SOLVER.MAX_ITER", "12", "PRUNING.END", "7", num_gpus=2)
    steps = pruning_log(tmp_path)["steps"]
    assert len(steps) == 2
    for step in steps:
        assert len(step["rank_digests"]) == 2 and len(set(step["rank_digests"])) == 1


def test_zeroed_channels_stay_zero_only_when_masked():
    from detectron2.engine import HookBase

    from pgp_det.data import register_custom_datasets
    from pgp_det.engine import Trainer
    from pgp_det.pruning.hook import PGPHook

    class Watch(HookBase):
        """After each step: the L1 mass still left in the channels zeroed by the first step."""

        def __init__(self):
            self.mass = {}

        def after_step(self):
            pgp = next(h for h in self.trainer._hooks if isinstance(h, PGPHook))
            if not pgp.zeroed or pgp.steps_done != 1:
                return
            model = pgp.model
            total = 0.0
            for name, channels in pgp.zeroed.items():
                for piece in pgp.pruned_groups[name].producers:
                    if piece.tensor == "weight" and piece.get(model).dim() > 1:
                        total += piece.get(model).index_select(piece.dim, torch.tensor(channels)).abs().sum().item()
            self.mass[self.trainer.iter] = total

    def run(keep_zeroed, out):
        cfg = get_pgp_cfg()
        cfg.merge_from_file(os.path.join(ROOT, "configs", "synthetic", "pgp_faster_rcnn_R_18_FPN_synth.yaml"))
        cfg.merge_from_list(TINY + ["SOLVER.MAX_ITER", "8", "PRUNING.END", "7", "PRUNING.REMOVE_RATIO", "0.0",
                                    "PRUNING.KEEP_ZEROED", str(keep_zeroed), "OUTPUT_DIR", str(out)])
        register_custom_datasets(cfg)
        trainer = Trainer(cfg)
        watch = Watch()
        trainer.register_hooks([watch])
        trainer.resume_or_load(resume=False)
        trainer.train()
        return watch.mass

    masked = run(True, "/tmp/pgp_det_test_masked")
    free = run(False, "/tmp/pgp_det_test_free")
    # first step after 4 iterations (trainer.iter 3), second after 7
    assert sorted(masked) == [3, 4, 5] and all(v == 0.0 for v in masked.values())
    assert free[3] == 0.0 and free[5] > 0.0  # zeroed at the step, then training revives them
    # soft-only training (REMOVE_RATIO 0): the log tells how many of step 1's zeroed channels regrew
    free_steps = pruning_log("/tmp/pgp_det_test_free")["steps"]
    masked_steps = pruning_log("/tmp/pgp_det_test_masked")["steps"]
    assert free_steps[0]["zeroed"] > 0 and free_steps[1]["previously_zeroed"] == free_steps[0]["zeroed"]
    assert 0 < free_steps[1]["regrown"] <= free_steps[1]["previously_zeroed"]
    assert sum(free_steps[1]["regrown_per_group"].values()) == free_steps[1]["regrown"]
    assert masked_steps[1]["previously_zeroed"] > 0 and masked_steps[1]["regrown"] == 0


@pytest.mark.parametrize(
    "override, message",
    [
        (["PRUNING.RATIO", "1.0"], "PRUNING.RATIO = 1.0 is invalid"),
        (["PRUNING.SCOPES", "('backbone', 'neck')"], "PRUNING.SCOPES = 'neck' is invalid"),
        (["PRUNING.CRITERION", "magic"], "PRUNING.CRITERION = 'magic' is invalid: known: "),
        (["PRUNING.SCHEDULE", "steps"], "PRUNING.SCHEDULE = 'steps' is invalid"),
        (["PRUNING.END", "5", "PRUNING.START", "10"], "PRUNING.END = 5 is invalid"),
    ],
)
def test_bad_pruning_settings_fail_at_start_up(tmp_path, override, message):
    proc = subprocess.run([sys.executable, TRAIN_NET, *CONFIG, *override, "OUTPUT_DIR", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.listdir(tmp_path)


def test_epochs_convert_to_iterations():
    cfg = get_pgp_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER", "1000", "PRUNING.UNIT", "epoch", "PRUNING.START", "1",
                         "PRUNING.INTERVAL", "2", "PRUNING.END", "7"])
    assert resolve_pruning_iterations(cfg, iters_per_epoch=100) == [300, 500, 700]
    cfg.merge_from_list(["PRUNING.UNIT", "iter", "PRUNING.START", "0", "PRUNING.INTERVAL", "-1", "PRUNING.END", "-1"])
    assert resolve_pruning_iterations(cfg) == list(range(75, 750, 75)) + [750]

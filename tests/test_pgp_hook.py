"""The PGP hook inside detectron2 training: targets reached, masks, resume after a kill, two
processes deciding alike, and PRUNING settings checked at start-up."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from pgp_det.config import get_pgp_cfg
from pgp_det.pruning.schedules import resolve_pruning_iterations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
CONFIG = ["--config", "synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml"]
# tiny schedule: steps after 4, 8, 12 and 15 iterations; 24 iterations in all; no final evaluation
TINY = [
    "SOLVER.MAX_ITER", "24", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "(20,)",
    "SOLVER.CHECKPOINT_PERIOD", "8", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(160,)",
    "INPUT.MAX_SIZE_TRAIN", "240", "DATASETS.TEST", "()",
    "PRUNING.SCHEDULE.START", "0", "PRUNING.SCHEDULE.INTERVAL", "4", "PRUNING.SCHEDULE.END", "15", "PRUNING.TARGET.FLOPS.INPUT_SIZE", "(256, 384)",
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
    return torch.load(path, map_location="cpu", weights_only=True)["pgp_architecture"]


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
    # REMOVE_RATIO 0.5 of every group's weak set is removed, up to whole channels; all at the last step
    for entry in log["steps"]:
        last = entry["step"] == entry["of"]
        assert entry["remove_ratio"] == (1.0 if last else 0.5)
        assert entry["removed_zeroed_per_group"], entry
        for name, (removed, zeroed) in entry["removed_zeroed_per_group"].items():
            assert abs(removed - entry["remove_ratio"] * (removed + zeroed)) <= 0.5, (entry["step"], name)
        assert entry["removed_share"] == pytest.approx(entry["removed"] / (entry["removed"] + entry["zeroed"]))
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


# runs tools/train_net.py, killing the process (SIGKILL) right after the checkpoint of iteration
# KILL_AT is written: a deterministic kill point, whatever the machine's speed
KILLED_RUN = """
import os, runpy, signal, sys
from detectron2.engine import hooks
kill_at = int(sys.argv[1])
save = hooks.PeriodicCheckpointer.after_step
def after_step(self):
    save(self)
    if self.trainer.iter == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
hooks.PeriodicCheckpointer.after_step = after_step
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_resume_after_kill_ends_with_the_same_architecture(pgp_run, tmp_path):
    # killed after the mid-schedule checkpoint (after 8 iterations, two of four steps done)
    command = [sys.executable, "-c", KILLED_RUN, "7", TRAIN_NET, *CONFIG, *TINY, "OUTPUT_DIR", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (tmp_path / "model_final.pth").exists()
    assert "model_0000007" in (tmp_path / "last_checkpoint").read_text()
    state = torch.load(tmp_path / "model_0000007.pth", map_location="cpu", weights_only=False)
    assert state["trainer"]["hooks"]["PGPHook"]["steps_done"] == 2

    train(tmp_path, resume=True)
    resumed = checkpoint_architecture(tmp_path / "model_final.pth")
    assert resumed == checkpoint_architecture(pgp_run / "model_final.pth")
    assert [s["step"] for s in pruning_log(tmp_path)["steps"]] == [1, 2, 3, 4]


class _FixedBatches:
    """The same batch at the same iteration, whatever run and wherever it resumed: batch ``i``
    of ``batches`` at iteration ``i`` (``start`` is the first iteration this run trains)."""

    def __init__(self, batches):
        self.batches, self.start = batches, 0

    def __iter__(self):
        for iteration in range(self.start, 10 ** 6):
            yield self.batches[iteration % len(self.batches)]


class _Stop(Exception):
    pass


def _deterministic_run(cfg, batches, resume=False, stop_after=None):
    """Train ``cfg`` on ``batches`` with the RNG seeded by the iteration, resuming from the last
    checkpoint when ``resume``; stop (an exception, after the checkpointer ran) once iteration
    ``stop_after`` is done. Returns the trainer."""
    from detectron2.engine import HookBase

    from pgp_det.engine import Trainer

    loader = _FixedBatches(batches)

    class Deterministic(Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return loader

    class SeedAndStop(HookBase):
        def before_step(self):
            torch.manual_seed(self.trainer.iter)  # proposal and ROI sampling

        def after_step(self):
            if stop_after is not None and self.trainer.iter + 1 == stop_after:
                raise _Stop()

    torch.manual_seed(cfg.SEED)  # the initial weights (a resumed run loads its own)
    trainer = Deterministic(cfg)
    trainer.register_hooks([SeedAndStop()])  # last: after the periodic checkpointer
    trainer.resume_or_load(resume=resume)
    loader.start = trainer.start_iter
    try:
        trainer.train()
    except _Stop:
        pass
    return trainer


def _assert_resume_decides_as_the_whole_run(config, batches, tmp_path):
    """Train ``config(tmp_path / "whole")`` on ``batches`` uninterrupted, and
    ``config(tmp_path / "resumed")`` stopped after the checkpoint of iteration 10 then resumed:
    every pruning step removes and zeroes the same indices (by their digest) and the final
    weights agree. Returns the uninterrupted run's trainer."""
    whole = _deterministic_run(config(tmp_path / "whole"), batches)
    _deterministic_run(config(tmp_path / "resumed"), batches, stop_after=10)
    assert (tmp_path / "resumed" / "model_0000009.pth").exists()
    assert not (tmp_path / "resumed" / "model_final.pth").exists()
    resumed = _deterministic_run(config(tmp_path / "resumed"), batches, resume=True)
    assert resumed.start_iter == 10

    steps = {run: pruning_log(tmp_path / run)["steps"] for run in ("whole", "resumed")}
    assert [s["iteration"] for s in steps["resumed"]] == [4, 8, 12, 15]
    for a, b in zip(steps["whole"], steps["resumed"]):
        assert a["rank_digests"] == b["rank_digests"], a["step"]
    final = {name: p.detach() for name, p in whole.model.named_parameters()}
    for name, p in resumed.model.named_parameters():
        assert p.shape == final[name].shape, name
        assert (p.detach() - final[name]).abs().max() <= 1e-5, name
    return whole


@pytest.mark.parametrize("allocation", ["knapsack", "global"])
def test_resume_mid_interval_ends_with_the_same_kept_channels(tmp_path, allocation):
    """A score-dependent allocation with the pgp criterion (knapsack: also its loss-change values):
    a run stopped right after the checkpoint of iteration 10, between the steps of 8 and 12, and
    resumed, takes every step's decision as the uninterrupted run does (the same removed and
    zeroed indices, by their digest) and ends with the same weights. It holds only if the
    criterion's and the values' sums of iterations 9 and 10 travel in the checkpoint."""
    from detectron2.data import build_detection_train_loader

    from pgp_det.data import register_custom_datasets

    def config(out):
        cfg = get_pgp_cfg()
        cfg.merge_from_file(os.path.join(ROOT, "configs", "synthetic", "pgp_faster_rcnn_R_18_FPN_synth.yaml"))
        cfg.merge_from_list(TINY + ["SOLVER.MAX_ITER", "16", "SOLVER.CHECKPOINT_PERIOD", "10",
                                    "PRUNING.ALLOCATION.NAME", allocation, "PRUNING.CRITERION.NAME", "pgp",
                                    "OUTPUT_DIR", str(out)])
        register_custom_datasets(cfg)
        return cfg

    cfg = config(tmp_path / "whole")
    stream = iter(build_detection_train_loader(cfg))
    batches = [next(stream) for _ in range(16)]
    _assert_resume_decides_as_the_whole_run(config, batches, tmp_path)


def test_resume_while_adapting_ends_with_the_same_kept_channels(tmp_path):
    """PGP during domain adaptation (source and unlabelled target images in every batch, the
    adaptation losses' gradients in the criterion): a run stopped right after the checkpoint of
    iteration 10 and resumed takes every step's decision as the uninterrupted run does (the same
    removed and zeroed indices) and ends with the same weights, domain classifiers included."""
    from pgp_det.data import register_custom_datasets
    from pgp_det.data.domains import build_domain_adaptive_train_loader

    def config(out):
        cfg = get_pgp_cfg()
        cfg.merge_from_file(os.path.join(ROOT, "configs", "synthetic", "da_pgp_faster_rcnn_R_18_FPN_synth_fog.yaml"))
        cfg.merge_from_list(TINY + ["SOLVER.MAX_ITER", "16", "SOLVER.CHECKPOINT_PERIOD", "10",
                                    "PRUNING.SCOPES", "('backbone', 'fpn', 'rpn', 'roi_heads')",
                                    "PRUNING.ALLOCATION.NAME", "global", "DOMAIN_ADAPTATION.TARGET_IMS_PER_BATCH", "2",
                                    "OUTPUT_DIR", str(out)])
        register_custom_datasets(cfg)
        return cfg

    cfg = config(tmp_path / "whole")
    stream = iter(build_domain_adaptive_train_loader(cfg))
    batches = [next(stream) for _ in range(16)]
    assert sorted(x["domain"] for x in batches[0]) == [0, 0, 1, 1]
    whole = _assert_resume_decides_as_the_whole_run(config, batches, tmp_path)
    assert any(name.startswith("domain_classifiers.") for name, _ in whole.model.named_parameters())


def test_an_extra_pass_takes_no_batch_from_training(tmp_path):
    """pgp_pass's extra pass (3 batches before each of 2 steps) reads a loader of its own, built
    as the trainer builds its own: training still gets one batch of its stream per iteration, in
    order, and the extra pass 6."""
    from detectron2.data import build_detection_train_loader

    from pgp_det.data import register_custom_datasets
    from pgp_det.engine import Trainer

    cfg = get_pgp_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "synthetic", "pgp_faster_rcnn_R_18_FPN_synth.yaml"))
    cfg.merge_from_list(TINY + ["SOLVER.MAX_ITER", "10", "PRUNING.SCHEDULE.END", "8", "PRUNING.CRITERION.NAME", "pgp_pass",
                                "PRUNING.CRITERION.EXTRA_PASS_BATCHES", "3", "OUTPUT_DIR", str(tmp_path)])
    register_custom_datasets(cfg)
    stream = iter(build_detection_train_loader(cfg))
    batches = [next(stream) for _ in range(4)]
    drawn = []  # (loader number, batch number) in the order batches were taken

    class Counted:
        def __init__(self, number):
            self.number = number

        def __iter__(self):
            for index in range(10 ** 6):
                drawn.append((self.number, index))
                yield batches[index % len(batches)]

    class Counting(Trainer):
        loaders = 0

        @classmethod
        def build_train_loader(cls, cfg):
            cls.loaders += 1
            return Counted(cls.loaders - 1)

    trainer = Counting(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert [index for number, index in drawn if number == 0] == list(range(10))  # one per iteration
    assert [index for number, index in drawn if number == 1] == list(range(6))  # 3 per step, 2 steps
    assert Counting.loaders == 2


_TWO_RANKS = """
import os, sys, torch
sys.path.insert(0, {root!r})
from detectron2.engine import launch
from pgp_det.checkpoint import architecture_record
from pgp_det.config import load_config
from pgp_det.data import register_custom_datasets
from pgp_det.engine import Trainer
from pgp_det.utils.modules import unwrap_model
from detectron2.utils import comm

def main(cfg):
    register_custom_datasets(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = unwrap_model(trainer.model)
    # parameters only: BN running statistics are per rank (detectron2 does not broadcast buffers)
    params = {{name: p.detach() for name, p in model.named_parameters()}}
    torch.save({{"params": params, "architecture": architecture_record(model)}},
               os.path.join(cfg.OUTPUT_DIR, "rank%d.pth" % comm.get_rank()))
    comm.synchronize()
    torch.distributed.destroy_process_group()

if __name__ == "__main__":
    cfg = load_config(os.path.join({root!r}, "configs", "synthetic", "pgp_faster_rcnn_R_18_FPN_synth.yaml"), {opts!r})
    cfg.freeze()
    launch(main, 2, dist_url="auto", args=(cfg,))
"""


def test_two_processes_take_identical_decisions_and_end_with_identical_models(tmp_path):
    opts = [*TINY, "SOLVER.MAX_ITER", "12", "PRUNING.SCHEDULE.END", "7", "OUTPUT_DIR", str(tmp_path)]
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS.format(root=ROOT, opts=opts))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = pruning_log(tmp_path)["steps"]
    assert len(steps) == 2
    for step in steps:
        assert len(step["rank_digests"]) == 2 and len(set(step["rank_digests"])) == 1
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    assert ranks[0]["architecture"] == ranks[1]["architecture"]
    assert ranks[0]["architecture"] != pruning_log(tmp_path)["original_sizes"]  # it was pruned
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys()
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key


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
        cfg.merge_from_list(TINY + ["SOLVER.MAX_ITER", "8", "PRUNING.SCHEDULE.END", "7", "PRUNING.SOFT.REMOVE_RATIO", "0.0",
                                    "PRUNING.SOFT.KEEP_ZEROED", str(keep_zeroed), "OUTPUT_DIR", str(out)])
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
        (["PRUNING.TARGET.CHANNELS.RATIO", "1.0"], "PRUNING.TARGET.CHANNELS.RATIO = 1.0 is invalid"),
        (["PRUNING.SCOPES", "('backbone', 'neck')"], "PRUNING.SCOPES = 'neck' is invalid"),
        (["PRUNING.CRITERION.NAME", "magic"], "PRUNING.CRITERION.NAME = 'magic' is invalid: known: "),
        (["PRUNING.SCHEDULE.NAME", "steps"], "PRUNING.SCHEDULE.NAME = 'steps' is invalid"),
        (["PRUNING.SCHEDULE.END", "5", "PRUNING.SCHEDULE.START", "10"], "PRUNING.SCHEDULE.END = 5 is invalid"),
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
    cfg.merge_from_list(["SOLVER.MAX_ITER", "1000", "PRUNING.SCHEDULE.UNIT", "epoch", "PRUNING.SCHEDULE.START", "1",
                         "PRUNING.SCHEDULE.INTERVAL", "2", "PRUNING.SCHEDULE.END", "7"])
    assert resolve_pruning_iterations(cfg, iters_per_epoch=100) == [300, 500, 700]
    cfg.merge_from_list(["PRUNING.SCHEDULE.UNIT", "iter", "PRUNING.SCHEDULE.START", "0", "PRUNING.SCHEDULE.INTERVAL", "-1", "PRUNING.SCHEDULE.END", "-1"])
    assert resolve_pruning_iterations(cfg) == list(range(75, 750, 75)) + [750]


def test_channels_without_gradient_are_the_ones_pgp_removes():
    """Dead channels (zero filter, a negative shift or bias in front of the ReLU: no gradient can
    reach them) planted in a BN conv group and in the box head's fc1 score 0 under PGP's criterion
    after real training steps, and are in the step's weak set."""
    from detectron2.utils.events import EventStorage

    from pgp_det.pruning import derive_channel_groups
    from pgp_det.pruning.criteria import build_criterion
    from pgp_det.pruning.hook import plan_pruning_step
    from pgp_det.pruning.target import ChannelTarget
    from test_pruning_groups import build_detector
    from test_surgery_equivalence import make_training_input

    model = build_detector("R18-FPN", "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 0)
    groups = {n: g for n, g in derive_channel_groups(model).items() if g.prunable}
    conv_group = next(n for n in groups if n.endswith("res3.0.conv1"))
    planted = {conv_group: [1, 5, 9], "roi_heads.box_head.fc1": [0, 7, 100, 511]}
    conv = model.get_submodule(groups[conv_group].producer_layers[0])
    fc1 = model.roi_heads.box_head.fc1
    with torch.no_grad():
        for c in planted[conv_group]:
            conv.weight[c] = 0.0
            conv.norm.bias[c] = -1.0
        for c in planted["roi_heads.box_head.fc1"]:
            fc1.weight[c] = 0.0
            fc1.bias[c] = -1.0
    criterion = build_criterion("pgp")
    criterion.attach(model, groups)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    for seed in (1, 2, 3):
        optimizer.zero_grad()
        with EventStorage(0):
            losses = model([make_training_input(seed)])
        sum(losses.values()).backward()
        criterion.update(model)
        optimizer.step()
    scores = criterion.scores(model)
    cfg = get_pgp_cfg()
    cfg.merge_from_list(["PRUNING.TARGET.KIND", "channels", "PRUNING.ROUNDING.MULTIPLE", 1, "PRUNING.ROUNDING.MIN_CHANNELS", 1])
    sizes = {n: g.size for n, g in groups.items()}
    weak = plan_pruning_step(cfg, model, groups, scores, 1, 1, sizes,
                             ChannelTarget({g.scope: 0.25 for g in groups.values()}))
    for name, channels in planted.items():
        assert all(scores[name][c] == 0 for c in channels), name
        assert (scores[name] > 0).float().mean() > 0.5, name  # live channels score above them
        assert set(channels) <= set(weak[name]), name


def test_kept_counts_follow_the_schedule_at_every_step(tmp_path):
    """TARGET ratio, hard pruning only: after step k every pruned group keeps exactly the
    schedule's count, ``kept_count(C0, p_k)``, summed per scope in the log."""
    from detectron2.modeling import build_model

    from pgp_det.pruning import derive_channel_groups, kept_count
    from pgp_det.pruning.schedules import pruned_fraction

    train(tmp_path, "PRUNING.TARGET.KIND", "channels", "PRUNING.TARGET.CHANNELS.RATIO", "0.5", "PRUNING.SOFT.REMOVE_RATIO", "1.0",
          "PRUNING.CRITERION.NAME", "l1", "PRUNING.ROUNDING.MULTIPLE", "1", "PRUNING.ROUNDING.MIN_CHANNELS", "1")
    log = pruning_log(tmp_path)
    cfg = get_pgp_cfg()
    cfg.merge_from_file(os.path.join(tmp_path, "config.yaml"))
    scope_of = {name: g.scope for name, g in derive_channel_groups(build_model(cfg)).items()}
    original = log["original_sizes"]
    assert [s["iteration"] for s in log["steps"]] == [4, 8, 12, 15]
    for step in log["steps"]:
        fraction = pruned_fraction("pgp_exponential", step["step"], step["of"], 0.5)
        expected = {}
        for name, size in original.items():
            expected[scope_of[name]] = expected.get(scope_of[name], 0) + kept_count(size, fraction, 1, 1)
        assert step["zeroed"] == 0
        assert step["kept_per_scope"] == expected, step["step"]
    assert log["architecture"] == {  # the final widths: half of every pruned group
        name: kept_count(size, 0.5, 1, 1) for name, size in original.items()} | {
        name: width for name, width in log["architecture"].items() if name not in original}


def test_an_epoch_counts_the_images_detectron2_trains_on():
    """detectron2 drops the images without annotations (about 3% of the synthetic training set)
    when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is on: an epoch is as many batches as it keeps."""
    import math

    from detectron2.data import DatasetCatalog

    import pgp_det.data  # noqa: F401  (registers the synthetic datasets)
    from pgp_det.pruning.hook import iterations_per_epoch

    cfg = get_pgp_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "synthetic", "pgp_faster_rcnn_R_18_FPN_synth.yaml"))
    images = [d for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    annotated = [d for d in images if any(not a.get("iscrowd", 0) for a in d.get("annotations", ()))]
    assert 0 < len(images) - len(annotated) < 0.1 * len(images)
    for batch in (1, 4):
        cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", batch, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", True])
        assert iterations_per_epoch(cfg) == math.ceil(len(annotated) / batch)
        cfg.merge_from_list(["DATALOADER.FILTER_EMPTY_ANNOTATIONS", False])
        assert iterations_per_epoch(cfg) == math.ceil(len(images) / batch)
    assert math.ceil(len(annotated) / 4) != math.ceil(len(images) / 4)  # the filter shows at the config's batch


def test_every_holder_of_the_ddp_wrapper_sees_the_new_one(tmp_path, monkeypatch):
    """A hard prune, then a resume from the pruned checkpoint, inside DistributedDataParallel: the
    training loop, detectron2's PreciseBN hook and the checkpointers (the periodic one's included)
    all hold the one new wrapper (or its model). One process: a gloo group of one, and detectron2
    told there are two processes so that it wraps the model as in a multi-process run."""
    import torch.distributed as dist
    from detectron2.engine import hooks
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    from pgp_det.checkpoint import architecture_record
    from pgp_det.data import register_custom_datasets
    from pgp_det.engine import Trainer
    from pgp_det.utils.modules import unwrap_model

    def holders(trainer):
        """The training loop's model, PreciseBN's, and every checkpointer's (unwrapped, as fvcore keeps it)."""
        precise = [h for h in trainer._hooks if isinstance(h, hooks.PreciseBN)]
        checkpointers = [trainer.checkpointer] + [h.checkpointer for h in trainer._hooks if hasattr(h, "checkpointer")]
        assert len(precise) == 1 and len(checkpointers) == 2
        return trainer._trainer.model, trainer.model, precise[0]._model, [c.model for c in checkpointers]

    def check(trainer):
        loop, model, precise, checkpointed = holders(trainer)
        assert isinstance(loop, DistributedDataParallel)
        assert model is loop and precise is loop
        assert all(m is unwrap_model(loop) for m in checkpointed)
        return loop

    cfg = get_pgp_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "synthetic", "pgp_faster_rcnn_R_18_FPN_synth.yaml"))
    cfg.merge_from_list(TINY + ["SOLVER.MAX_ITER", "3", "PRUNING.SCHEDULE.INTERVAL", "2", "PRUNING.SCHEDULE.END", "2",
                                "PRUNING.SOFT.REMOVE_RATIO", "1.0", "TEST.PRECISE_BN.ENABLED", "True",
                                "TEST.PRECISE_BN.NUM_ITER", "1", "OUTPUT_DIR", str(tmp_path / "run")])
    register_custom_datasets(cfg)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    try:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        first = check(trainer)
        dense = architecture_record(first)
        trainer.train()  # prunes after 2 iterations; PreciseBN runs after the last one
        pruned = check(trainer)
        assert pruned is not first and architecture_record(pruned) != dense
        # resuming from the pruned checkpoint shrinks the freshly built model inside its wrapper
        resumed = Trainer(cfg)
        built = check(resumed)
        resumed.resume_or_load(resume=True)
        assert resumed.checkpointer.architecture_changed
        after = check(resumed)
        assert after is not built and architecture_record(after) == architecture_record(pruned)
    finally:
        dist.destroy_process_group()


def test_train_net_with_two_cpu_processes_ends_cleanly(tmp_path):
    """--num-gpus 2 on a CPU: both ranks train, prune and exit 0 (no abort at interpreter exit)."""
    out = tmp_path / "run"
    train(out, "SOLVER.MAX_ITER", "8", "PRUNING.SCHEDULE.END", "7", num_gpus=2)
    assert json.loads((out / "results.json").read_text()) == {}  # no test set: nothing evaluated
    assert [s["step"] for s in pruning_log(out)["steps"]] == [1, 2]
    assert checkpoint_architecture(out / "model_final.pth") == pruning_log(out)["architecture"]

"""tools/sweep.py: the runs it plans, a one-shot sweep end to end, and bad input."""
import argparse
import csv
import os
import subprocess
import sys

import pytest
from pgp_det.engine.sweep import plan_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "tools", "sweep.py")


def test_training_sweep_plans_baseline_targets_and_variants():
    args = argparse.Namespace(ratios="0.3", flops_reductions="0.5", baseline=True, oneshot=False,
                              variant=["psfp=PRUNING.CRITERION.NAME l2 PRUNING.SOFT.REMOVE_RATIO 0.0"])
    runs = plan_runs(args)
    assert [label for label, _ in runs] == ["baseline", "pgp_ratio0.3", "psfp_ratio0.3", "pgp_flops0.5", "psfp_flops0.5"]
    assert runs[0][1] == ["PRUNING.ENABLED", "False"]
    assert runs[4][1] == ["PRUNING.ENABLED", "True", "PRUNING.TARGET.KIND", "flops", "PRUNING.TARGET.FLOPS.REDUCTION", "0.5",
                          "PRUNING.CRITERION.NAME", "l2", "PRUNING.SOFT.REMOVE_RATIO", "0.0"]


def test_oneshot_sweep_writes_the_report(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, SWEEP, "--config", "synthetic/faster_rcnn_R_18_FPN_synth.yaml", "--oneshot",
         "--ratios", "0.25,0.5", "--output", str(out),
         "--eval-args", "--skip-eval --runs 2 --warmup 1 --dataset-images 0 --input-size 128x160",
         "MODEL.WEIGHTS", "", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["ratio0.25", "ratio0.5"]
    assert float(rows[1]["gflops"]) < float(rows[0]["gflops"])
    assert float(rows[1]["params_M"]) < float(rows[0]["params_M"])
    assert (out / "report" / "results.json").is_file() and (out / "report" / "results.md").is_file()
    assert (out / "ratio0.5" / "model_pruned.pth").is_file()  # --reuse would keep it


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratios", "0.5,1.5"], "--ratios: 1.5 is outside (0, 1)"),
        ([], "nothing to run"),
        (["--ratios", "0.5", "--variant", "broken"], "--variant 'broken'"),
        # the measurement's arguments are checked before the first run trains
        (["--ratios", "0.5", "--eval-args", "--runs 0"], "--eval-args: --runs must be >= 1"),
        (["--ratios", "0.5", "--eval-args", "--no-such-option 1"], "--eval-args: unrecognized arguments: --no-such-option"),
        (["--ratios", "0.5", "--eval-args", "--sweep MODEL.RPN.POST_NMS_TOPK_TEST=100,0"],
         "--eval-args: model 'pgp_ratio0.5[POST_NMS_TOPK_TEST=0]': MODEL.RPN.POST_NMS_TOPK_TEST 0 keeps no proposal"),
        (["--ratios", "0.5", "--eval-args", "MODEL.NO_SUCH_KEY 1"],
         "--eval-args: model 'pgp_ratio0.5': bad override in ['MODEL.NO_SUCH_KEY', '1']"),
        (["--ratios", "0.5", "--eval-args", "--reference nobody"], "--eval-args: --reference 'nobody' is not a run's label"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, SWEEP, "--config", "synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml", *args,
                           "--output", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    assert not (tmp_path / "x").exists()


def _finished_run(folder, config_name, opts):
    """A folder that looks like a finished training run of ``config_name`` with ``opts``."""
    from pgp_det.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", config_name), [*opts, "OUTPUT_DIR", str(folder)])
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.dump())
    (folder / "model_final.pth").write_bytes(b"weights")


def test_reuse_refuses_a_finished_run_trained_with_other_settings(tmp_path):
    # the demo's case: the unpruned run of an earlier sweep trained from scratch, this sweep starts from weights
    out = tmp_path / "sweep"
    _finished_run(out / "baseline", "synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml", ["PRUNING.ENABLED", "False"])
    before = sorted(p.name for p in out.rglob("*"))
    proc = subprocess.run([sys.executable, SWEEP, "--config", "synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml",
                           "--baseline", "--flops-reductions", "0.5", "--reuse", "--output", str(out),
                           "MODEL.WEIGHTS", "start/model_final.pth"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: run 'baseline'") and "MODEL.WEIGHTS ''" in line and "'start/model_final.pth'" in line
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing trained, nothing measured


def test_reuse_keeps_a_finished_run_trained_with_the_same_settings(tmp_path):
    from pgp_det.engine.sweep import check_runs

    out = tmp_path / "sweep"
    _finished_run(out / "baseline", "synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml",
                  ["MODEL.WEIGHTS", "start/model_final.pth", "PRUNING.ENABLED", "False"])
    args = argparse.Namespace(config="synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml", config_file="", ratios="",
                              flops_reductions="0.5", baseline=True, oneshot=False, variant=[], reuse=True,
                              output=str(out), opts=["MODEL.WEIGHTS", "start/model_final.pth"])
    check_runs(args, plan_runs(args), os.path.join(ROOT, "configs"), [])  # raises if it would refuse


def test_config_differences_name_each_key_and_read_lists_as_tuples():
    from pgp_det.config import get_pgp_cfg
    from pgp_det.engine.sweep import config_differences

    a, b = get_pgp_cfg(), get_pgp_cfg()
    b.SOLVER.STEPS = list(b.SOLVER.STEPS)  # what a YAML round trip gives
    assert config_differences(a, b) == []
    b.SEED, b.MODEL.RPN.POST_NMS_TOPK_TEST = 3, 50
    assert config_differences(a, b) == [("MODEL.RPN.POST_NMS_TOPK_TEST", a.MODEL.RPN.POST_NMS_TOPK_TEST, 50),
                                        ("SEED", a.SEED, 3)]

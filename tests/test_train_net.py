"""tools/train_net.py end to end on the synthetic set: train, checkpoint, --eval-only, bad input."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
SMALL = [
    "SOLVER.MAX_ITER", "40", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "10",
    "SOLVER.STEPS", "(30,)", "SOLVER.CHECKPOINT_PERIOD", "20", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "TEST.DETECTIONS_PER_IMAGE", "50",
]


def run_cli(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, TRAIN_NET, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def training_records(output_dir):
    """The per-iteration records detectron2 wrote to metrics.json (every 20 iterations)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def final_results(output_dir):
    """The evaluation numbers the run wrote to results.json (training and --eval-only alike)."""
    with open(os.path.join(output_dir, "results.json")) as f:
        return json.load(f)["bbox"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    proc = run_cli("--config", "synthetic/faster_rcnn_R_18_FPN_synth.yaml", *SMALL, "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_training_decreases_loss_and_checkpoints(trained):
    out, proc = trained
    losses = [r["total_loss"] for r in training_records(out) if "total_loss" in r]
    assert len(losses) == 2  # iterations 20 and 40, each the median of its last 20
    assert losses[-1] < losses[0]
    results = final_results(out)
    evals = [r for r in training_records(out) if "bbox/AP50" in r]
    assert evals[-1]["bbox/AP50"] == pytest.approx(results["AP50"], abs=1e-6)
    for name in ("model_0000019.pth", "model_final.pth", "last_checkpoint"):
        assert os.path.isfile(os.path.join(out, name))
    assert {"AP", "AP50", "AP50_area", "AP75"} <= set(results)
    assert f"results written to {out}" in proc.stdout


def test_eval_only_reproduces_final_ap(trained, tmp_path):
    out, _ = trained
    at_end = final_results(out)
    proc = run_cli("--config", "synthetic/faster_rcnn_R_18_FPN_synth.yaml", "--eval-only", *SMALL,
                   "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = final_results(str(tmp_path))
    for key in ("AP", "AP50", "AP50_area"):
        assert reloaded[key] == pytest.approx(at_end[key], abs=1e-6)


def test_eval_only_in_the_training_run_folder_leaves_the_run_as_it_was(trained):
    """detectron2 would rewrite the run's config.yaml (here: with another test size) and
    pgp_det its results.json; the evaluation goes to OUTPUT_DIR/eval instead."""
    import hashlib

    out, _ = trained

    def digests():
        found = {}
        for folder, _, files in os.walk(out):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, out)] = hashlib.sha256(f.read()).hexdigest()
        return found

    before = digests()
    proc = run_cli("--config-file", os.path.join(out, "config.yaml"), "--eval-only", "INPUT.MIN_SIZE_TEST", "192",
                   "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "holds a training run" in proc.stderr
    after = digests()
    assert {name: after[name] for name in before} == before
    assert all(name.startswith("eval" + os.sep) for name in set(after) - set(before))
    assert {"AP", "AP50"} <= set(final_results(os.path.join(out, "eval")))
    with open(os.path.join(out, "eval", "config.yaml")) as f:
        assert "MIN_SIZE_TEST: 192" in f.read()


def test_coco_layout_gets_coco_metrics(tmp_path):
    from detectron2.data import MetadataCatalog

    import pgp_det.data  # noqa: F401  (registers the synthetic sets)
    from pgp_det.config import get_pgp_cfg
    from pgp_det.evaluation import build_evaluator

    cfg = get_pgp_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluator = build_evaluator(cfg, "synth_coco_test")
    assert type(evaluator).__name__ == "COCOEvaluator"
    assert MetadataCatalog.get("synth_coco_test").evaluator_type == "coco"
    assert type(build_evaluator(cfg, "synth_voc_test")).__name__ == "VOCDetectionEvaluator"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "no_such.yaml"], "config 'no_such.yaml' not found"),
        (["--config-file", "configs/faster_rcnn_R_50_FPN_voc.yaml", "MODEL.WEIGHTS", ""], "voc_2007_trainval"),
        (["--config", "synthetic/faster_rcnn_R_18_FPN_synth.yaml", "MODEL.NO_SUCH_KEY", "1"], "NO_SUCH_KEY"),
        (["--config", "synthetic/faster_rcnn_R_18_FPN_synth.yaml", "MODEL.WEIGHTS", "missing.pth"],
         "MODEL.WEIGHTS file 'missing.pth' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = run_cli(*args, env={"DETECTRON2_DATASETS": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

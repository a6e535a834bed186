"""Timing harness, FLOPs, report writer and tools/eval_map_fps.py on tiny R18-FPN models."""
import csv
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.structures import BoxMode
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from PIL import Image

from pgp_det.benchmark import measure_detector_latency, time_callable
from pgp_det.benchmark.flops import count_flops
from pgp_det.benchmark.report import pareto_front, reproducibility_record, write_report
from pgp_det.checkpoint import load_model
from pgp_det.config import get_pgp_cfg
from pgp_det.errors import UserInputError
from pgp_det.evaluation import build_evaluator
from conftest import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R18_CONFIG = os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml")
CLASSES = ["square", "wide", "tall", "red", "green", "blue"]
DATASET = "pgp_bench_tiny_voc"


def tiny_cfg(*overrides):
    """R18-FPN at 128x160 with few proposals (fast on two CPU cores), anchors sized for the objects."""
    cfg = get_pgp_cfg()
    cfg.merge_from_file(R18_CONFIG)
    cfg.merge_from_list([
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "TEST.DETECTIONS_PER_IMAGE", "20", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", f"('{DATASET}',)",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[64], [80], [96], [112], [128]]", *overrides,
    ])
    return cfg


def write_voc(root, num_images=4, seed=0):
    """A VOC-layout folder of 128x160 images with a few filled rectangles each."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = []
    for i in range(num_images):
        image = np.full((128, 160, 3), 40, dtype=np.uint8)
        ann = ET.Element("annotation")
        size = ET.SubElement(ann, "size")
        for tag, value in (("width", 160), ("height", 128), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        for _ in range(2):  # large objects: even a random-init model finds some (non-zero AP)
            w, h = rng.integers(50, 110, size=2)
            x0, y0 = rng.integers(0, 160 - w), rng.integers(0, 128 - h)
            image[y0:y0 + h, x0:x0 + w] = rng.integers(80, 255, size=3)
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = CLASSES[int(rng.integers(len(CLASSES)))]
            ET.SubElement(obj, "difficult").text = "0"
            box = ET.SubElement(obj, "bndbox")
            for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x0 + w), ("ymax", y0 + h)):
                ET.SubElement(box, tag).text = str(int(value))
        image_id = f"{i:04d}"
        Image.fromarray(image[:, :, ::-1]).save(os.path.join(root, "JPEGImages", image_id + ".jpg"))
        ET.ElementTree(ann).write(os.path.join(root, "Annotations", image_id + ".xml"))
        ids.append(image_id)
    with open(os.path.join(root, "ImageSets", "Main", "test.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def register_voc(name, root):
    """Register root's test split like detectron2's VOC loader (whose v0.6 uses the removed ``np.str``)."""
    def load():
        with open(os.path.join(root, "ImageSets", "Main", "test.txt")) as f:
            ids = f.read().split()
        dicts = []
        for image_id in ids:
            tree = ET.parse(os.path.join(root, "Annotations", image_id + ".xml"))
            annotations = []
            for obj in tree.findall("object"):
                box = [float(obj.find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]
                box[0] -= 1  # VOC boxes are 1-based inclusive; detectron2's loader shifts the minimum
                box[1] -= 1
                annotations.append(
                    {"category_id": CLASSES.index(obj.find("name").text), "bbox": box, "bbox_mode": BoxMode.XYXY_ABS}
                )
            dicts.append({
                "file_name": os.path.join(root, "JPEGImages", image_id + ".jpg"), "image_id": image_id,
                "height": int(tree.find("size/height").text), "width": int(tree.find("size/width").text),
                "annotations": annotations,
            })
        return dicts

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(thing_classes=CLASSES, dirname=root, year=2007, split="test",
                                  evaluator_type="pascal_voc")


def save_model(cfg, directory, seed):
    """Untrained model of ``cfg`` saved as directory/model_final.pth next to its config.yaml.

    Box regressors are zeroed and class logits damped, so detections sit on anchors and every
    class scores: an untrained detector with a small non-zero AP, which makes mAP comparisons mean
    something.
    """
    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for layer in (model.proposal_generator.rpn_head.anchor_deltas, model.roi_heads.box_predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.01)
        model.roi_heads.box_predictor.cls_score.bias.zero_()
    DetectionCheckpointer(model, save_dir=directory).save("model_final")
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    return os.path.join(directory, "config.yaml"), os.path.join(directory, "model_final.pth")


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("voc"))
    write_voc(root)
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    register_voc(DATASET, root)
    yield DATASET
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two different architectures (64- and 32-channel FPN), saved as training run folders."""
    root = tmp_path_factory.mktemp("models")
    wide = save_model(tiny_cfg(), str(root / "wide"), seed=1)
    narrow = save_model(tiny_cfg("MODEL.FPN.OUT_CHANNELS", "32"), str(root / "narrow"), seed=2)
    return {"wide": wide, "narrow": narrow}


def test_time_callable_orders_stats():
    stats = time_callable(lambda: sum(range(20000)), warmup=2, runs=15)
    assert len(stats.samples) == 15
    assert 0 < stats.min <= stats.median <= stats.p90 <= stats.max
    assert stats.min <= stats.mean <= stats.max
    assert stats.fps == pytest.approx(1000.0 / stats.median)


def test_time_callable_calls_sync_around_each_run():
    calls = []
    time_callable(lambda: calls.append("fn"), warmup=1, runs=2, sync=lambda: calls.append("sync"))
    assert calls == ["fn", "sync", "fn", "sync", "sync", "fn", "sync"]


def test_detector_latency_whole_and_stages():
    model = build_model(tiny_cfg()).eval()
    latency = measure_detector_latency(model, (128, 160), "cpu", warmup=1, runs=5)
    whole = latency.whole
    assert 0 < whole.min <= whole.median <= whole.p90 <= whole.max
    assert whole.fps == pytest.approx(1000.0 / whole.median)
    assert list(latency.stages) == ["preprocess", "backbone_fpn", "rpn", "roi_heads", "postprocess"]
    assert all(s.median > 0 for s in latency.stages.values())
    # the stages are the whole model called piece by piece; other processes make timings noisy
    assert sum(s.min for s in latency.stages.values()) <= 1.5 * whole.max
    assert latency.stages["backbone_fpn"].median > latency.stages["postprocess"].median
    env = latency.environment
    assert env["num_threads"] == torch.get_num_threads() and env["device_name"] and env["torch"] == torch.__version__
    assert latency.input_size == (128, 160)


def test_detector_latency_times_calls_of_batch_size_images():
    model = build_model(tiny_cfg()).eval()
    seen = []
    handle = model.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        latency = measure_detector_latency(model, (96, 128), "cpu", warmup=1, runs=2, batch_size=3)
    finally:
        handle.remove()
    assert seen and all(shape[0] == 3 for shape in seen)  # every call, whole or staged, ran the three images
    assert latency.batch_size == 3 and latency.to_dict()["batch_size"] == 3
    assert latency.input_size == (96, 128)


def test_detector_latency_bad_dtype():
    model = build_model(tiny_cfg()).eval()
    with pytest.raises(ValueError, match="CUDA"):
        measure_detector_latency(model, (64, 64), "cpu", dtype="fp16", warmup=0, runs=1)


def test_flops_families_add_up():
    model = build_model(tiny_cfg()).eval()
    flops = count_flops(model, 128, 160)
    families = flops["gflops_per_family"]
    assert set(families) == {"backbone", "fpn", "rpn", "roi_heads"}
    assert all(v > 0 for v in families.values())
    assert sum(families.values()) == pytest.approx(flops["gflops"], rel=1e-6)
    assert families["backbone"] > families["fpn"]
    assert flops["params"] == sum(p.numel() for p in model.parameters())
    assert sum(flops["params_per_family"].values()) == flops["params"]
    # conv cost scales with pixels: the backbone at twice the area costs twice as much
    doubled = count_flops(model, 256, 160)["gflops_per_family"]["backbone"]
    assert doubled == pytest.approx(2 * families["backbone"], rel=0.02)


@pytest.mark.parametrize(
    "points, maximize, front",
    [
        ([(50, 10), (40, 20), (45, 5), (30, 30)], (True, True), [0, 1, 3]),  # (45, 5) loses to (50, 10)
        ([(50, 3.0), (40, 1.5), (30, 2.0)], (True, False), [0, 1]),  # GFLOPs: lower is better
        ([(40, 20), (40, 20), (39, 20)], (True, True), [0, 1]),  # equal points both stay
        ([(50, float("nan")), (10, 1)], (True, True), [1]),  # missing values are never on the front
        ([], (True, True), []),
    ],
)
def test_pareto_front(points, maximize, front):
    assert pareto_front(points, maximize) == front


def test_report_files(tmp_path):
    rows = [
        {"label": "dense", "map_metric": "AP50 (VOC07 11-point)", "mAP": 70.0, "fps": 10.0, "gflops": 3.0},
        {"label": "pruned", "mAP": 65.0, "fps": 20.0, "gflops": 1.5},
        {"label": "bad", "mAP": 60.0, "fps": 5.0, "gflops": 2.0},
    ]
    record = reproducibility_record({"device": "cpu", "num_threads": 2}, 0, {"runs": 3}, ["tool", "--x", "a b"])
    written = write_report(rows, str(tmp_path), record)
    assert set(written) == {"csv", "json", "md", "map_vs_fps", "map_vs_gflops"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["reproducibility"]["command"] == "tool --x 'a b'"
    assert [r["label"] for r in data["results"]] == ["dense", "pruned", "bad"]
    png = Image.open(tmp_path / "map_vs_fps.png")
    assert json.loads(png.info["Description"])["seed"] == 0  # the figure carries its record
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_report_says_how_memory_was_allocated(tmp_path):
    rows = [{"label": "a", "fps": 3.0, "gflops": 1.0}]
    for kept, line in ((False, "on EPYC (cpu, 2 threads)."), (True, "on EPYC (cpu, 2 threads, freed memory kept).")):
        env = {"device_name": "EPYC", "device": "cpu", "num_threads": 2, "freed_memory_kept": kept}
        write_report(rows, str(tmp_path / str(kept)), reproducibility_record(env, 0, {}))
        assert line in (tmp_path / str(kept) / "results.md").read_text()


def test_report_without_map_skips_plots(tmp_path):
    rows = [{"label": "a", "fps": 3.0, "gflops": 1.0}]
    written = write_report(rows, str(tmp_path), reproducibility_record({}, 0, {}))
    assert set(written) == {"csv", "json", "md"}


def test_eval_map_fps_end_to_end(tiny_voc, tiny_models, tmp_path, capsys):
    wide_cfg, wide_weights = tiny_models["wide"]
    out = tmp_path / "report"
    tool = load_tool("eval_map_fps")
    code = tool.main([
        "--model", f"wide={wide_cfg}:{wide_weights}", "--run-dir", os.path.dirname(tiny_models["narrow"][0]),
        "--warmup", "1", "--runs", "3", "--dataset-images", "2", "--output", str(out),
    ])
    assert code == 0
    progress = capsys.readouterr().out
    assert "[wide] evaluating on" in progress and "[narrow] counting FLOPs" in progress
    assert {"map_vs_fps.png", "map_vs_gflops.png", "results.csv", "results.json", "results.md"} <= set(os.listdir(out))
    with open(out / "results.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    expected = {
        "label", "mAP", "AP", "AP50", "map_metric", "latency_median_ms", "latency_p90_ms", "fps",
        "dataset_latency_median_ms", "dataset_latency_p90_ms", "dataset_fps", "stage_backbone_fpn_ms",
        "stage_rpn_ms", "stage_roi_heads_ms", "stage_postprocess_ms", "gflops", "gflops_backbone", "gflops_fpn",
        "gflops_rpn", "gflops_roi_heads", "params_M", "checkpoint_mb", "input_size",
    }
    assert expected <= set(rows["wide"])
    assert rows["wide"]["input_size"] == "128x128"  # MIN_SIZE_TEST square
    assert float(rows["narrow"]["gflops_fpn"]) < float(rows["wide"]["gflops_fpn"])
    assert float(rows["wide"]["checkpoint_mb"]) == pytest.approx(os.path.getsize(wide_weights) / 1e6)
    for r in rows.values():
        assert float(r["latency_median_ms"]) <= float(r["latency_p90_ms"])
        assert int(r["batch_size"]) == 1
        assert float(r["fps"]) == pytest.approx(1000 / float(r["latency_median_ms"]))

    # mAP equals a direct detectron2 evaluation of the same checkpoint
    assert max(float(r["mAP"]) for r in rows.values()) > 0
    for label, (config, weights) in tiny_models.items():
        cfg = get_pgp_cfg()
        cfg.merge_from_file(config)
        model = load_model(cfg, weights)
        direct = inference_on_dataset(
            model, build_detection_test_loader(cfg, tiny_voc), build_evaluator(cfg, tiny_voc)
        )["bbox"]
        assert float(rows[label]["AP50"]) == pytest.approx(direct["AP50"], abs=1e-9)
        assert float(rows[label]["mAP"]) == pytest.approx(direct["AP50"], abs=1e-9)
        assert float(rows[label]["AP"]) == pytest.approx(direct["AP"], abs=1e-9)

    data = json.loads((out / "results.json").read_text())
    assert data["details"]["wide"]["latency"]["stages"]["rpn"]["samples"]
    assert data["reproducibility"]["environment"]["num_threads"] == torch.get_num_threads()
    assert "tools/eval_map_fps.py --model wide=" in data["reproducibility"]["command"]
    assert "| wide |" in (out / "results.md").read_text()


def test_eval_map_fps_times_batches_and_counts_images_per_second(tiny_voc, tiny_models, tmp_path):
    wide_cfg, wide_weights = tiny_models["wide"]
    out = tmp_path / "batch"
    code = load_tool("eval_map_fps").main([
        "--model", f"wide={wide_cfg}:{wide_weights}", "--skip-eval", "--batch-size", "4", "--warmup", "1",
        "--runs", "2", "--dataset-images", "1", "--output", str(out),
    ])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    row = data["results"][0]
    assert row["batch_size"] == 4 and data["details"]["wide"]["latency"]["batch_size"] == 4
    assert row["fps"] == pytest.approx(4000 / row["latency_median_ms"])  # images per second, not calls
    assert row["dataset_fps"] == pytest.approx(1000 / row["dataset_latency_median_ms"])  # dataset images: batch 1
    assert "Latency: batch 4 at the fixed size" in (out / "results.md").read_text()


def test_eval_map_fps_sweeps_test_time_knobs_and_marks_the_pareto_front(tiny_voc, tiny_models, tmp_path):
    wide_cfg, wide_weights = tiny_models["wide"]
    out = tmp_path / "knobs"
    code = load_tool("eval_map_fps").main([
        "--model", f"wide={wide_cfg}:{wide_weights}", "--sweep", "MODEL.RPN.POST_NMS_TOPK_TEST=100,20",
        "--sweep", "INPUT.MIN_SIZE_TEST=128,96", "--warmup", "1", "--runs", "3", "--dataset-images", "0",
        "--output", str(out),
    ])
    assert code == 0
    with open(out / "results.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert set(rows) == {f"wide[POST_NMS_TOPK_TEST={k},MIN_SIZE_TEST={s}]" for k in (100, 20) for s in (128, 96)}
    for label, row in rows.items():
        size = label.split("MIN_SIZE_TEST=")[1].rstrip("]")
        assert row["input_size"] == f"{size}x{size}"  # the timed input follows the swept test size
    # fewer proposals at the same size: the box head runs on fewer boxes
    fewer, more = rows["wide[POST_NMS_TOPK_TEST=20,MIN_SIZE_TEST=128]"], rows["wide[POST_NMS_TOPK_TEST=100,MIN_SIZE_TEST=128]"]
    assert fewer["sweep"] == "MODEL.RPN.POST_NMS_TOPK_TEST 20 INPUT.MIN_SIZE_TEST 128"
    assert float(fewer["AP50"]) != float(more["AP50"]) or float(fewer["gflops"]) < float(more["gflops"])
    front = [r for r in rows.values() if r["pareto"] == "yes"]
    assert front
    for r in rows.values():  # a point off the front is beaten in both mAP and FPS by one on it
        if r["pareto"] != "yes":
            assert any(float(f["mAP"]) >= float(r["mAP"]) and float(f["fps"]) >= float(r["fps"]) for f in front)
    assert (out / "map_vs_fps.png").exists()


@pytest.mark.parametrize("sweep, message", [
    ("MODEL.RPN.POST_NMS_TOPK_TEST", "expected KEY=VALUE1,VALUE2"),
    ("MODEL.NO_SUCH_KEY=1,2", "NO_SUCH_KEY"),
    # the second point is refused before the first is timed: nothing is written
    ("MODEL.RPN.POST_NMS_TOPK_TEST=100,0", "MODEL.RPN.POST_NMS_TOPK_TEST 0 keeps no proposal"),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST=100,-1", "MODEL.RPN.PRE_NMS_TOPK_TEST -1 keeps no proposal"),
    ("INPUT.MIN_SIZE_TEST=128,-5", "INPUT.MIN_SIZE_TEST -5 is not a size"),
    ("TEST.DETECTIONS_PER_IMAGE=100,0", "TEST.DETECTIONS_PER_IMAGE 0 keeps no detection"),
    ("INPUT.MIN_SIZE_TEST=128,0", "leaves no size to time the model at: pass --input-size"),
])
def test_bad_sweep_is_one_line(tiny_models, tmp_path, sweep, message):
    config, weights = tiny_models["wide"]
    proc = run_cli("--model", f"a={config}:{weights}", "--skip-eval", "--dataset-images", "0", "--sweep", sweep,
                   "--output", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_mismatching_checkpoint_is_refused(tiny_models):
    cfg = tiny_cfg("MODEL.FPN.OUT_CHANNELS", "32")
    with pytest.raises(UserInputError, match="differ in shape"):
        load_model(cfg, tiny_models["wide"][1])


def run_cli(*args):
    # warnings of third-party imports are silenced so stderr holds only what the tool says
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_map_fps.py"), *args], capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.parametrize(
    "case, message",
    [
        ("mismatch", "does not match the model of its config"),
        ("unknown_dataset", "dataset 'no_such_dataset' is not registered"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_models, tmp_path, case, message):
    config, weights = tiny_models["wide"]
    args = {
        "mismatch": ["--model", f"a={tiny_models['narrow'][0]}:{weights}", "--skip-eval", "--dataset-images", "0"],
        "unknown_dataset": ["--model", f"a={config}:{weights}", "--dataset", "no_such_dataset"],
    }[case]
    proc = run_cli(*args, "--output", str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "a={config}:{tmp}/missing.pth"], "weights file '{tmp}/missing.pth' does not exist"),
        (["--model", "a={tmp}/missing.yaml"], "config file '{tmp}/missing.yaml' does not exist"),
        (["--run-dir", "{tmp}/no_run"], "'{tmp}/no_run/config.yaml' does not exist"),
        (["--model", "no_label.yaml"], "expected LABEL=CONFIG_FILE[:WEIGHTS]"),
        (["--model", "a={config}", "--input-size", "big"], "--input-size 'big'"),
        (["--model", "a={config}", "--fp16"], "--fp16 needs --device cuda"),
        ([], "no model given"),
        (["--model", "a={config}", "--reference", "b"], "--reference 'b' is not a model's label; the labels are: a"),
        (["--model", "a={config}", "--reference", "a", "--dataset-images", "0"], "pass --dataset-images N"),
    ],
)
def test_bad_arguments_in_process(tiny_models, tmp_path, capsys, args, message):
    fill = {"config": tiny_models["wide"][0], "tmp": str(tmp_path)}
    tool = load_tool("eval_map_fps")
    code = tool.main([a.format(**fill) for a in args] + ["--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(**fill) in err[0], err


class _FakeDevice:
    """A clock for fake models: each call advances it by the model's cost times the device's
    slowness, which grows by half every ``calls_per_step`` calls (a device drifting over time)."""

    def __init__(self, calls_per_step):
        self.now, self.calls, self.calls_per_step = 0.0, 0, calls_per_step

    def run(self, cost):
        self.now += cost * (1.0 + 0.5 * (self.calls // self.calls_per_step))
        self.calls += 1


class _FakeModel(torch.nn.Module):
    def __init__(self, device, cost):
        super().__init__()
        self.device_clock, self.cost = device, cost

    def forward(self, inputs):
        self.device_clock.run(self.cost)
        return []


def test_models_timed_in_turn_keep_their_ratio_on_a_drifting_device(monkeypatch):
    """Model a costs twice model b. On a device slowing down call after call, timing a's images
    then b's gives ratios far from 2; timing them in turn on each image gives exactly 2."""
    import types

    from pgp_det.benchmark import timing

    device = _FakeDevice(calls_per_step=4)  # one image for both models: 2 x (warm call + timed call)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: device.now / 1000.0))
    inputs = [{"image": torch.zeros(3, 8, 8)} for _ in range(5)]
    a, b = _FakeModel(device, 2.0), _FakeModel(device, 1.0)
    in_turn = timing.time_dataset_images_in_turn([(a, inputs), (b, inputs)], warmup=0)
    assert [x / y for x, y in zip(*in_turn)] == pytest.approx([2.0] * 5)
    assert in_turn[0] == pytest.approx([2.0 * (1 + 0.5 * i) for i in range(5)])  # the drift is there
    device.calls = 0
    one_after_the_other = [timing.time_dataset_images(m, inputs, warmup=0).samples for m in (a, b)]
    assert all(abs(x / y - 2.0) > 0.2 for x, y in zip(*one_after_the_other))
    with pytest.raises(ValueError, match="as many inputs"):
        timing.time_dataset_images_in_turn([(a, inputs), (b, inputs[:2])])


def test_eval_map_fps_reference_gives_each_point_its_speedup(tiny_voc, tiny_models, tmp_path, monkeypatch):
    from pgp_det.benchmark import measure

    mapped = []

    class CountingMapper(measure.DatasetMapper):
        def __call__(self, dataset_dict):
            mapped.append(dataset_dict["file_name"])
            return super().__call__(dataset_dict)

    monkeypatch.setattr(measure, "DatasetMapper", CountingMapper)
    wide_cfg, wide_weights = tiny_models["wide"]
    out = tmp_path / "speedups"
    code = load_tool("eval_map_fps").main([
        "--model", f"wide={wide_cfg}:{wide_weights}", "--run-dir", os.path.dirname(tiny_models["narrow"][0]),
        "--reference", "wide", "--sweep", "MODEL.RPN.POST_NMS_TOPK_TEST=100,20", "--skip-eval", "--warmup", "1",
        "--runs", "2", "--dataset-images", "3", "--output", str(out),
    ])
    assert code == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for row in rows:
        assert row["reference"] == "wide" and int(row["dataset_images"]) == 3
        assert float(row["speedup"]) > 0 and float(row["reference_latency_median_ms"]) > 0
    assert any(line.startswith("| label |") and "| speedup |" in line for line in (out / "results.md").read_text().splitlines())
    # 4 points and the reference at its own settings each map the 3 images once: the reference's
    # images are not read again for every point it is timed with
    assert len(mapped) == 3 * 5 and len(set(mapped)) == 3


_FAULTS_SCRIPT = """
import json, resource, sys
import torch
from pgp_det.utils.allocator import keep_freed_memory, page_faults_per_call
from pgp_det.benchmark.timing import environment_info
if sys.argv[1] == "keep":
    keep_freed_memory()
    keep_freed_memory()  # a second call changes nothing
faults = []
for floats in (3 << 20, 12 << 20):  # 12 MiB and 48 MiB of float32: below and above glibc's largest heap threshold
    for _ in range(20):  # the heap may grow for a few allocations before freed blocks are reused
        torch.ones(floats)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(floats)  # allocated, written, freed: an activation of one inference after another
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
counted = [page_faults_per_call(lambda: torch.ones(12 << 20)), page_faults_per_call(lambda: torch.ones(1 << 10))]
print(json.dumps({"kept": environment_info()["freed_memory_kept"], "faults": faults, "counted": counted}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_is_reused_without_page_faults():
    """With the system's malloc a 48 MiB activation is mapped afresh, and faulted in page by page,
    at every allocation; after keep_freed_memory() the same allocations fault nothing (counted by
    the kernel: minor page faults of the process), and timings record the setting.
    page_faults_per_call counts the same. Each mode runs in a fresh process: a long-lived one may
    hold a free block large enough on its heap already."""
    runs = {}
    for mode in ("system", "keep"):
        proc = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["system"]["kept"] is False and runs["keep"]["kept"] is True
    assert runs["system"]["faults"][1] >= 20, runs  # 12,288 pages of 4 KiB (24 huge pages at least)
    for faults in runs["keep"]["faults"]:
        assert faults <= 2, runs
    assert runs["system"]["counted"][0] >= 20 and runs["system"]["counted"][1] <= 2, runs
    assert max(runs["keep"]["counted"]) <= 2, runs


def test_eval_map_fps_measures_each_model_in_each_runtime(tiny_voc, tiny_models, tmp_path, capsys):
    wide_cfg, wide_weights = tiny_models["wide"]
    images = os.path.join(MetadataCatalog.get(tiny_voc).dirname, "JPEGImages")
    out = tmp_path / "runtimes"
    code = load_tool("eval_map_fps").main([
        "--model", f"wide={wide_cfg}:{wide_weights}", "--runtime", "pytorch", "onnxruntime", "onnxruntime_int8",
        "--calibration-dir", images, "--calibration-images", "3", "--warmup", "1", "--runs", "2",
        "--dataset-images", "2", "--output", str(out),
    ])
    assert code == 0, capsys.readouterr().err
    with open(out / "results.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["wide", "wide@onnxruntime", "wide@onnxruntime_int8"]
    eager, onnx_fp32, onnx_int8 = rows.values()
    assert [r["runtime"] for r in rows.values()] == ["pytorch", "onnxruntime", "onnxruntime_int8"]
    assert onnx_fp32["runtime_version"] and onnx_fp32["runtime_provider"] == "CPUExecutionProvider"
    assert [r["dtype"] for r in rows.values()] == ["fp32", "fp32", "int8"]
    # the exported graph is evaluated through the same resize and box scaling as the eager model
    assert float(eager["mAP"]) > 0
    assert float(onnx_fp32["mAP"]) == pytest.approx(float(eager["mAP"]), abs=0.2)
    assert float(onnx_fp32["AP"]) == pytest.approx(float(eager["AP"]), abs=0.2)
    assert onnx_int8["mAP"] != ""
    for row in (onnx_fp32, onnx_int8):
        assert float(row["latency_median_ms"]) > 0 and float(row["dataset_latency_median_ms"]) > 0
        assert row["stage_rpn_ms"] == ""  # one call: no stages outside eager PyTorch
        assert row["gflops"] == eager["gflops"]
    exports = out / "exports" / "wide"
    assert float(onnx_fp32["model_file_mb"]) == pytest.approx(os.path.getsize(exports / "model.onnx") / 1e6)
    assert float(onnx_int8["model_file_mb"]) < 0.4 * float(onnx_fp32["model_file_mb"])
    details = json.loads((out / "results.json").read_text())["details"]
    assert details["wide@onnxruntime_int8"]["runtime"]["quantization"]["calibration"]["images"] == 3

    # a file exported from this model runs in place of a new export; one from another model is refused
    again = tmp_path / "again"
    assert load_tool("eval_map_fps").main([
        "--model", f"wide={wide_cfg}:{wide_weights}", "--runtime", "onnxruntime", "--onnx",
        f"wide={exports / 'model.onnx'}", "--skip-eval", "--warmup", "0", "--runs", "1", "--dataset-images", "0",
        "--output", str(again)]) == 0
    assert not (again / "exports").exists()
    narrow_cfg, narrow_weights = tiny_models["narrow"]
    refused = tmp_path / "refused"
    assert load_tool("eval_map_fps").main([
        "--model", f"narrow={narrow_cfg}:{narrow_weights}", "--runtime", "onnxruntime", "--onnx",
        f"narrow={exports / 'model.onnx'}", "--skip-eval", "--dataset-images", "0", "--output", str(refused)]) == 2
    assert "was exported from another model than model 'narrow'" in capsys.readouterr().err
    assert not refused.exists()

"""TorchScript and ONNX export of a tiny R18-FPN: round trips match PyTorch on other images, sizes
and proposal counts than the one traced."""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image

from pgp_det import export
from pgp_det.config import get_pgp_cfg
from conftest import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R18_CONFIG = os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml")


def tiny_cfg():
    """R18-FPN with a proposal budget the RPN does not fill after NMS: proposal counts vary per image."""
    cfg = get_pgp_cfg()
    cfg.merge_from_file(R18_CONFIG)
    cfg.merge_from_list([
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "600",
        "TEST.DETECTIONS_PER_IMAGE", "30", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
    ])
    return cfg


def sample_images(count):
    """(H, W, 3) uint8 BGR images of assorted sizes: rectangles on noise."""
    rng = np.random.default_rng(0)
    images = []
    for h, w in [(128, 160), (100, 170), (140, 120)][:count]:
        image = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
            image[y:y + 40, x:x + 30] = rng.integers(100, 255, size=3)
        images.append(image)
    return images


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()


@pytest.fixture(scope="module")
def tensors():
    """Model inputs at the images' own sizes (two not divisible by 32), and one letterboxed."""
    images = sample_images(3)
    as_is = [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).float() for im in images]
    return as_is + [export.letterbox(images[1], 128, 160, tiny_cfg().MODEL.PIXEL_MEAN)[0]]


def test_letterbox_keeps_aspect_and_pads_with_mean():
    image = np.full((50, 100, 3), 200, dtype=np.uint8)
    tensor, scale = export.letterbox(image, 128, 160, pixel_mean=[1.0, 2.0, 3.0])
    assert tensor.shape == (3, 128, 160) and tensor.dtype == torch.float32
    assert scale == pytest.approx(1.6)  # width-bound: 100 * 1.6 = 160
    assert torch.all(tensor[:, :80, :] == 200)
    assert tensor[:, 80:, :].flatten(1).unique(dim=1).tolist() == [[1.0], [2.0], [3.0]]


def test_proposal_counts_differ_between_images(model, tensors):
    # the round trips below only prove dynamic shapes if the images really differ in proposals
    counts = []
    hook = model.proposal_generator.register_forward_hook(lambda m, i, out: counts.append(len(out[0][0])))
    with torch.no_grad():
        for t in tensors:
            model([{"image": t}])
    hook.remove()
    assert len(set(counts)) > 1, counts


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_round_trip_matches_pytorch(model, tensors, tmp_path, fmt):
    path = str(tmp_path / f"model.{fmt}")
    if fmt == "torchscript":
        export.export_torchscript(model, tensors[0], path)
        exported = export.load_torchscript(path)
        run = export.run_torchscript
    else:
        export.export_onnx(model, tensors[0], path, opset=17)
        exported = export.load_onnx(path)
        run = export.run_onnx
    for t in tensors:  # the first traced the model; the others differ in size and proposal count
        reference = export.run_pytorch(model, t)
        assert len(reference["scores"]) > 0
        result = export.compare_detections(reference, run(exported, t), box_atol=1e-2, score_atol=1e-3)
        assert result["ok"], result
        assert reference["boxes"].shape[1] == 4 and reference["classes"].dtype == np.int64


def test_compare_detections_flags_differences():
    a = {"boxes": np.zeros((2, 4), np.float32), "scores": np.array([0.9, 0.8], np.float32), "classes": np.array([1, 2])}
    shifted = dict(a, boxes=a["boxes"] + 0.5)
    assert export.compare_detections(a, a)["ok"]
    result = export.compare_detections(a, shifted)
    assert not result["ok"] and result["max_abs_diff_boxes"] == pytest.approx(0.5)
    fewer = {k: v[:1] for k, v in a.items()}
    assert not export.compare_detections(a, fewer)["ok"]


def test_export_model_cli(model, tmp_path, capsys):
    weights_dir = tmp_path / "run"
    weights_dir.mkdir()
    DetectionCheckpointer(model, save_dir=str(weights_dir)).save("model")
    config = tmp_path / "config.yaml"
    config.write_text(tiny_cfg().dump())
    image_path = tmp_path / "sample.jpg"
    Image.fromarray(sample_images(2)[1][:, :, ::-1]).save(image_path)
    out = tmp_path / "export"

    tool = load_tool("export_model")
    code = tool.main([
        "--config-file", str(config), "--weights", str(weights_dir / "model.pth"), "--output", str(out),
        "--format", "torchscript", "onnx", "--sample-image", str(image_path), "--runs", "2", "--warmup", "1",
    ])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "[torchscript] OK" in printed and "[onnx] OK" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert report["input_sizes"] == [[94, 160]]  # 100x170, test resize with the long side capped at 160
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        result = report["exports"][fmt]
        assert result["ok"] and os.path.isfile(out / name)
        assert result["max_abs_diff_boxes"] <= 1e-2 and result["latency_ms"]["median"] > 0

    assert tool.main(["--config-file", str(config), "--output", str(out), "--sample-image", "missing.jpg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --sample-image 'missing.jpg' does not exist"]

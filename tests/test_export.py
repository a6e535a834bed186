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

from pgp_det import export, quantization
from pgp_det.benchmark import runtimes
from pgp_det.errors import UserInputError
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


# -- the ONNX file knows its model; int8; the runtimes behind detectron2's model interface --------


def test_onnx_file_is_refused_for_another_model_or_when_it_is_no_onnx(model, tensors, tmp_path):
    path = str(tmp_path / "model.onnx")
    export.export_onnx(model, tensors[0], path)
    assert export.check_onnx_file(path, model)[export.PRECISION_KEY] == "fp32"
    torch.manual_seed(1)
    other = build_model(tiny_cfg()).eval()  # same architecture, other weights
    with pytest.raises(UserInputError, match="was exported from another model"):
        export.check_onnx_file(path, other, "pruned")
    text = tmp_path / "notes.onnx"
    text.write_text("not a graph")
    with pytest.raises(UserInputError, match="is not an ONNX model"):
        export.check_onnx_file(str(text), model)
    with pytest.raises(UserInputError, match="does not exist"):
        export.check_onnx_file(str(tmp_path / "missing.onnx"), model)


@pytest.fixture(scope="module")
def int8_files(model, tensors, tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    float_path, int8_path = str(d / "model.onnx"), str(d / "model_int8.onnx")
    export.export_onnx(model, tensors[0], float_path)
    report = runtimes.quantize_and_check(float_path, int8_path, tensors, tensors, min_agreement=0.0, runs=1, warmup=0)
    return float_path, int8_path, report


def test_int8_quantizes_every_convolution_and_linear_layer_and_leaves_roi_pooling_and_nms_float(model, tensors,
                                                                                                int8_files):
    float_path, int8_path, report = int8_files
    calls = []  # per call: the shared RPN head runs once per FPN level

    def count(module, inputs, output):
        calls.append("Conv" if isinstance(module, torch.nn.Conv2d) else "Gemm")

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model([{"image": tensors[0]}])
    for hook in hooks:
        hook.remove()
    convs, linears = calls.count("Conv"), calls.count("Gemm")
    assert quantization.quantization_summary(float_path)["quantized"] == {}
    assert report["quantized"] == {"Conv": convs, "Gemm": linears}
    assert report["float"]["RoiAlign"] == 4 and report["float"]["NonMaxSuppression"] >= 1  # 4 FPN levels pooled
    assert set(report["float_reasons"]) == set(report["float"])
    assert export.onnx_metadata(int8_path)[export.PRECISION_KEY] == "int8"
    assert export.check_onnx_file(int8_path, model)  # keeps the model it came from
    assert os.path.getsize(int8_path) < 0.4 * os.path.getsize(float_path)


def test_int8_detections_follow_the_float_ones(int8_files, tensors):
    float_path, int8_path, report = int8_files
    float_session, int8_session = export.load_onnx(float_path), export.load_onnx(int8_path)
    for t in tensors:
        reference, quantized = export.run_onnx(float_session, t), export.run_onnx(int8_session, t)
        assert len(quantized["scores"]) > 0
        # every image: most of the float model's detections found again, same class, IoU >= 0.5
        assert runtimes.detection_agreement(reference, quantized, min_score=0.0) >= 0.5
    assert len(report["agreement_per_image"]) == len(tensors)


def test_quantizing_an_int8_file_again_is_refused(int8_files, tensors, tmp_path):
    with pytest.raises(UserInputError, match="already quantized"):
        quantization.quantize_onnx_int8(int8_files[1], str(tmp_path / "again.onnx"), tensors)


def test_detection_agreement_counts_same_class_overlaps_once():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    reference = {"boxes": boxes, "scores": np.array([0.9, 0.8], np.float32), "classes": np.array([1, 2])}
    assert runtimes.detection_agreement(reference, reference) == 1.0
    moved = dict(reference, boxes=boxes + np.array([[0, 0, 0, 0], [8, 8, 8, 8]], np.float32))
    assert runtimes.detection_agreement(reference, moved) == 0.5  # the second box overlaps by IoU 4/196
    other_class = dict(reference, classes=np.array([1, 3]))
    assert runtimes.detection_agreement(reference, other_class) == 0.5
    doubled = {"boxes": boxes[:1].repeat(2, 0), "scores": np.array([0.9, 0.9], np.float32), "classes": np.array([1, 1])}
    assert runtimes.detection_agreement(doubled, {k: v[:1] for k, v in doubled.items()}) == 0.5  # one match each
    weak = dict(reference, scores=np.array([0.3, 0.2], np.float32))
    assert runtimes.detection_agreement(weak, {k: v[:0] for k, v in reference.items()}) == 1.0  # nothing to find


@pytest.mark.parametrize("name", ["torchscript", "onnxruntime"])
def test_runtime_detects_as_the_eager_model_in_the_original_image_size(model, tmp_path, name):
    image = sample_images(2)[1]  # 100x170
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    inputs = [{"image": tensor, "height": 200, "width": 340}]  # mapped at half the original size
    deployed = runtimes.build_runtime(name, model, tiny_cfg(), runtimes.RuntimeSettings(str(tmp_path), tensor.float()))
    assert deployed.runtime_info["runtime"] == name and os.path.isfile(deployed.runtime_info["files"][0])
    with torch.no_grad():
        expected = model(inputs)[0]["instances"]
        got = deployed(inputs)[0]["instances"]
    assert got.image_size == (200, 340) and len(got) == len(expected) > 0
    assert torch.equal(got.pred_classes, expected.pred_classes)
    assert torch.allclose(got.pred_boxes.tensor, expected.pred_boxes.tensor, atol=2e-2)
    assert torch.allclose(got.scores, expected.scores, atol=1e-3)
    with pytest.raises(UserInputError, match="unknown runtime 'tensorrt'"):
        runtimes.build_runtime("tensorrt", model, tiny_cfg(), runtimes.RuntimeSettings(str(tmp_path), tensor.float()))


def _assert_detects_as_eager(model, deployed, images):
    """Each image (H, W, 3): ``deployed`` gives the eager ``model``'s detections."""
    for image in images:
        inputs = [{"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))}]
        with torch.no_grad():
            expected, got = model(inputs)[0]["instances"], deployed(inputs)[0]["instances"]
        assert len(got) == len(expected) > 0
        assert torch.equal(got.pred_classes, expected.pred_classes)
        assert torch.allclose(got.pred_boxes.tensor, expected.pred_boxes.tensor, atol=1e-2)
        assert torch.allclose(got.scores, expected.scores, atol=1e-3)


@pytest.mark.slow  # inductor compiles for a minute or more on a CPU
def test_cuda_graph_runtime_compiles_static_shapes_and_detects_as_the_eager_model(model, tmp_path):
    # on a CPU inductor compiles without capture: what is checked here is the compiled graphs'
    # outputs and the static shapes (a second size compiles its own graph rather than failing)
    deployed = runtimes.build_runtime("pytorch_cudagraphs", model, tiny_cfg(),
                                      runtimes.RuntimeSettings(str(tmp_path), torch.zeros(3, 64, 64)))
    assert deployed is not model and deployed.runtime_info["runtime"] == "pytorch_cudagraphs"
    # 128x160, 100x170, 128x160 again
    _assert_detects_as_eager(model, deployed, sample_images(2) + sample_images(1))


@pytest.mark.slow  # inductor compiles for a minute or more on a CPU
def test_compiled_runtime_detects_as_the_eager_model_at_two_sizes(model, tmp_path):
    compiled = runtimes.build_runtime("pytorch_compiled", model, tiny_cfg(),
                                      runtimes.RuntimeSettings(str(tmp_path), torch.zeros(3, 64, 64)))
    assert compiled is not model and compiled.runtime_info["provider"] == "inductor"
    # 128x160, then 100x170: the second runs the dynamic-shape graph
    _assert_detects_as_eager(model, compiled, sample_images(2))

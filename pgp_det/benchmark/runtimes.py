"""Runtimes a detector is measured in, by name (``RUNTIME_REGISTRY``): PyTorch eager, TorchScript,
ONNX Runtime (float) and ONNX Runtime int8 (:mod:`pgp_det.quantization`).

A runtime's builder turns a loaded detectron2 model into a module with detectron2's model
interface (a list of mapped input dicts -> ``[{"instances": Instances}]`` in each input's
``height`` x ``width``), so the same evaluator and the same timing loops measure every runtime:

* ``pytorch``: the eager model itself;
* ``pytorch_compiled``: the eager model with its dense parts compiled by ``torch.compile``;
* ``pytorch_cudagraphs``: the same compiled at static shapes and captured in CUDA graphs (GPU);
* ``torchscript``, ``onnxruntime``, ``onnxruntime_int8``: the exported graph
  (:mod:`pgp_det.export`: normalisation, padding, backbone, RPN, box head and NMS inside; image
  (3, h, w) in, boxes in its pixels out), fed each mapped input's image (resized as at test time
  by the test loader, as for the eager model), its boxes scaled back to the original image by
  detectron2's ``detector_postprocess``, as the eager model's are.

Each built module carries ``runtime_info``: the runtime's name, version, execution provider and
the files it runs.
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.registry import Registry
from torch import nn

from .. import export
from ..errors import UserInputError
from ..quantization import quantize_onnx_int8
from .timing import time_callable

__all__ = ["CUDA_ONLY", "IN_PYTORCH", "RUNTIME_REGISTRY", "RuntimeSettings", "ExportedDetector", "build_runtime", "runtime_names",
           "detection_agreement", "export_and_compare", "quantize_and_check"]

RUNTIME_REGISTRY = Registry("RUNTIME")
IN_PYTORCH = ("pytorch", "pytorch_compiled", "pytorch_cudagraphs")  # runtimes that run the detectron2 model itself
CUDA_ONLY = ("pytorch_cudagraphs",)  # runtimes measured on CUDA only
RUNTIME_REGISTRY.__doc__ = """Runtimes by name: ``fn(model, cfg, settings: RuntimeSettings) -> nn.Module`` with
``runtime_info`` (see the module docstring)."""


@dataclass
class RuntimeSettings:
    """What a runtime's builder needs besides the model.

    Attributes:
        workdir: folder the exported files are written to.
        sample: (3, H, W) float32 model input the graph is traced on.
        threads: CPU threads of the runtime (0: its own choice).
        calibration: (3, H, W) float32 model inputs int8 is calibrated on.
        calibration_method: see :data:`pgp_det.quantization.CALIBRATION_METHODS`.
        onnx_file: an ONNX file exported from this model (checked) to run instead of exporting.
    """

    workdir: str
    sample: torch.Tensor
    threads: int = 0
    calibration: List[torch.Tensor] = field(default_factory=list)
    calibration_method: str = "minmax"
    onnx_file: str = ""


def runtime_names() -> List[str]:
    return sorted(name for name, _ in RUNTIME_REGISTRY)


def build_runtime(name: str, model: nn.Module, cfg, settings: RuntimeSettings) -> nn.Module:
    """``model`` (a loaded detectron2 detector) in the runtime ``name``."""
    if name not in runtime_names():
        raise UserInputError(f"unknown runtime '{name}'; the runtimes are: {', '.join(runtime_names())}")
    return RUNTIME_REGISTRY.get(name)(model, cfg, settings)


class ExportedDetector(nn.Module):
    """An exported detector behind detectron2's model interface (see the module docstring).

    Args:
        run: (3, h, w) float32 image -> ``{"boxes" (N, 4), "scores" (N,), "classes" (N,)}`` numpy.
        runtime_info: name, version, provider, files.
    """

    def __init__(self, run: Callable[[torch.Tensor], Dict[str, np.ndarray]], runtime_info: dict):
        super().__init__()
        self._run = run
        self.runtime_info = runtime_info

    def forward(self, batched_inputs: List[dict]) -> List[dict]:
        results = []
        for x in batched_inputs:
            # converted in numpy: a torch op here would leave torch's OpenMP workers spinning on the
            # cores the runtime's threads are about to use (measured: +4-7 ms a call, 256x256, 2 threads)
            image = torch.from_numpy(x["image"].cpu().numpy().astype(np.float32))
            h, w = image.shape[1:]
            out = self._run(image)
            instances = Instances((h, w))
            instances.pred_boxes = Boxes(torch.as_tensor(out["boxes"], dtype=torch.float32).reshape(-1, 4))
            instances.scores = torch.as_tensor(out["scores"], dtype=torch.float32)
            instances.pred_classes = torch.as_tensor(out["classes"], dtype=torch.int64)
            results.append({"instances": detector_postprocess(instances, x.get("height", h), x.get("width", w))})
        return results


@RUNTIME_REGISTRY.register()
def pytorch(model, cfg, settings):
    """The eager model as loaded."""
    model.runtime_info = {"runtime": "pytorch", "version": torch.__version__, "provider": "eager",
                          "threads": torch.get_num_threads(), "files": []}
    return model


def _compile_dense_parts(model, dynamic: bool, **compile_options):
    """A copy of ``model`` whose backbone with FPN, RPN head and box head are ``torch.compile``-d;
    ``dynamic``: shapes dynamic, else static per input size."""
    import copy

    compiled = copy.deepcopy(model).eval()
    compiled.backbone = torch.compile(compiled.backbone, dynamic=dynamic, **compile_options)
    compiled.proposal_generator.rpn_head = torch.compile(compiled.proposal_generator.rpn_head, dynamic=dynamic,
                                                         **compile_options)
    # the box head's batch is the proposal count, which varies from image to image at any input
    # size: static shapes leave it to torch (static first, dynamic once a second count is seen)
    compiled.roi_heads.box_head = torch.compile(compiled.roi_heads.box_head, dynamic=True if dynamic else None,
                                                **compile_options)
    return compiled


@RUNTIME_REGISTRY.register()
def pytorch_compiled(model, cfg, settings):
    """A copy of the eager model whose dense parts (backbone with FPN, the RPN head's convolutions,
    the box head's fully connected layers) are ``torch.compile``-d (inductor, shapes dynamic so
    that every test image size runs the one compiled graph); anchors, proposal selection, ROI
    pooling and NMS stay eager. Compiling happens on the first calls (the warm-up)."""
    compiled = _compile_dense_parts(model, dynamic=True)
    compiled.runtime_info = {"runtime": "pytorch_compiled", "version": torch.__version__, "provider": "inductor",
                             "threads": torch.get_num_threads(), "files": []}
    return compiled


@RUNTIME_REGISTRY.register()
def pytorch_cudagraphs(model, cfg, settings):
    """The GPU deployment path: the dense parts as in ``pytorch_compiled``, compiled in inductor's
    ``reduce-overhead`` mode, which captures their kernels in CUDA graphs and replays each graph
    with one launch, so that batch-1 inference is not bound by the host launching kernels one by
    one. Shapes are static: each distinct input size (and batch size) is compiled and captured
    once, on its first calls (the box head's proposal count is left to torch's automatic dynamic
    shapes; each count seen is captured once), so deploy at one size (``--input-size``; evaluation on images of
    many sizes compiles each, up to torch's recompile limit, then runs those sizes eager). Outputs
    equal the eager model's; on a CPU inductor compiles without capture (the tools refuse this
    runtime off CUDA)."""
    compiled = _compile_dense_parts(model, dynamic=False, mode="reduce-overhead")
    on_gpu = any(p.is_cuda for p in model.parameters())
    compiled.runtime_info = {"runtime": "pytorch_cudagraphs", "version": torch.__version__,
                             "provider": "inductor + CUDA graphs" if on_gpu else "inductor (no CUDA: no capture)",
                             "threads": torch.get_num_threads(), "files": []}
    return compiled


@RUNTIME_REGISTRY.register()
def torchscript(model, cfg, settings):
    """The model traced to TorchScript (``model.ts``), run by torch's JIT."""
    path = export.export_torchscript(model, settings.sample, os.path.join(settings.workdir, "model.ts"))
    module = export.load_torchscript(path)
    return ExportedDetector(lambda image: export.run_torchscript(module, image), {
        "runtime": "torchscript", "version": torch.__version__, "provider": "torch.jit",
        "threads": torch.get_num_threads(), "files": [path]})


_EXPORTED = {}  # ONNX path -> fingerprint of the model this process exported there


def _float_onnx(model, settings) -> str:
    """The float ONNX file of ``model``: the one given (checked to be this model's), else the
    workdir's ``model.onnx`` when this process exported this model there (the onnxruntime
    runtime of the same row), else a new export there."""
    if settings.onnx_file:
        return settings.onnx_file
    path = os.path.join(settings.workdir, "model.onnx")
    fingerprint = export.model_fingerprint(model)
    if _EXPORTED.get(path) != fingerprint or not os.path.isfile(path):
        export.export_onnx(model, settings.sample, path)
        _EXPORTED[path] = fingerprint
    return path


def _onnxruntime_detector(path: str, name: str, settings) -> ExportedDetector:
    import onnxruntime as ort

    session = export.load_onnx(path, threads=settings.threads)
    return ExportedDetector(lambda image: export.run_onnx(session, image), {
        "runtime": name, "version": ort.__version__, "provider": session.get_providers()[0],
        "threads": settings.threads or "onnxruntime's choice", "files": [path]})


@RUNTIME_REGISTRY.register()
def onnxruntime(model, cfg, settings):
    """The float ONNX export (``model.onnx``) in an onnxruntime CPU session (graph optimisations on:
    batch norms folded, activations fused)."""
    return _onnxruntime_detector(_float_onnx(model, settings), "onnxruntime", settings)


@RUNTIME_REGISTRY.register()
def onnxruntime_int8(model, cfg, settings):
    """The ONNX export quantized to int8 (``model_int8.onnx``, :func:`pgp_det.quantization.quantize_onnx_int8`,
    calibrated on ``settings.calibration``) in an onnxruntime CPU session."""
    path = os.path.join(settings.workdir, "model_int8.onnx")
    report = quantize_onnx_int8(_float_onnx(model, settings), path, settings.calibration, settings.calibration_method)
    detector = _onnxruntime_detector(path, "onnxruntime_int8", settings)
    detector.runtime_info.update(precision="int8", quantization=report)
    return detector


def detection_agreement(reference: Dict[str, np.ndarray], other: Dict[str, np.ndarray], iou: float = 0.5,
                        min_score: float = 0.5) -> float:
    """Share of ``reference``'s detections scored >= ``min_score`` that ``other`` finds too: a
    detection of the same class with IoU >= ``iou`` (each of ``other``'s used once, best score
    first). 1.0 when the reference has none. For exports whose numbers may differ (int8)."""
    from detectron2.structures import pairwise_iou

    keep = reference["scores"] >= min_score
    ref_boxes, ref_classes = reference["boxes"][keep], reference["classes"][keep]
    if not len(ref_boxes):
        return 1.0
    if not len(other["boxes"]):
        return 0.0
    overlaps = pairwise_iou(Boxes(torch.as_tensor(ref_boxes, dtype=torch.float32)),
                            Boxes(torch.as_tensor(other["boxes"], dtype=torch.float32))).numpy()
    overlaps[ref_classes[:, None] != other["classes"][None, :]] = 0.0
    used, found = set(), 0
    for i in range(len(ref_boxes)):
        for j in np.argsort(-overlaps[i]):
            if overlaps[i, j] < iou:
                break
            if j not in used:
                used.add(j)
                found += 1
                break
    return found / len(ref_boxes)


def export_and_compare(fmt: str, model: nn.Module, tensors: Sequence[torch.Tensor], reference, path: str,
                       opset: int = 17, box_atol: float = 1e-2, score_atol: float = 1e-3, warmup: int = 3,
                       runs: int = 10, threads: int = 0) -> dict:
    """Export ``model`` to ``fmt`` (``"torchscript"`` or ``"onnx"``) at ``path``, reload it, compare
    it on every (3, H, W) tensor of ``tensors`` with ``reference`` (:func:`pgp_det.export.run_pytorch`
    outputs) and time it on the first (ms)."""
    if fmt == "torchscript":
        export.export_torchscript(model, tensors[0], path)
        module = export.load_torchscript(path)
        run = lambda t: export.run_torchscript(module, t)  # noqa: E731
    else:
        export.export_onnx(model, tensors[0], path, opset=opset)
        session = export.load_onnx(path, threads=threads)
        run = lambda t: export.run_onnx(session, t)  # noqa: E731
    checks = [export.compare_detections(ref, run(t), box_atol, score_atol) for ref, t in zip(reference, tensors)]
    latency = time_callable(lambda: run(tensors[0]), warmup=warmup, runs=runs)
    return {
        "path": path,
        "ok": all(c["ok"] for c in checks),
        "max_abs_diff_boxes": max(c["max_abs_diff_boxes"] for c in checks),
        "max_abs_diff_scores": max(c["max_abs_diff_scores"] for c in checks),
        "checks": checks,
        "latency_ms": latency.to_dict(),
    }


def quantize_and_check(float_path: str, int8_path: str, calibration: Sequence[torch.Tensor],
                       tensors: Sequence[torch.Tensor], method: str = "minmax", min_agreement: float = 0.9,
                       warmup: int = 3, runs: int = 10, threads: int = 0) -> dict:
    """Quantize the float ONNX detector at ``float_path`` to ``int8_path``
    (:func:`pgp_det.quantization.quantize_onnx_int8`, calibrated on ``calibration``) and check it
    against the float one on ``tensors``: per image, the share of the float model's detections
    (score >= 0.5) the int8 one finds (:func:`detection_agreement`); ``ok`` when the mean share is
    >= ``min_agreement``; the int8 model's latency on the first tensor (ms).

    Returns:
        the quantization report with ``agreement_per_image``, ``agreement``, ``ok``, ``latency_ms``.
    """
    report = quantize_onnx_int8(float_path, int8_path, calibration, method)
    float_session = export.load_onnx(float_path, threads=threads)
    int8_session = export.load_onnx(int8_path, threads=threads)
    shares = [detection_agreement(export.run_onnx(float_session, t), export.run_onnx(int8_session, t)) for t in tensors]
    latency = time_callable(lambda: export.run_onnx(int8_session, tensors[0]), warmup=warmup, runs=runs)
    mean = float(np.mean(shares))
    return {**report, "agreement_per_image": shares, "agreement": mean, "ok": mean >= min_agreement,
            "latency_ms": latency.to_dict()}

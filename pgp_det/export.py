"""Export a (pruned) Faster R-CNN to TorchScript and ONNX, and check the export against PyTorch.

What is exported: :class:`TensorDetector`, the detector as a function of one image tensor::

    image (3, H, W) float32, pixel values 0-255 in the model's INPUT.FORMAT channel order
        -> boxes (N, 4) float32 XYXY in the input tensor's pixels,
           scores (N,) float32, classes (N,) int64

i.e. ``GeneralizedRCNN.inference(..., do_postprocess=False)``: normalisation, padding to the
backbone's size divisibility, backbone, RPN, box head and per-class NMS are inside the graph;
resizing the image before (detectron2's test-time ``ResizeShortestEdge``, or :func:`letterbox`
for a fixed size) and scaling boxes back to the original image after are not.

How, and what holds on torch 2.x + detectron2 v0.6 (pure Python):

* Both formats are traced (``torch.jit.trace``; ``torch.onnx.export(dynamo=False)``, which
  traces too) on one image. Input height/width, the number of proposals and the number of
  detections stay dynamic in both: anchors, padding and box clipping follow the input's shape
  inside the graph (the ONNX input has dynamic height/width axes). Checked on sizes other than
  the tracing one, including sizes not divisible by 32; check new architectures the same way
  (``tools/export_model.py`` does).
* detectron2 v0.6's ``detectron2.export`` package imports caffe2 when imported, so its
  ``TracingAdapter`` cannot be imported here; :class:`TensorDetector` does the same flattening for
  Faster R-CNN, and :func:`traceable_len` keeps per-image proposal counts symbolic in the trace
  (Python's ``len()`` would freeze them to the tracing image's count).
* ONNX needs opset >= 16 (RoiAlign with ``half_pixel`` coordinates, i.e. ``aligned=True``).
  The TorchScript-based exporter (``dynamo=False``) is used: it records the traced graph as is,
  data-dependent shapes (NMS, per-level ROI assignment) included. The dynamo exporter, torch's
  default, needs the ``onnxscript`` package and a ``torch.export``-able model; neither is
  established for detectron2 v0.6 here, so it is not used.
* Batch size 1 only; float32 only (:mod:`pgp_det.quantization` makes an int8 copy of the ONNX
  file).
* The ONNX file records the model it was exported from (:func:`model_fingerprint`, in its
  metadata under ``pgp_det.fingerprint``), so a tool handed the file beside a config and weights
  can tell whether the two belong together (:func:`check_onnx_file`).
"""
import contextlib
import hashlib
import os
import warnings
from typing import Dict, Sequence

import numpy as np
import torch
from torch import nn

from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image

from .data import check_dataset_available, register_custom_datasets
from .errors import UserInputError
from .utils.io import atomic_write
from .utils.modules import TensorDetector

__all__ = [
    "check_images",
    "check_onnx_file",
    "read_user_image",
    "model_fingerprint",
    "onnx_metadata",
    "write_onnx_metadata",
    "FINGERPRINT_KEY",
    "PRECISION_KEY",
    "to_model_input",
    "OUTPUT_NAMES",
    "TensorDetector",
    "traceable_len",
    "letterbox",
    "export_torchscript",
    "export_onnx",
    "load_torchscript",
    "load_onnx",
    "run_pytorch",
    "run_torchscript",
    "run_onnx",
    "compare_detections",
]

OUTPUT_NAMES = ("boxes", "scores", "classes")


@contextlib.contextmanager
def traceable_len():
    """Make ``len(instances)`` in detectron2's box head return a traced size instead of an int.

    ``FastRCNNOutputLayers`` splits its predictions with ``[len(p) for p in proposals]``; the
    builtin converts to a Python int, which a trace records as a constant. Calling ``__len__``
    directly returns ``tensor.shape[0]``, which the tracer keeps symbolic.
    """
    from detectron2.modeling.roi_heads import fast_rcnn

    fast_rcnn.len = lambda obj: obj.__len__()  # module global shadows the builtin
    try:
        yield
    finally:
        del fast_rcnn.len


def letterbox(image_bgr: np.ndarray, height: int, width: int, pixel_mean: Sequence[float], input_format: str = "BGR"):
    """Fit an (h, w, 3) uint8 BGR image into a (3, height, width) float32 tensor for the export.

    Resizes keeping the aspect ratio (bilinear), pads bottom/right with ``pixel_mean`` (zero after
    normalisation, as detectron2's own padding), and orders channels as ``input_format``.

    Returns:
        (tensor, scale): boxes from the model divided by ``scale`` are in ``image_bgr``'s pixels.
    """
    from PIL import Image

    h, w = image_bgr.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = min(height, int(round(h * scale))), min(width, int(round(w * scale)))
    image = image_bgr[:, :, ::-1] if input_format == "RGB" else image_bgr
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR))
    mean = np.asarray(pixel_mean, dtype=np.float32).reshape(1, 1, 3)  # already in input_format order
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[...] = mean
    canvas[:new_h, :new_w] = resized
    return torch.from_numpy(canvas.transpose(2, 0, 1).copy()), scale


@contextlib.contextmanager
def _tracing(model: nn.Module):
    adapter = TensorDetector(model).eval()
    with torch.no_grad(), traceable_len(), warnings.catch_warnings():
        # tracer warnings flag Python values frozen into the graph; the ones left (anchor grid,
        # padding) are the documented fixed-input-size limitation
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.(jit|onnx)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.(jit|onnx)")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        yield adapter


def export_torchscript(model: nn.Module, image: torch.Tensor, path: str) -> str:
    """Trace ``model`` on ``image`` (3, H, W) and save TorchScript to ``path`` (atomically)."""
    with _tracing(model) as adapter:
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    return atomic_write(path, traced.save)


FINGERPRINT_KEY = "pgp_det.fingerprint"
PRECISION_KEY = "pgp_det.precision"  # "fp32", or "int8" (pgp_det.quantization)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of ``model``'s state: every tensor's name, shape, dtype and values, in order.
    Equal for two models only if they have the same architecture and the same weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_onnx_metadata(source: str, destination: str, entries: Dict[str, str]) -> None:
    """Save the ONNX model at ``source`` to ``destination`` (may be the same file, not atomic)
    with ``entries`` added to (or replacing those of) its ``metadata_props``."""
    import onnx

    proto = onnx.load(source)
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, destination)


def onnx_metadata(path: str) -> Dict[str, str]:
    """The ``metadata_props`` of the ONNX file at ``path``.

    Raises:
        UserInputError: the file does not exist or is not an ONNX model.
    """
    import onnx

    if not os.path.isfile(path):
        raise UserInputError(f"ONNX file '{path}' does not exist")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several kinds for a file that is not ONNX
        raise UserInputError(f"'{path}' is not an ONNX model ({type(e).__name__}); export one with "
                             "tools/export_model.py --format onnx") from None
    if not len(proto.graph.node):
        raise UserInputError(f"'{path}' is not an ONNX model (no graph); export one with tools/export_model.py --format onnx")
    return {p.key: p.value for p in proto.metadata_props}


def check_onnx_file(path: str, model: nn.Module, label: str = "") -> Dict[str, str]:
    """Refuse an ONNX file that was not exported from ``model`` (its recorded
    :func:`model_fingerprint` differs or is missing); returns the file's metadata.

    Raises:
        UserInputError: one line naming the file, the model and the fix.
    """
    metadata = onnx_metadata(path)
    recorded = metadata.get(FINGERPRINT_KEY)
    whose = f"model '{label}'" if label else "the given model"
    if recorded is None:
        raise UserInputError(f"ONNX file '{path}' does not record the model it was exported from; export "
                             f"{whose} again with tools/export_model.py --format onnx")
    if recorded != model_fingerprint(model):
        raise UserInputError(f"ONNX file '{path}' was exported from another model than {whose} (other weights or "
                             "architecture); export this model with tools/export_model.py --format onnx")
    return metadata


def export_onnx(model: nn.Module, image: torch.Tensor, path: str, opset: int = 17) -> str:
    """Export ``model`` traced on ``image`` (3, H, W) to ONNX at ``path`` (atomically).

    Inputs: ``image``; outputs :data:`OUTPUT_NAMES`, with a dynamic detection count.
    """
    if opset < 16:
        raise ValueError(f"opset {opset} < 16: RoiAlign with aligned=True needs opset 16 or later")
    fingerprint = model_fingerprint(model)

    def write(tmp):
        with _tracing(model) as adapter:
            torch.onnx.export(
                adapter,
                (image,),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in OUTPUT_NAMES}},
            )
        write_onnx_metadata(tmp, tmp, {FINGERPRINT_KEY: fingerprint, PRECISION_KEY: "fp32"})

    return atomic_write(path, write)


def load_torchscript(path: str):
    return torch.jit.load(path, map_location="cpu")


def load_onnx(path: str, threads: int = 0):
    """An onnxruntime CPU session for ``path``; ``threads``: its intra-op threads (0: onnxruntime's
    choice), one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _as_numpy(outputs) -> Dict[str, np.ndarray]:
    return {
        name: (value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value))
        for name, value in zip(OUTPUT_NAMES, outputs)
    }


def run_pytorch(model: nn.Module, image: torch.Tensor) -> Dict[str, np.ndarray]:
    """Reference detections of the eager model on the (3, H, W) tensor the export takes."""
    with torch.no_grad():
        return _as_numpy(TensorDetector(model).eval()(image))


def run_torchscript(module, image: torch.Tensor) -> Dict[str, np.ndarray]:
    with torch.no_grad():
        return _as_numpy(module(image))


def run_onnx(session, image: torch.Tensor) -> Dict[str, np.ndarray]:
    return _as_numpy(session.run(list(OUTPUT_NAMES), {"image": image.numpy()}))


def compare_detections(
    reference: Dict[str, np.ndarray], exported: Dict[str, np.ndarray], box_atol: float = 1e-2, score_atol: float = 1e-3
) -> dict:
    """Compare two sets of detections produced in the same order.

    Returns:
        ``{"num_reference", "num_exported", "classes_equal", "max_abs_diff_boxes" (pixels),
        "max_abs_diff_scores", "ok"}``. Differences are over the common prefix when counts differ;
        ``ok`` needs equal counts, equal classes and differences within the tolerances.
    """
    n_ref, n_exp = len(reference["scores"]), len(exported["scores"])
    n = min(n_ref, n_exp)

    def max_diff(key):
        if n == 0:
            return 0.0
        return float(np.max(np.abs(reference[key][:n].astype(np.float64) - exported[key][:n].astype(np.float64))))

    result = {
        "num_reference": n_ref,
        "num_exported": n_exp,
        "classes_equal": bool(n_ref == n_exp and np.array_equal(reference["classes"], exported["classes"])),
        "max_abs_diff_boxes": max_diff("boxes"),
        "max_abs_diff_scores": max_diff("scores"),
    }
    result["ok"] = bool(
        result["classes_equal"]
        and result["max_abs_diff_boxes"] <= box_atol
        and result["max_abs_diff_scores"] <= score_atol
    )
    return result


def read_user_image(path: str, what: str, fix: str) -> np.ndarray:
    """The (H, W, 3) uint8 BGR image at ``path``, a file a user named.

    Raises:
        UserInputError: ``"<what> '<path>' is not an image PIL can read (...); <fix>"``.
    """
    try:
        return read_image(path, format="BGR")
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise UserInputError(f"{what} '{path}' is not an image PIL can read ({type(e).__name__}); {fix}") from None


def check_images(cfg, sample_image: str = "", dataset: str = "", num_images: int = 4) -> list:
    """``[(name, (H, W, 3) uint8 BGR image)]`` to trace with (the first) and to check: the file
    ``sample_image``, else the first ``num_images`` images of ``dataset``.

    Raises:
        UserInputError: the file is missing or not an image; the dataset is unavailable or empty.
    """
    if sample_image:
        if not os.path.isfile(sample_image):
            raise UserInputError(f"--sample-image '{sample_image}' does not exist")
        return [(sample_image, read_user_image(sample_image, "--sample-image", "give a JPEG or PNG file"))]
    register_custom_datasets(cfg)
    check_dataset_available(dataset)
    dicts = DatasetCatalog.get(dataset)[:num_images]
    if not dicts:
        raise UserInputError(f"dataset '{dataset}' has no images")
    return [(d["file_name"], read_image(d["file_name"], format="BGR")) for d in dicts]


def to_model_input(cfg, image, size=None) -> torch.Tensor:
    """(H, W, 3) uint8 BGR -> (3, h, w) float32 in INPUT.FORMAT order: letterboxed to ``size``,
    else resized as detectron2 does at test time."""
    if size is not None:
        return letterbox(image, *size, cfg.MODEL.PIXEL_MEAN, cfg.INPUT.FORMAT)[0]
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    resized = resize.get_transform(image).apply_image(image)
    if cfg.INPUT.FORMAT == "RGB":
        resized = resized[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()

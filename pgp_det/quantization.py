"""Static int8 quantization of an exported detector (:mod:`pgp_det.export`'s ONNX graph).

What :func:`quantize_onnx_int8` makes, with onnxruntime's quantization tools:

* QDQ format: ``QuantizeLinear``/``DequantizeLinear`` pairs around the quantized operators, which
  onnxruntime fuses into integer kernels when the session is built (and which TensorRT reads as
  explicit int8 precision);
* the operators quantized are the convolutions and the fully connected layers (``Conv``,
  ``Gemm``, ``MatMul``): weights int8 per output channel (symmetric), activations uint8 per
  tensor, their ranges calibrated (min/max by default) on images resized as at test time;
* everything else stays float, and :func:`quantization_summary` counts it: ROI pooling
  (``RoiAlign``), the top-k and NMS selections, box decoding and clipping (the coordinates must
  stay exact to the pixel, and onnxruntime has no int8 kernels for those operators), and the
  FPN's sums, upsampling and pooling (little compute, and keeping them float spares a
  re-quantization of every FPN level).

The int8 file keeps the float file's :data:`~pgp_det.export.FINGERPRINT_KEY` (the model it was
exported from) and records ``pgp_det.precision = int8``.
"""
import os
import shutil
import tempfile
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .errors import UserInputError
from .export import FINGERPRINT_KEY, PRECISION_KEY, onnx_metadata, read_user_image, write_onnx_metadata
from .utils.io import atomic_write

__all__ = ["QUANTIZED_OP_TYPES", "CALIBRATION_METHODS", "calibration_images", "quantize_onnx_int8",
           "quantization_summary"]

QUANTIZED_OP_TYPES = ("Conv", "Gemm", "MatMul")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# the operators left in float, by family, and why (reported with their counts)
FLOAT_REASONS = {
    "RoiAlign": "ROI pooling: no int8 kernel in onnxruntime; its sampling coordinates stay float",
    "NonMaxSuppression": "selection by IoU of float boxes",
    "TopK": "selection of the best-scored anchors and detections",
    "Add": "FPN top-down sums and box decoding: little compute, no re-quantization of the FPN levels",
    "Resize": "FPN upsampling: little compute",
    "MaxPool": "FPN's extra level: little compute",
}


def calibration_images(cfg, count: int, image_dir: str = "", dataset: str = "") -> List[Tuple[str, np.ndarray]]:
    """``[(name, (H, W, 3) uint8 BGR image)]``: the first ``count`` images (sorted by file name) of
    the folder ``image_dir``, else of ``dataset`` (default: the config's ``DATASETS.TRAIN[0]``).

    Raises:
        UserInputError: ``count`` < 1, the folder is missing, holds no image files or a file that
            is not an image, or the dataset is unavailable or empty.
    """
    from detectron2.data import DatasetCatalog

    from .data import check_dataset_available, register_custom_datasets

    if count < 1:
        raise UserInputError(f"--calibration-images {count}: calibrate on at least 1 image")
    if image_dir:
        if not os.path.isdir(image_dir):
            raise UserInputError(f"--calibration-dir '{image_dir}' is not a folder")
        files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_SUFFIXES))[:count]
        if not files:
            raise UserInputError(f"--calibration-dir '{image_dir}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        paths = [os.path.join(image_dir, f) for f in files]
    else:
        register_custom_datasets(cfg)
        dataset = dataset or (cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else "")
        if not dataset:
            raise UserInputError("no calibration images: the config has no DATASETS.TRAIN; pass --calibration-dir DIR")
        check_dataset_available(dataset)
        paths = [d["file_name"] for d in DatasetCatalog.get(dataset)[:count]]
        if not paths:
            raise UserInputError(f"calibration dataset '{dataset}' has no images")
    return [(path, read_user_image(path, "calibration image", "remove it or give another --calibration-dir"))
            for path in paths]


def quantization_summary(path: str) -> Dict[str, Dict[str, int]]:
    """Count the operators of an ONNX graph (subgraphs included) that run quantized (a ``Conv``,
    ``Gemm`` or ``MatMul`` whose input and weight both come from ``DequantizeLinear``) and the
    compute operators left in float, by operator type (shape plumbing, elementwise box
    arithmetic and the Q/DQ nodes themselves are not counted).

    Returns:
        ``{"quantized": {op_type: count}, "float": {op_type: count}}``
    """
    import onnx

    def nodes(graph):  # with those of subgraphs (If branches)
        for node in graph.node:
            yield node
            for attribute in node.attribute:
                for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    yield from nodes(sub)

    every = list(nodes(onnx.load(path).graph))
    produced_by = {out: node.op_type for node in every for out in node.output}
    quantized, left_float = Counter(), Counter()
    for node in every:
        if node.op_type in QUANTIZED_OP_TYPES:
            # an integer kernel: its input and weight are both dequantized (they fuse when the session is built)
            inputs = [i for i in node.input[:2] if i]
            is_quantized = all(produced_by.get(i) == "DequantizeLinear" for i in inputs)
            (quantized if is_quantized else left_float)[node.op_type] += 1
        elif node.op_type in FLOAT_REASONS:
            left_float[node.op_type] += 1
    return {"quantized": dict(sorted(quantized.items())), "float": dict(sorted(left_float.items()))}


def quantize_onnx_int8(float_path: str, int8_path: str, tensors: Sequence[torch.Tensor],
                       method: str = "minmax", per_channel: bool = True) -> dict:
    """Write the int8 QDQ copy of the float ONNX detector at ``float_path`` to ``int8_path``
    (atomically), calibrated on ``tensors`` ((3, H, W) float32 model inputs, as
    :func:`pgp_det.export.to_model_input` makes them).

    Returns:
        the settings and :func:`quantization_summary` of the written file, with the reason each
        float operator type stayed float.
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class TensorReader(CalibrationDataReader):
        def __init__(self):
            self._tensors = iter(tensors)

        def get_next(self):
            tensor = next(self._tensors, None)
            return None if tensor is None else {"image": tensor.numpy()}

    if method not in CALIBRATION_METHODS:
        raise UserInputError(f"calibration method '{method}' is not one of {', '.join(CALIBRATION_METHODS)}")
    if not tensors:
        raise UserInputError("no calibration images: int8 needs at least one")
    metadata = onnx_metadata(float_path)
    if metadata.get(PRECISION_KEY, "fp32") != "fp32":
        raise UserInputError(f"'{float_path}' is already quantized ({metadata[PRECISION_KEY]}): give the float export")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    work = tempfile.mkdtemp(prefix="pgp_det_int8_")
    try:
        prepared = os.path.join(work, "prepared.onnx")
        # constant folding and shape inference first, as onnxruntime advises; its symbolic shape
        # inference does not follow the data-dependent shapes of NMS and ROI assignment
        quant_pre_process(float_path, prepared, skip_symbolic_shape=True)

        def write(tmp):
            quantize_static(prepared, tmp, TensorReader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=calibrate)
            write_onnx_metadata(tmp, tmp, {FINGERPRINT_KEY: metadata.get(FINGERPRINT_KEY, ""), PRECISION_KEY: "int8"})

        atomic_write(int8_path, write)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = quantization_summary(int8_path)
    return {
        "path": int8_path,
        "format": "QDQ",
        "weights": "int8, per output channel" if per_channel else "int8, per tensor",
        "activations": "uint8, per tensor",
        "calibration": {"method": method, "images": len(tensors)},
        **summary,
        "float_reasons": {op: FLOAT_REASONS[op] for op in summary["float"] if op in FLOAT_REASONS},
    }

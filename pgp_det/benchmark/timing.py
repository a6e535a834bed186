"""Wall-clock timing of callables and of a Faster R-CNN detector, whole and stage by stage.

All times are milliseconds of wall-clock time (``time.perf_counter``). On CUDA every timed
interval starts and ends with ``torch.cuda.synchronize()`` so queued kernels are counted where
they run, not where they were launched.
"""
import contextlib
import functools
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.modeling.postprocessing import detector_postprocess

from ..utils.allocator import freed_memory_kept

__all__ = [
    "TimingStats",
    "DetectorLatency",
    "time_callable",
    "measure_detector_latency",
    "time_dataset_images",
    "time_dataset_images_in_turn",
    "environment_info",
    "precision_context",
    "image_to_input",
    "synthetic_image",
    "STAGES",
]

# Stages of GeneralizedRCNN inference, in execution order.
STAGES = ("preprocess", "backbone_fpn", "rpn", "roi_heads", "postprocess")


@dataclass
class TimingStats:
    """Summary of repeated timings; every figure in milliseconds except ``fps`` (1000 / median)."""

    median: float
    p90: float
    mean: float
    min: float
    max: float
    fps: float
    samples: List[float] = field(repr=False)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "TimingStats":
        if len(samples_ms) == 0:
            raise ValueError("at least one timing sample is needed")
        s = np.asarray(samples_ms, dtype=np.float64)
        median = float(np.median(s))
        return cls(
            median=median,
            # linear interpolation keeps min <= median <= p90 <= max
            p90=float(np.percentile(s, 90)),
            mean=float(s.mean()),
            min=float(s.min()),
            max=float(s.max()),
            fps=1000.0 / median if median > 0 else float("inf"),
            samples=[float(x) for x in s],
        )

    def to_dict(self, with_samples: bool = True) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


@dataclass
class DetectorLatency:
    """Latency of a detector's calls on one input size (ms per call of ``batch_size`` images).

    Attributes:
        whole: the model's own ``forward`` (as ``DefaultPredictor`` would call it, minus resizing).
        stages: stage name (see :data:`STAGES`) -> stats of that stage run on its own, in sequence.
        input_size: (height, width) of the tensor fed to the network, pixels.
        environment: see :func:`environment_info`.
        batch_size: images per call.
    """

    whole: TimingStats
    stages: Dict[str, TimingStats]
    input_size: Tuple[int, int]
    dtype: str
    environment: dict
    batch_size: int = 1

    def to_dict(self, with_samples: bool = True) -> dict:
        return {
            "whole": self.whole.to_dict(with_samples),
            "stages": {k: v.to_dict(with_samples) for k, v in self.stages.items()},
            "input_size": list(self.input_size),
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "environment": self.environment,
        }


def time_callable(
    fn: Callable[[], object], warmup: int = 3, runs: int = 10, sync: Optional[Callable[[], None]] = None
) -> TimingStats:
    """Call ``fn()`` ``warmup`` times untimed, then ``runs`` times timed.

    Args:
        sync: called before starting and before stopping each clock (e.g. ``torch.cuda.synchronize``),
            so asynchronous work is counted.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    return TimingStats.from_samples([_time_once(fn, sync) for _ in range(runs)])


def _time_once(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Milliseconds one ``fn()`` takes, with ``sync()`` before starting and before stopping."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000.0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=None)  # asked once per process, not once per timed row
def _gpu_driver() -> Optional[str]:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it, else None."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def environment_info(device: Union[str, torch.device] = "cpu") -> dict:
    """What a timing depends on: device name (and on CUDA the CUDA version and the GPU driver's),
    thread count, library versions and whether freed memory is kept (:mod:`~pgp_det.utils.allocator`)."""
    import detectron2
    import torchvision

    device = torch.device(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_name()
    return {
        "device": str(device),
        "device_name": device_name,
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "gpu_driver": _gpu_driver() if device.type == "cuda" else None,
        "freed_memory_kept": freed_memory_kept(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _check_dtype(dtype: str, device: torch.device) -> None:
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be 'fp32' or 'fp16', got {dtype!r}")
    if dtype == "fp16" and device.type != "cuda":
        raise ValueError("fp16 timing needs a CUDA device: CPU half-precision kernels are not representative")


def precision_context(dtype: str, device: Union[str, torch.device]):
    """Context under which inference runs in ``dtype``.

    fp16 uses CUDA autocast rather than ``model.half()``: detectron2 mixes float32 anchors and
    box arithmetic with network outputs, which autocast reconciles per op.
    """
    device = torch.device(device)
    _check_dtype(dtype, device)
    if dtype == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _sync_for(device: torch.device) -> Optional[Callable[[], None]]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def image_to_input(image: np.ndarray, input_format: str, device: torch.device) -> dict:
    """(H, W, 3) uint8 BGR image -> detectron2 model input dict at the image's own size."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) BGR image, got shape {image.shape}")
    if input_format == "RGB":
        image = image[:, :, ::-1]
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).to(device)
    return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A reproducible (height, width, 3) uint8 noise image, for timing when no real image is given."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _run_stages(model, inputs: List[dict], sync: Callable[[], None], clock: Dict[str, float]):
    """One inference through GeneralizedRCNN's parts; sets ``clock[stage]`` to each stage's ms."""
    sync()
    t0 = time.perf_counter()
    images = model.preprocess_image(inputs)
    sync()
    t1 = time.perf_counter()
    features = model.backbone(images.tensor)
    sync()
    t2 = time.perf_counter()
    proposals, _ = model.proposal_generator(images, features, None)
    sync()
    t3 = time.perf_counter()
    instances, _ = model.roi_heads(images, features, proposals, None)
    sync()
    t4 = time.perf_counter()
    results = [
        {"instances": detector_postprocess(r, x.get("height", s[0]), x.get("width", s[1]))}
        for r, x, s in zip(instances, inputs, images.image_sizes)
    ]
    sync()
    t5 = time.perf_counter()
    for name, (a, b) in zip(STAGES, [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)]):
        clock[name] = (b - a) * 1000.0
    return results


def measure_detector_latency(
    model: torch.nn.Module,
    image_or_size: Union[np.ndarray, Tuple[int, int]],
    device: Union[str, torch.device] = "cpu",
    dtype: str = "fp32",
    warmup: int = 3,
    runs: int = 10,
    batch_size: int = 1,
) -> DetectorLatency:
    """Latency of one call of a GeneralizedRCNN detector on ``batch_size`` images, whole and per stage.

    Args:
        model: a detectron2 ``GeneralizedRCNN`` (with a proposal generator); moved to ``device``
            and put in eval mode.
        image_or_size: an (H, W, 3) uint8 BGR image fed as is (no resizing), or (H, W) for a
            reproducible noise image of that size.
        dtype: "fp32", or "fp16" (CUDA autocast; CUDA only).
        batch_size: images per call (the image repeated); every figure is per call, in ms.

    The stage figures time ``preprocess_image``, ``backbone`` (bottom-up + FPN),
    ``proposal_generator``, ``roi_heads`` and ``detector_postprocess`` called one after the other;
    their sum is close to, and normally a little above, ``whole`` (per-stage clocks and syncs).
    """
    device = torch.device(device)
    _check_dtype(dtype, device)
    if getattr(model, "proposal_generator", None) is None or not hasattr(model, "roi_heads"):
        raise ValueError("stage timing needs a two-stage detector with proposal_generator and roi_heads")
    if isinstance(image_or_size, np.ndarray):
        image = image_or_size
    else:
        height, width = (int(v) for v in image_or_size)
        image = synthetic_image(height, width)
    model = model.to(device).eval()
    inputs = [image_to_input(image, getattr(model, "input_format", "BGR"), device)] * batch_size
    sync = _sync_for(device) or (lambda: None)

    whole_ms: List[float] = []
    per_stage: Dict[str, List[float]] = {name: [] for name in STAGES}
    clock: Dict[str, float] = {}
    with torch.no_grad(), precision_context(dtype, device):
        for _ in range(warmup):
            model(inputs)
            _run_stages(model, inputs, sync, clock)
        # whole and staged runs alternate so both see the same machine load
        for _ in range(runs):
            whole_ms.append(_time_once(lambda: model(inputs), sync))
            _run_stages(model, inputs, sync, clock)
            for name in STAGES:
                per_stage[name].append(clock[name])
    return DetectorLatency(
        whole=TimingStats.from_samples(whole_ms),
        stages={name: TimingStats.from_samples(v) for name, v in per_stage.items()},
        input_size=(image.shape[0], image.shape[1]),
        dtype=dtype,
        environment=environment_info(device),
        batch_size=batch_size,
    )


def time_dataset_images(
    model: torch.nn.Module,
    inputs: Sequence[dict],
    device: Union[str, torch.device] = "cpu",
    dtype: str = "fp32",
    warmup: int = 3,
) -> TimingStats:
    """Latency over real, already mapped inputs (as ``build_detection_test_loader`` yields them).

    The first input is run ``warmup`` times untimed; then every input is timed once, batch 1,
    so the figure reflects the dataset's own sizes and object counts.
    """
    return TimingStats.from_samples(time_dataset_images_in_turn([(model, inputs)], device, dtype, warmup)[0])


def time_dataset_images_in_turn(
    models: Sequence[Tuple[torch.nn.Module, Sequence[dict]]],
    device: Union[str, torch.device] = "cpu",
    dtype: str = "fp32",
    warmup: int = 3,
) -> List[List[float]]:
    """``samples[m][i]``: milliseconds of model ``m`` on its ``i``-th input, batch 1; ``models``:
    ``(model, mapped inputs)`` pairs with as many inputs each (the same images, mapped for each
    model's config).

    Each model's first input is run ``warmup`` times untimed. With one model every input is then
    timed once. With several, each image is run by every model in turn, each one call untimed
    then one timed (the other models' weights have left the caches meanwhile): models timed on
    the same image see the device in the same state, so their ratio holds when its speed drifts.
    """
    device = torch.device(device)
    _check_dtype(dtype, device)
    counts = {len(inputs) for _, inputs in models}
    if not models or counts == {0}:
        raise ValueError("no inputs to time")
    if len(counts) > 1:
        raise ValueError(f"every model needs as many inputs, got {sorted(counts)}")
    sync = _sync_for(device) or (lambda: None)
    prepared = [(model.to(device).eval(), [dict(x, image=x["image"].to(device)) for x in inputs])
                for model, inputs in models]
    samples: List[List[float]] = [[] for _ in prepared]
    with torch.no_grad(), precision_context(dtype, device):
        for model, inputs in prepared:
            for _ in range(warmup):
                model([inputs[0]])
        for i in range(counts.pop()):
            for m, (model, inputs) in enumerate(prepared):
                if len(prepared) > 1:
                    model([inputs[i]])
                samples[m].append(_time_once(lambda: model([inputs[i]]), sync))
    return samples

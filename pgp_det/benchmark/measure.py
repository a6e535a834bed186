"""Measuring detectors for ``tools/eval_map_fps.py``: its options and their checks
(:func:`add_measurement_arguments`, :func:`check_measurement_options`; ``tools/sweep.py`` checks
its ``--eval-args`` with :func:`check_eval_arguments`), which models and test-time settings to
measure (:class:`ModelSpec`, ``--sweep`` grids), their checks and loading (:func:`prepare_model`),
and every figure of one model (:func:`benchmark_model`: mAP, latency, FLOPs, size).

``settings`` arguments are the tool's parsed options: any object with the attributes
``opts``, ``register_voc``, ``register_coco``, ``device``, ``dataset``, ``skip_eval``,
``dataset_images``, ``input_size``, ``fp16``, ``warmup``, ``runs``, ``batch_size``, ``trust_weights``,
``runtime``, ``calibration_images``, ``calibration_dir``, ``calibration_method`` and ``onnx``.

Every model is measured in each runtime of ``--runtime`` (:mod:`.runtimes`): the same mAP path
(the test loader's resize, detectron2's box scaling) and the same timing loops, one row per
(model, runtime); the exported files go to ``<output>/exports/<label>/``.
"""
import argparse
import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import build_detection_test_loader
from detectron2.data.detection_utils import read_image
from detectron2.evaluation import inference_on_dataset

from .. import export
from ..checkpoint import load_model
from ..modeling.fold_norms import fold_norms
from ..config import load_config
from ..data import add_dataset_arguments, check_dataset_available, check_num_classes, register_custom_datasets
from ..errors import UserInputError
from ..evaluation import build_evaluator
from ..quantization import CALIBRATION_METHODS, calibration_images
from ..utils.cli import add_keep_freed_memory_argument, add_trust_argument, parse_input_size
from .flops import FAMILIES, count_flops
from .report import pareto_front
from .runtimes import CUDA_ONLY, IN_PYTORCH, ExportedDetector, RuntimeSettings, build_runtime, runtime_names
from .timing import (
    STAGES, TimingStats, image_to_input, measure_detector_latency, precision_context, synthetic_image, time_callable,
    time_dataset_images, time_dataset_images_in_turn,
)

__all__ = [
    "ModelSpec", "PreparedModel", "add_measurement_arguments", "benchmark_model", "check_eval_arguments",
    "check_measurement_options", "expand_sweeps", "headline_metrics", "mark_pareto_front", "parse_model_spec",
    "parse_sweeps", "prepare_model", "run_dir_spec",
]

SEED = 0  # of the noise image used when no dataset image is at hand


@dataclass
class ModelSpec:
    label: str
    config: str
    weights: Optional[str]  # None: the config's MODEL.WEIGHTS
    overrides: Tuple[str, ...] = ()  # test-time KEY VALUE pairs of one --sweep point


def add_measurement_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tools/eval_map_fps.py`` besides its models and ``--output``, and its
    trailing ``KEY VALUE`` overrides (added last). ``tools/sweep.py`` parses its ``--eval-args``
    with them too, to check them before anything trains."""
    parser.add_argument("--dataset", default="",
                        help="dataset to evaluate and time on (default: the config's DATASETS.TEST[0])")
    parser.add_argument("--input-size", default="", metavar="HxW",
                        help="fixed timing/FLOPs input (default: MIN_SIZE_TEST square of each config)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fp16", action="store_true", help="half precision (CUDA autocast), for mAP and timing")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--runs", type=int, default=20, help="timed runs at the fixed input size")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="images per timed call at the fixed size (the fixed image N times; latency is per "
                             "call, FPS images per second); the dataset images are timed batch 1 (the PyTorch "
                             "runtimes only: the exported graphs take one image)")
    parser.add_argument("--dataset-images", type=int, default=20, metavar="N",
                        help="time the first N dataset images once each (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-eval", action="store_true", help="only time and count; no mAP")
    parser.add_argument("--fold-norms", action="store_true",
                        help="fold frozen/eval batch norms into their convolutions first, as a runtime does "
                             "(pgp_det.modeling.fold_norms)")
    parser.add_argument("--runtime", nargs="+", default=["pytorch"], choices=runtime_names(), metavar="RUNTIME",
                        help="measure every model in each of these runtimes, one row each: "
                             + ", ".join(runtime_names()) + " (default: pytorch, i.e. eager)")
    parser.add_argument("--onnx", action="append", default=[], metavar="LABEL=PATH",
                        help="run this float ONNX file, exported from model LABEL, in the onnxruntime runtimes "
                             "instead of exporting the model (checked to be that model's)")
    parser.add_argument("--calibration-images", type=int, default=32, metavar="N",
                        help="onnxruntime_int8: calibrate on the first N images of each config's DATASETS.TRAIN[0]")
    parser.add_argument("--calibration-dir", default="", metavar="DIR",
                        help="onnxruntime_int8: calibrate on this folder's images instead")
    parser.add_argument("--calibration-method", default="minmax", choices=CALIBRATION_METHODS)
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="measure every model at each value of a test-time config key (repeatable: all "
                             "combinations), e.g. MODEL.RPN.POST_NMS_TOPK_TEST=300,100,50 or INPUT.MIN_SIZE_TEST=256,192; "
                             "every point goes on the plots and the Pareto front")
    parser.add_argument("--reference", default="", metavar="LABEL",
                        help="a model's label: every model is timed on the dataset images in turn with it (at its "
                             "config's own settings) and gets a speedup column, which a drift of the device's speed "
                             "leaves out")
    add_dataset_arguments(parser)
    add_keep_freed_memory_argument(parser)
    add_trust_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE config overrides applied to every model")


def check_device_options(device: str, fp16: bool) -> None:
    """Refuse ``--device cuda`` without CUDA and ``--fp16`` off CUDA (one line each)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: CUDA is not available on this machine")
    if fp16 and device != "cuda":
        raise UserInputError("--fp16 needs --device cuda (CPU half precision is not a meaningful speed figure)")


def check_measurement_options(args) -> None:
    """Reject the options of :func:`add_measurement_arguments` that are bad whatever the models
    (one line each)."""
    check_device_options(args.device, args.fp16)
    exported = [r for r in args.runtime if r not in IN_PYTORCH]
    if exported and (args.device != "cpu" or args.fp16):
        raise UserInputError(f"--runtime {' '.join(exported)} is measured on the CPU in fp32 here: drop --device cuda "
                             "and --fp16, or measure those runtimes in a run of their own")
    cuda_only = [r for r in args.runtime if r in CUDA_ONLY]
    if cuda_only and args.device != "cuda":
        raise UserInputError(f"--runtime {' '.join(cuda_only)} captures CUDA graphs: add --device cuda")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size {args.batch_size}: time at least 1 image per call")
    if args.batch_size > 1 and exported:
        raise UserInputError(f"--batch-size {args.batch_size}: the exported graphs of --runtime {' '.join(exported)} "
                             "take one image; time batches in the pytorch runtimes, in a run of their own")
    if len(set(args.runtime)) != len(args.runtime):
        raise UserInputError(f"--runtime names a runtime twice: {' '.join(args.runtime)}")
    onnx_files = parse_onnx_files(args.onnx)
    if onnx_files and not any(r.startswith("onnxruntime") for r in args.runtime):
        raise UserInputError("--onnx gives a file to the onnxruntime runtimes: add onnxruntime to --runtime")
    if onnx_files and args.sweep:
        raise UserInputError("--onnx and --sweep: a --sweep point changes test-time settings the ONNX graph holds; "
                             "let each point be exported (drop --onnx)")
    if "onnxruntime_int8" in args.runtime and args.calibration_images < 1:
        raise UserInputError(f"--calibration-images {args.calibration_images}: calibrate on at least 1 image")
    if args.input_size:
        parse_input_size(args.input_size)
    if args.runs < 1 or args.warmup < 0 or args.dataset_images < 0 or args.threads < 0:
        raise UserInputError("--runs must be >= 1; --warmup, --dataset-images and --threads >= 0")
    if args.reference and args.dataset_images < 1:
        raise UserInputError("--reference times the models on dataset images: pass --dataset-images N with N >= 1")
    parse_sweeps(args.sweep)


def check_eval_arguments(argv: List[str], config_path: str, labels: List[str], opts=()) -> None:
    """Check ``tools/sweep.py``'s ``--eval-args`` (``argv``) before its first run trains, as
    ``tools/eval_map_fps.py`` will check them on the runs: the options
    (:func:`check_measurement_options`), ``--reference`` among the runs' ``labels``, and the
    config ``config_path`` with the sweep's ``opts``, the measurement's overrides and each
    ``--sweep`` point (:func:`build_cfg`, and the timing size of :func:`_check_timing_size`).

    Raises:
        UserInputError: one line, naming ``--eval-args``.
    """
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserInputError(f"--eval-args: {message}")

    parser = Parser(prog="eval_map_fps.py", add_help=False)
    add_measurement_arguments(parser)
    args = parser.parse_args(argv)
    try:
        check_measurement_options(args)
        if args.reference and args.reference not in labels:
            raise UserInputError(f"--reference '{args.reference}' is not a run's label; the labels are: "
                                 f"{', '.join(labels)}")
        # every run's config is this one with the sweep's opts: the first run's label names the
        # point that fails
        args.opts = [*opts, *args.opts]
        for point in expand_sweeps(ModelSpec(labels[0] if labels else "", config_path, None), parse_sweeps(args.sweep)):
            _check_timing_size(build_cfg(point, args), args, point.label)
    except UserInputError as e:
        raise UserInputError(f"--eval-args: {e}") from None


def parse_onnx_files(texts: List[str]) -> Dict[str, str]:
    """``["LABEL=PATH", ...]`` -> ``{LABEL: PATH}`` (the files are checked against their models
    when those are loaded, :func:`prepare_model`)."""
    files = {}
    for text in texts:
        label, sep, path = text.partition("=")
        if not sep or not label or not path:
            raise UserInputError(f"--onnx '{text}': expected LABEL=PATH, e.g. pruned=export/pruned/model.onnx")
        if label in files:
            raise UserInputError(f"--onnx gives model '{label}' two files")
        files[label] = path
    return files


def parse_sweeps(texts: List[str]) -> List[Tuple[str, List[str]]]:
    """``["KEY=v1,v2", ...]`` -> ``[(KEY, [v1, v2]), ...]``."""
    sweeps = []
    for text in texts:
        key, sep, values = text.partition("=")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not values:
            raise UserInputError(f"--sweep '{text}': expected KEY=VALUE1,VALUE2,... e.g. MODEL.RPN.POST_NMS_TOPK_TEST=300,100")
        if key in [k for k, _ in sweeps]:
            raise UserInputError(f"--sweep: {key} is swept twice; give all its values in one --sweep")
        sweeps.append((key, values))
    return sweeps


def expand_sweeps(spec: ModelSpec, sweeps: List[Tuple[str, List[str]]]) -> List[ModelSpec]:
    """One spec per point of the grid of ``sweeps`` (all combinations), labelled by its values."""
    if not sweeps:
        return [spec]
    points = []
    for values in itertools.product(*(v for _, v in sweeps)):
        overrides = tuple(x for key, value in zip((k for k, _ in sweeps), values) for x in (key, value))
        tag = ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for (key, _), value in zip(sweeps, values))
        points.append(dataclasses.replace(spec, label=f"{spec.label}[{tag}]", overrides=overrides))
    return points


def parse_model_spec(text: str) -> ModelSpec:
    """``LABEL=CONFIG_FILE[:WEIGHTS]`` -> ModelSpec."""
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise UserInputError(f"--model '{text}': expected LABEL=CONFIG_FILE[:WEIGHTS]")
    config, _, weights = rest.partition(":")
    return ModelSpec(label, config, weights or None)


def run_dir_spec(directory: str) -> ModelSpec:
    """A training output folder: its config.yaml and model_final.pth, labelled by the folder name."""
    config, weights = os.path.join(directory, "config.yaml"), os.path.join(directory, "model_final.pth")
    for path in (config, weights):
        if not os.path.isfile(path):
            raise UserInputError(f"--run-dir '{directory}': '{path}' does not exist (is it a finished training run?)")
    return ModelSpec(os.path.basename(os.path.normpath(directory)), config, weights)


def build_cfg(spec: ModelSpec, args):
    cfg = load_config(spec.config, [*args.opts, *spec.overrides], args.register_voc, args.register_coco,
                      label=f"model '{spec.label}'")
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    return cfg


def headline_metrics(bbox: dict, evaluator_type: str) -> dict:
    """Columns from detectron2's ``results["bbox"]``: the headline ``mAP`` and the APs."""
    row = {k: bbox.get(k) for k in ("AP", "AP50", "AP75") if k in bbox}
    if evaluator_type == "pascal_voc":
        row.update(map_metric="AP50 (VOC07 11-point)", mAP=bbox.get("AP50"))
    else:
        row.update(map_metric="AP (COCO, IoU .50:.95)", mAP=bbox.get("AP"))
    return row


def evaluate(cfg, model, dataset: str, dtype: str, output_dir: str) -> dict:
    evaluator = build_evaluator(cfg, dataset, output_folder=output_dir)
    with precision_context(dtype, cfg.MODEL.DEVICE):
        results = inference_on_dataset(model, build_detection_test_loader(cfg, dataset), evaluator)
    return results.get("bbox", {}) if results else {}


def fixed_size_images(dataset: Optional[str], size: Tuple[int, int], count: int = 1) -> List[np.ndarray]:
    """The dataset's first ``count`` images stretched to ``size`` (BGR, realistic detections and
    proposals), else ``count`` noise images."""
    if dataset:
        dicts = DatasetCatalog.get(dataset)[:count]
        if dicts:
            from PIL import Image

            return [
                np.asarray(Image.fromarray(read_image(d["file_name"], format="BGR")).resize((size[1], size[0]),
                                                                                          Image.BILINEAR))
                for d in dicts
            ]
    return [synthetic_image(*size, seed=SEED + i) for i in range(count)]


@dataclass
class PreparedModel:
    """A model whose config, dataset and weights passed every check."""

    spec: ModelSpec
    cfg: object
    model: torch.nn.Module
    dataset: Optional[str]
    calibration: List[torch.Tensor] = field(default_factory=list, repr=False)  # (3, H, W) int8 calibration inputs
    onnx_file: str = ""  # a float ONNX file checked to be this model's export
    mapped: Dict[Tuple[str, int], list] = field(default_factory=dict, repr=False)

    def dataset_inputs(self, dataset: str, count: int, keep: bool = False) -> List[dict]:
        """The first ``count`` images of ``dataset`` as this model's test loader maps them (its
        ``INPUT`` sizes). ``keep``: map them once and hold them for later calls (the reference
        model, timed with every row on the same images); a row's own are mapped and let go."""
        key = (dataset, count)
        if key in self.mapped:
            return self.mapped[key]
        mapper = DatasetMapper(self.cfg, is_train=False)
        inputs = [mapper(d) for d in DatasetCatalog.get(dataset)[:count]]
        if keep:
            self.mapped[key] = inputs
        return inputs


def _check_timing_size(cfg, args, label: str) -> None:
    """A model is timed at ``--input-size``, else at its ``INPUT.MIN_SIZE_TEST`` square: 0 there
    (detectron2: images at their own size) leaves no size."""
    if not args.input_size and cfg.INPUT.MIN_SIZE_TEST == 0:
        raise UserInputError(f"model '{label}': INPUT.MIN_SIZE_TEST 0 tests images at their own size, which leaves "
                             f"no size to time the model at: pass --input-size HxW")


def prepare_model(spec: ModelSpec, args) -> PreparedModel:
    """Check one model's config, dataset (and its class count) and weights, and load it; writes nothing."""
    cfg = build_cfg(spec, args)
    _check_timing_size(cfg, args, spec.label)
    register_custom_datasets(cfg)
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None)
    if not args.skip_eval or args.dataset_images > 0:
        if not dataset:
            raise UserInputError(f"model '{spec.label}': no --dataset given and its config has no DATASETS.TEST")
        check_dataset_available(dataset)
        if not args.skip_eval:
            check_num_classes(cfg, [dataset])
    print(f"[{spec.label}] loading {spec.config} weights={spec.weights or cfg.MODEL.WEIGHTS or '(random init)'}",
          flush=True)
    calibration = ([export.to_model_input(cfg, image)
                    for _, image in calibration_images(cfg, args.calibration_images, args.calibration_dir)]
                   if "onnxruntime_int8" in args.runtime else [])
    model = load_model(cfg, spec.weights, trusted=args.trust_weights)
    onnx_file = parse_onnx_files(args.onnx).get(spec.label, "")
    if onnx_file:
        precision = export.check_onnx_file(onnx_file, model, spec.label).get(export.PRECISION_KEY, "fp32")
        if precision != "fp32":
            raise UserInputError(f"--onnx '{onnx_file}' is {precision}: give model '{spec.label}''s float export "
                                 "(the onnxruntime_int8 runtime quantizes it)")
    if args.fold_norms:
        print(f"[{spec.label}] folded the norms of {len(fold_norms(model.eval()))} convolutions", flush=True)
    return PreparedModel(spec, cfg, model, dataset, calibration, onnx_file)


def benchmark_model(prepared: PreparedModel, args, output_dir: str,
                    reference: Optional[PreparedModel] = None, runtime: str = "pytorch") -> Tuple[dict, dict]:
    """All figures of one model in one runtime: (flat row for the tables, details for the JSON).

    ``reference``: a model timed in turn with this one on each dataset image (see
    :func:`~pgp_det.benchmark.timing.time_dataset_images_in_turn`); the row gets ``speedup``, the
    median over the images of the reference's time over this model's, and the reference's own
    median latency in the same turns. ``runtime``: a name of :mod:`.runtimes`; the exported files
    are written to ``<output_dir>/exports/<label>/``."""
    spec, cfg, dataset = prepared.spec, prepared.cfg, prepared.dataset
    label = spec.label if runtime == "pytorch" else f"{spec.label}@{runtime}"

    def progress(message):
        print(f"[{label}] {message}", flush=True)

    needs_dataset = not args.skip_eval or args.dataset_images > 0
    size = parse_input_size(args.input_size) if args.input_size else (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    dtype = "fp16" if args.fp16 else "fp32"
    weights = spec.weights if spec.weights is not None else cfg.MODEL.WEIGHTS
    fixed_image = fixed_size_images(dataset if needs_dataset else None, size)[0]
    if runtime != "pytorch":
        progress(f"building the {runtime} runtime")
    model = build_runtime(runtime, prepared.model, cfg, RuntimeSettings(
        workdir=os.path.join(output_dir, "exports", spec.label), sample=export.to_model_input(cfg, fixed_image),
        threads=torch.get_num_threads(), calibration=prepared.calibration,
        calibration_method=args.calibration_method, onnx_file=prepared.onnx_file))
    info = model.runtime_info
    row = {"label": label, "runtime": runtime, "runtime_version": info["version"], "runtime_provider": info["provider"],
           "config": spec.config, "weights": weights or "", "dataset": dataset or ""}
    if spec.overrides:
        row["sweep"] = " ".join(spec.overrides)
    details = {"runtime": info}

    if not args.skip_eval:
        progress(f"evaluating on {dataset}")
        bbox = evaluate(cfg, model, dataset, dtype, os.path.join(output_dir, "inference", label))
        row.update(headline_metrics(bbox, MetadataCatalog.get(dataset).get("evaluator_type", "")))
        details["metrics"] = bbox
        progress(f"{row['map_metric']} = {row['mAP']:.2f}")

    # what this figure is (docs/latency.md, "Which latency to hold against a target"): one image
    # stretched to the fixed size, timed back to back, the model's own proposals, per stage
    # (stages in PyTorch only: an exported graph runs as one call)
    batch = args.batch_size
    progress(f"timing at {size[0]}x{size[1]} ({dtype}, {args.warmup} warm-up + {args.runs} runs back to back on one "
             "image stretched to that size" + (f", {batch} copies a call" if batch > 1 else "")
             + ", the model's own proposals)")
    if not isinstance(model, ExportedDetector):
        latency = measure_detector_latency(model, fixed_image, args.device, dtype, args.warmup, args.runs, batch)
        whole, stages = latency.whole, latency.stages
        details["latency"] = latency.to_dict()
    else:
        inputs = [image_to_input(fixed_image, cfg.INPUT.FORMAT, torch.device(args.device))]
        with torch.no_grad():
            whole, stages = time_callable(lambda: model(inputs), warmup=args.warmup, runs=args.runs), {}
        details["latency"] = {"whole": whole.to_dict(), "input_size": list(size), "dtype": dtype}
    row.update(
        input_size=f"{size[0]}x{size[1]}",
        dtype=info.get("precision", dtype),
        batch_size=batch,
        latency_median_ms=whole.median,
        latency_p90_ms=whole.p90,
        fps=whole.fps * batch,
    )
    progress(f"median {whole.median:.1f} ms, p90 {whole.p90:.1f} ms, {row['fps']:.1f} FPS"
             + (f" (batch {batch})" if batch > 1 else "")
             + ("; stages: " + ", ".join(f"{k} {stages[k].median:.1f}" for k in STAGES) if stages else ""))

    if args.dataset_images > 0:
        inputs = prepared.dataset_inputs(dataset, args.dataset_images, keep=prepared is reference)
        progress(f"timing {len(inputs)} images of {dataset}")
        if reference is None:
            stats = time_dataset_images(model, inputs, args.device, dtype, args.warmup)
        else:
            progress(f"in turn with {reference.spec.label}")
            mine, theirs = time_dataset_images_in_turn(
                [(model, inputs), (reference.model, reference.dataset_inputs(dataset, args.dataset_images, keep=True))],
                args.device, dtype, args.warmup)
            stats = TimingStats.from_samples(mine)
            row.update(speedup=float(np.median([b / a for a, b in zip(mine, theirs)])),
                       reference=reference.spec.label, reference_latency_median_ms=float(np.median(theirs)))
            progress(f"{row['speedup']:.3f}x as fast as {reference.spec.label} ({row['reference_latency_median_ms']:.1f} ms "
                     "in the same turns)")
        row.update(
            dataset_latency_median_ms=stats.median,
            dataset_latency_p90_ms=stats.p90,
            dataset_fps=stats.fps,
            dataset_images=len(inputs),
        )
        details["dataset_latency"] = stats.to_dict()
        progress(f"dataset images: median {stats.median:.1f} ms, p90 {stats.p90:.1f} ms, {stats.fps:.1f} FPS")

    for name in stages:
        row[f"stage_{name}_ms"] = stages[name].median

    progress("counting FLOPs")
    flops = count_flops(prepared.model, *size)
    row["gflops"] = flops["gflops"]
    row.update({f"gflops_{k}": flops["gflops_per_family"].get(k, 0.0) for k in FAMILIES})
    row["params_M"] = flops["params"] / 1e6
    row.update({f"params_{k}_M": flops["params_per_family"].get(k, 0) / 1e6 for k in FAMILIES})
    row["checkpoint_mb"] = os.path.getsize(weights) / 1e6 if weights and os.path.isfile(weights) else None
    if info["files"]:
        row["model_file_mb"] = os.path.getsize(info["files"][0]) / 1e6
    details["flops"] = flops
    progress(f"{flops['gflops']:.2f} GFLOPs, {flops['params'] / 1e6:.2f} M parameters")
    return row, details


def mark_pareto_front(rows: List[dict]) -> None:
    """``row["pareto"] = "yes"`` for the rows no other row beats in both mAP and FPS (rows without
    both figures are left out)."""
    measured = [r for r in rows if r.get("mAP") is not None and r.get("fps") is not None]
    for i in pareto_front([(r["mAP"], r["fps"]) for r in measured], maximize=(True, True)):
        measured[i]["pareto"] = "yes"

#!/usr/bin/env python
"""Measure mAP against inference speed for one or more detectors, and plot the trade-off.

Examples::

    python tools/eval_map_fps.py --run-dir output/synth_R_18_FPN --run-dir output/synth_pruned \\
        --output output/map_fps
    python tools/eval_map_fps.py --model dense=configs/synthetic/faster_rcnn_R_18_FPN_synth.yaml:dense.pth \\
        --model pruned50=configs/synthetic/faster_rcnn_R_18_FPN_synth.yaml:pruned.pth \\
        --device cuda --fp16 --runs 50 --output output/map_fps_gpu
    python tools/eval_map_fps.py --run-dir output/synth_R_18_FPN --skip-eval --input-size 512x512 \\
        --threads 1 --output output/speed_only
    # the test-time knobs in the same trade-off: every combination is a point of the plots
    python tools/eval_map_fps.py --run-dir output/synth_R_18_FPN_pgp --output output/knobs \\
        --sweep MODEL.RPN.POST_NMS_TOPK_TEST=300,100,50 --sweep INPUT.MIN_SIZE_TEST=256,192

For each model: mAP (VOC: AP50 11-point headline and AP; COCO: AP headline and AP50), batch-1
latency (median / p90 ms, FPS) on a fixed-size input and over the first N dataset images,
per-stage latency, GFLOPs at the fixed size, parameters and checkpoint size. Writes
results.csv, results.json, results.md, map_vs_fps.png and map_vs_gflops.png into --output.
With ``--sweep KEY=V1,V2`` each model is measured at every point of the grid (label
``model[KEY=V,...]``); the rows on the Pareto front of mAP against FPS are marked ``pareto``.
Without ``--input-size`` the timing input is ``INPUT.MIN_SIZE_TEST`` square, so sweeping that key
sweeps the timed size too.

Bad input (missing config or weights, a checkpoint that does not fit its config, an unregistered
dataset) ends with one line on stderr and exit code 2.
"""
import argparse
import dataclasses
import itertools
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog  # noqa: E402
from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.evaluation import inference_on_dataset  # noqa: E402

from pgp_det.benchmark import measure_detector_latency, time_dataset_images  # noqa: E402
from pgp_det.checkpoint import load_model  # noqa: E402
from pgp_det.benchmark.flops import FAMILIES, count_flops  # noqa: E402
from pgp_det.benchmark.report import pareto_front, reproducibility_record, write_report  # noqa: E402
from pgp_det.benchmark.timing import STAGES, environment_info, precision_context, synthetic_image  # noqa: E402
from pgp_det.config import load_config  # noqa: E402
from pgp_det.data import add_dataset_arguments, check_dataset_available, check_num_classes, register_custom_datasets  # noqa: E402,E501
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, add_trust_argument, check_overrides, parse_input_size  # noqa: E402
from pgp_det.utils.output_dir import claim_output_dir  # noqa: E402
from pgp_det.evaluation import build_evaluator  # noqa: E402

SEED = 0  # of the noise image used when no dataset image is at hand, and of torch


@dataclass
class ModelSpec:
    label: str
    config: str
    weights: Optional[str]  # None: the config's MODEL.WEIGHTS
    overrides: Tuple[str, ...] = ()  # test-time KEY VALUE pairs of one --sweep point


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


def fixed_size_image(dataset: Optional[str], size: Tuple[int, int]) -> np.ndarray:
    """The dataset's first image stretched to ``size`` (realistic detections), else noise."""
    if dataset:
        dicts = DatasetCatalog.get(dataset)
        if dicts:
            from PIL import Image

            image = read_image(dicts[0]["file_name"], format="BGR")
            return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    return synthetic_image(*size, seed=SEED)


@dataclass
class PreparedModel:
    """A model whose config, dataset and weights passed every check."""

    spec: ModelSpec
    cfg: object
    model: torch.nn.Module
    dataset: Optional[str]


def prepare_model(spec: ModelSpec, args) -> PreparedModel:
    """Check one model's config, dataset (and its class count) and weights, and load it; writes nothing."""
    cfg = build_cfg(spec, args)
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
    return PreparedModel(spec, cfg, load_model(cfg, spec.weights, trusted=args.trust_weights), dataset)


def benchmark_model(prepared: PreparedModel, args, output_dir: str) -> Tuple[dict, dict]:
    """All figures of one model: (flat row for the tables, details for the JSON)."""
    spec, cfg, model, dataset = prepared.spec, prepared.cfg, prepared.model, prepared.dataset

    def progress(message):
        print(f"[{spec.label}] {message}", flush=True)

    needs_dataset = not args.skip_eval or args.dataset_images > 0
    size = parse_input_size(args.input_size) if args.input_size else (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    dtype = "fp16" if args.fp16 else "fp32"
    weights = spec.weights if spec.weights is not None else cfg.MODEL.WEIGHTS
    row = {"label": spec.label, "config": spec.config, "weights": weights or "", "dataset": dataset or ""}
    if spec.overrides:
        row["sweep"] = " ".join(spec.overrides)
    details = {}

    if not args.skip_eval:
        progress(f"evaluating on {dataset}")
        bbox = evaluate(cfg, model, dataset, dtype, os.path.join(output_dir, "inference", spec.label))
        row.update(headline_metrics(bbox, MetadataCatalog.get(dataset).get("evaluator_type", "")))
        details["metrics"] = bbox
        progress(f"{row['map_metric']} = {row['mAP']:.2f}")

    progress(f"timing at {size[0]}x{size[1]} ({dtype}, {args.warmup} warm-up + {args.runs} runs)")
    latency = measure_detector_latency(
        model, fixed_size_image(dataset if needs_dataset else None, size), args.device, dtype, args.warmup, args.runs
    )
    row.update(
        input_size=f"{size[0]}x{size[1]}",
        dtype=dtype,
        latency_median_ms=latency.whole.median,
        latency_p90_ms=latency.whole.p90,
        fps=latency.whole.fps,
    )
    details["latency"] = latency.to_dict()
    progress(
        f"median {latency.whole.median:.1f} ms, p90 {latency.whole.p90:.1f} ms, {latency.whole.fps:.1f} FPS; stages: "
        + ", ".join(f"{k} {latency.stages[k].median:.1f}" for k in STAGES)
    )

    if args.dataset_images > 0:
        dicts = DatasetCatalog.get(dataset)[: args.dataset_images]
        progress(f"timing {len(dicts)} images of {dataset}")
        mapper = DatasetMapper(cfg, is_train=False)
        stats = time_dataset_images(model, [mapper(d) for d in dicts], args.device, dtype, args.warmup)
        row.update(
            dataset_latency_median_ms=stats.median,
            dataset_latency_p90_ms=stats.p90,
            dataset_fps=stats.fps,
            dataset_images=len(dicts),
        )
        details["dataset_latency"] = stats.to_dict()
        progress(f"dataset images: median {stats.median:.1f} ms, p90 {stats.p90:.1f} ms, {stats.fps:.1f} FPS")

    for name in STAGES:
        row[f"stage_{name}_ms"] = latency.stages[name].median

    progress("counting FLOPs")
    flops = count_flops(model, *size)
    row["gflops"] = flops["gflops"]
    row.update({f"gflops_{k}": flops["gflops_per_family"].get(k, 0.0) for k in FAMILIES})
    row["params_M"] = flops["params"] / 1e6
    row.update({f"params_{k}_M": flops["params_per_family"].get(k, 0) / 1e6 for k in FAMILIES})
    row["checkpoint_mb"] = os.path.getsize(weights) / 1e6 if weights and os.path.isfile(weights) else None
    details["flops"] = flops
    progress(f"{flops['gflops']:.2f} GFLOPs, {flops['params'] / 1e6:.2f} M parameters")
    return row, details


def argument_parser():
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=CONFIG_FILE[:WEIGHTS]",
                        help="a model to measure (repeatable); WEIGHTS defaults to the config's MODEL.WEIGHTS")
    parser.add_argument("--run-dir", action="append", default=[], metavar="DIR",
                        help="a training output folder (DIR/config.yaml, DIR/model_final.pth; label: folder name)")
    parser.add_argument("--dataset", default="",
                        help="dataset to evaluate and time on (default: the config's DATASETS.TEST[0])")
    parser.add_argument("--input-size", default="", metavar="HxW",
                        help="fixed timing/FLOPs input (default: MIN_SIZE_TEST square of each config)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fp16", action="store_true", help="half precision (CUDA autocast), for mAP and timing")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--runs", type=int, default=20, help="timed runs at the fixed input size")
    parser.add_argument("--dataset-images", type=int, default=20, metavar="N",
                        help="time the first N dataset images once each (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-eval", action="store_true", help="only time and count; no mAP")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="measure every model at each value of a test-time config key (repeatable: all "
                             "combinations), e.g. MODEL.RPN.POST_NMS_TOPK_TEST=300,100,50 or INPUT.MIN_SIZE_TEST=256,192; "
                             "every point goes on the plots and the Pareto front")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for results.* and the plots")
    add_dataset_arguments(parser)
    add_trust_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE config overrides applied to every model")
    return parser


def check_args(args) -> List[ModelSpec]:
    specs = [parse_model_spec(m) for m in args.model] + [run_dir_spec(d) for d in args.run_dir]
    if not specs:
        raise UserInputError("no model given: pass --model LABEL=CONFIG_FILE[:WEIGHTS] or --run-dir DIR")
    labels = [s.label for s in specs]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise UserInputError(f"model labels must be unique; repeated: {', '.join(duplicates)}")
    for spec in specs:
        if not os.path.isfile(spec.config):
            raise UserInputError(f"model '{spec.label}': config file '{spec.config}' does not exist")
        if spec.weights is not None and not os.path.isfile(spec.weights):
            raise UserInputError(f"model '{spec.label}': weights file '{spec.weights}' does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: CUDA is not available on this machine")
    if args.fp16 and args.device != "cuda":
        raise UserInputError("--fp16 needs --device cuda (CPU half precision is not a meaningful speed figure)")
    if args.input_size:
        parse_input_size(args.input_size)
    if args.runs < 1 or args.warmup < 0 or args.dataset_images < 0 or args.threads < 0:
        raise UserInputError("--runs must be >= 1; --warmup, --dataset-images and --threads >= 0")
    return specs


def mark_pareto_front(rows: List[dict]) -> None:
    """``row["pareto"] = "yes"`` for the rows no other row beats in both mAP and FPS (rows without
    both figures are left out)."""
    measured = [r for r in rows if r.get("mAP") is not None and r.get("fps") is not None]
    for i in pareto_front([(r["mAP"], r["fps"]) for r in measured], maximize=(True, True)):
        measured[i]["pareto"] = "yes"


def main(argv=None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        check_overrides(parser, args.opts)
        specs = [point for spec in check_args(args) for point in expand_sweeps(spec, parse_sweeps(args.sweep))]
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(SEED)
        with claim_output_dir(args.output, "--output") as output:
            # every model's config, dataset and weights are checked before anything is written
            prepared = [prepare_model(spec, args) for spec in specs]
            output.start_writing()
            rows, details = [], {}
            for model in prepared:
                row, extra = benchmark_model(model, args, args.output)
                rows.append(row)
                details[model.spec.label] = extra
            mark_pareto_front(rows)
            settings = {k: v for k, v in vars(args).items() if k != "output"}
            command = ["python", "tools/eval_map_fps.py", *(sys.argv[1:] if argv is None else argv)]
            record = reproducibility_record(environment_info(args.device), SEED, settings, command)
            written = write_report(rows, args.output, record, details)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(os.path.basename(p) for p in written.values()) + f" to {os.path.abspath(args.output)}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

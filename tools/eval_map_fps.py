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
    # the GPU deployment path: dense parts compiled and captured in CUDA graphs, batch 8
    python tools/eval_map_fps.py --run-dir output/r50 --device cuda --runtime pytorch pytorch_cudagraphs \\
        --input-size 800x1333 --batch-size 8 --skip-eval --output output/gpu_b8
    # the same models in ONNX Runtime, float and int8 (calibrated on 32 training images)
    python tools/eval_map_fps.py --run-dir output/synth_R_18_FPN --run-dir output/synth_pruned --threads 2 \
        --runtime pytorch onnxruntime onnxruntime_int8 --output output/map_fps_runtimes
    # the test-time knobs in the same trade-off: every combination is a point of the plots
    python tools/eval_map_fps.py --run-dir output/synth_R_18_FPN_pgp --output output/knobs \\
        --sweep MODEL.RPN.POST_NMS_TOPK_TEST=300,100,50 --sweep INPUT.MIN_SIZE_TEST=256,192

For each model: mAP (VOC: AP50 11-point headline and AP; COCO: AP headline and AP50), latency
(median / p90 ms, FPS) on a fixed-size input (batch 1, or ``--batch-size N`` copies a call) and
batch 1 over the first N dataset images, per-stage latency, GFLOPs at the fixed size, parameters
and checkpoint size; with ``--runtime``, for each model in each runtime (PyTorch eager, compiled,
compiled and captured in CUDA graphs, TorchScript, ONNX Runtime float or int8: see
``pgp_det/benchmark/runtimes.py``), the exported files in ``<output>/exports/<label>/``. Writes
results.csv, results.json, results.md, map_vs_fps.png and map_vs_gflops.png into --output.
With ``--sweep KEY=V1,V2`` each model is measured at every point of the grid (label
``model[KEY=V,...]``); the rows on the Pareto front of mAP against FPS are marked ``pareto``.
Without ``--input-size`` the timing input is ``INPUT.MIN_SIZE_TEST`` square, so sweeping that key
sweeps the timed size too. With ``--reference LABEL`` every model (every sweep point) is timed on
the dataset images in turn with that model at its config's own settings, image by image, and
gets a ``speedup`` column: on a device whose speed drifts over a long sweep, a ratio of two
latencies measured minutes apart is off by the drift, one measured in turn is not. On a CPU at
large inputs, ``--keep-freed-memory`` times with the memory the process frees kept for reuse
(``pgp_det.utils.allocator``; the results record it): without it, each inference may fault
its activations' pages in afresh.

Bad input (missing config or weights, a checkpoint that does not fit its config, an unregistered
dataset) ends with one line on stderr and exit code 2.
"""
import argparse
import os
import sys
from typing import List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)

from pgp_det.benchmark.measure import (  # noqa: E402
    SEED,
    ModelSpec,
    add_measurement_arguments,
    benchmark_model,
    check_measurement_options,
    expand_sweeps,
    mark_pareto_front,
    parse_model_spec,
    parse_onnx_files,
    parse_sweeps,
    prepare_model,
    run_dir_spec,
)
from pgp_det.benchmark.report import reproducibility_record, write_report  # noqa: E402
from pgp_det.benchmark.timing import environment_info  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.utils.allocator import keep_freed_memory  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, run_tool  # noqa: E402
from pgp_det.utils.output_dir import claim_output_dir  # noqa: E402


def argument_parser():
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=CONFIG_FILE[:WEIGHTS]",
                        help="a model to measure (repeatable); WEIGHTS defaults to the config's MODEL.WEIGHTS")
    parser.add_argument("--run-dir", action="append", default=[], metavar="DIR",
                        help="a training output folder (DIR/config.yaml, DIR/model_final.pth; label: folder name)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for results.* and the plots")
    add_measurement_arguments(parser)
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
    check_measurement_options(args)
    unknown = sorted(set(parse_onnx_files(args.onnx)) - set(labels))
    if unknown:
        raise UserInputError(f"--onnx names {', '.join(unknown)}, not a model's label; the labels are: {', '.join(labels)}")
    if args.reference and args.reference not in labels:
        raise UserInputError(f"--reference '{args.reference}' is not a model's label; the labels are: {', '.join(labels)}")
    return specs


def run(args, argv=None) -> int:
    models = check_args(args)
    specs = [point for spec in models for point in expand_sweeps(spec, parse_sweeps(args.sweep))]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(SEED)
    with claim_output_dir(args.output, "--output") as output:
        # every model's config, dataset and weights are checked before anything is written
        prepared = [prepare_model(spec, args) for spec in specs]
        # the reference runs at its config's own settings: without --sweep that is its own row's model
        reference = next((p for p in prepared if p.spec.label == args.reference), None) or next(
            (prepare_model(m, args) for m in models if m.label == args.reference), None)
        output.start_writing()
        rows, details = [], {}
        for model in prepared:
            for runtime in args.runtime:
                row, extra = benchmark_model(model, args, args.output, reference, runtime)
                rows.append(row)
                details[row["label"]] = extra
        mark_pareto_front(rows)
        settings = {k: v for k, v in vars(args).items() if k != "output"}
        command = ["python", "tools/eval_map_fps.py", *(sys.argv[1:] if argv is None else argv)]
        record = reproducibility_record(environment_info(args.device), SEED, settings, command)
        written = write_report(rows, args.output, record, details)
    print("wrote " + ", ".join(os.path.basename(p) for p in written.values()) + f" to {os.path.abspath(args.output)}",
          flush=True)
    return 0


def main(argv=None) -> int:
    return run_tool(argument_parser(), argv, lambda args: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Measure a detector's latency lookup table on the device it will run on.

Examples::

    python tools/profile_latency.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --device cpu \\
        --input-size 256x256 --output output/latency/r18_cpu_256.json --check
    python tools/profile_latency.py --config-file configs/faster_rcnn_R_50_FPN_voc.yaml --device cuda --fp16 \\
        --input-size 800x1333 --output jetson_r50_fp16.json --check

Run it where the detector will run (a Jetson, a server GPU, a CPU), with the threads and precision
it will use; copy the table anywhere and train with ``PRUNING.TARGET latency
PRUNING.LATENCY_TABLE table.json`` or prune once with ``tools/prune_net.py --latency-table``.

Every conv and linear layer whose channels pruning can change (and the ROI pooler) is timed alone
over a grid of (input, output) widths (``--points`` per axis, multiples of
``PRUNING.CHANNEL_MULTIPLE`` from ``PRUNING.MIN_CHANNELS`` to the full width), at its own feature
size (``--passes`` times, pass after pass through all layers, keeping the fastest: other work that
slows the device for a few seconds then spoils no layer's price); the whole model at a few
proposal counts (``--proposals``; the config's ``MODEL.RPN.POST_NMS_TOPK_TEST`` always); the rest
of the model is the difference, and the part of it that shrinks with the channels is fitted to
whole-model timings of pruned copies (uniform ones, and two that each cut half of the groups; see
``pgp_det.latency``), each group weighed, on a CPU, by what cutting it saves of the time
the whole model spends after its layers (ReLUs, sums, pooling), timed in the model. Inputs are the first ``--images`` images of the config's test
set stretched to ``--input-size`` (noise images with ``--noise-images`` or when the set is not at
hand), with every proposal kept (the worst case of the proposal count). Their proposals set the
ROI pooler's work, which follows the boxes' sizes: use trained weights and images like the
deployment's. ``--check`` then times the whole model pruned uniformly at a few ratios (the ROI
heads fed the unpruned model's proposals, so only the widths change) and every ``--check-weights``
checkpoint (trained pruned models of this architecture, with their own proposals), and prints
predicted against measured latency; the rows are stored in the table's metadata. Models compared
whole (other proposal counts, the calibration copies, the check's models) are timed in turn with the unpruned model,
one call each per round: a device whose speed drifts (clocks, heat, power modes, other
processes) moves them together, and the check also prints each model's share of the unpruned
model's time, predicted against measured, which such a drift leaves out. A pruned
checkpoint as ``--weights`` gives a table for its pruned architecture, which a config's unpruned
model will refuse. ``--table T`` checks an existing table instead of profiling (one made here
earlier, or merged by ``tools/merge_latency_tables.py``): the model, input size, precision,
test-time settings and kind of weights (trained or random) must be the table's, and the table
with the check rows goes to ``--output``.
On a CPU, ``--keep-freed-memory`` times with the memory the process frees kept for reuse
(``pgp_det.utils.allocator``): at large inputs the whole model otherwise pays page faults that
layers timed alone do not, and the table cannot see them. A table records whether it was made so;
``--table`` checks it only in the same state.

Bad input ends with one ``error:`` line on stderr, exit code 2, and nothing written.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)

import torch  # noqa: E402

from pgp_det.benchmark.measure import fixed_size_images  # noqa: E402
from pgp_det.data import check_dataset_available, register_custom_datasets  # noqa: E402
from pgp_det.checkpoint import load_model  # noqa: E402
from pgp_det.engine.preflight import build_run_config  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.pruning import derive_channel_groups, kept_count  # noqa: E402
from pgp_det.latency.check import check_latency  # noqa: E402
from pgp_det.latency.io import load_table, save_table  # noqa: E402
from pgp_det.latency.page_faults import page_fault_warning, profiled_with_freed_memory_kept  # noqa: E402
from pgp_det.latency.profile import profile_latency  # noqa: E402
from pgp_det.latency.settings import ProfileSettings  # noqa: E402
from pgp_det.latency.timers import Timing, default_timer, wall_clock_ms  # noqa: E402
from pgp_det.utils.allocator import keep_freed_memory  # noqa: E402
from pgp_det.utils.cli import (  # noqa: E402
    OneLineArgumentParser, add_keep_freed_memory_argument, add_trust_argument, parse_input_size, run_tool,
)
from pgp_det.utils.output_dir import claim_output_dir  # noqa: E402
from pgp_det.utils.weights import check_weights_available  # noqa: E402

CONFIGS_DIR = os.path.join(ROOT, "configs")
# options that set how a table is profiled (``--proposals ""``: a quarter, half and all of the config's count)
PROFILING_DEFAULTS = {"points": 5, "proposals": "", "passes": 1}


def argument_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--config", metavar="NAME.yaml", default="", help="config file inside configs/")
    parser.add_argument("--weights", default=None, metavar="W", help="weights to load (default: MODEL.WEIGHTS)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to measure (default cpu)")
    parser.add_argument("--fp16", action="store_true", help="half precision (CUDA autocast); CUDA only")
    parser.add_argument("--input-size", default=None, metavar="HxW",
                        help="input size the model will run at (required, unless --table gives it)")
    parser.add_argument("--output", required=True, metavar="TABLE.json", help="the table to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing TABLE.json")
    # the profiling-only options default to None so that --table can tell them apart from unset
    parser.add_argument("--points", type=int, default=None,
                        help=f"widths timed per axis of a layer's grid (>= 2; default {PROFILING_DEFAULTS['points']})")
    parser.add_argument("--proposals", default=None, metavar="N1,N2",
                        help="proposal counts to time (default: 1/4, 1/2 and all of MODEL.RPN.POST_NMS_TOPK_TEST)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each timing")
    parser.add_argument("--runs", type=int, default=7,
                        help="timed calls per timing (the median is kept); whole models compared (other proposal "
                             "counts, calibration copies, --check) are timed in turn, one call each per round, over "
                             "this many rounds")
    parser.add_argument("--passes", type=int, default=None,
                        help="time every layer this many times, pass after pass through all layers, and keep the "
                             f"fastest (default {PROFILING_DEFAULTS['passes']})")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--table", default="", metavar="T.json",
                        help="check this table (made by this tool or merged) instead of profiling: implies --check; "
                             "the table with the check rows is written to --output (--points, --proposals and "
                             "--passes do not apply)")
    parser.add_argument("--check", action="store_true",
                        help="time the whole model pruned uniformly at --check-ratios and print predicted vs measured")
    parser.add_argument("--check-ratios", default="0,0.25,0.5,0.75", metavar="R1,R2",
                        help="uniform pruning ratios of --check")
    parser.add_argument("--check-weights", action="append", default=[], metavar="W",
                        help="with --check: a trained pruned checkpoint of this config to predict and time (repeatable)")
    parser.add_argument("--images", type=int, default=4, help="images to profile on (default 4)")
    parser.add_argument("--noise-images", action="store_true",
                        help="profile on noise images, not on the config's test set")
    add_keep_freed_memory_argument(parser)
    add_trust_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def _numbers(text: str, option: str, kind=int) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserInputError(f"{option} '{text}': expected comma-separated numbers") from None
    if not values:
        raise UserInputError(f"{option} '{text}' names no value")
    return values


def check_args(args) -> None:
    """Reject bad arguments before anything is loaded (the config is checked by build_run_config)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: CUDA is not available on this machine")
    if args.fp16 and args.device != "cuda":
        raise UserInputError("--fp16 needs --device cuda (CPU half precision is not a meaningful speed figure)")
    args.table_to_check = None
    if args.table:
        profiling_only = [f"--{name}" for name in PROFILING_DEFAULTS if getattr(args, name) is not None]
        if profiling_only:
            raise UserInputError(f"{', '.join(profiling_only)} set how a table is profiled; --table checks the one "
                                 f"it names as it is: drop {', '.join(profiling_only)}, or profile without --table")
        table = args.table_to_check = load_table(args.table)
        size = f"{table.input_size[0]}x{table.input_size[1]}"
        if args.input_size and parse_input_size(args.input_size) != table.input_size:
            raise UserInputError(f"--input-size {args.input_size}: the table {args.table} was profiled at {size}; "
                                 f"leave --input-size out to check it there")
        args.input_size = size
        precision = "fp16" if args.fp16 else "fp32"
        if table.metadata.get("precision") != precision:
            raise UserInputError(f"the table {args.table} was profiled in {table.metadata.get('precision')}, this check "
                                 f"would run in {precision}: {'drop' if args.fp16 else 'pass'} --fp16")
        kept = profiled_with_freed_memory_kept(table.metadata)
        if kept != args.keep_freed_memory:
            raise UserInputError(f"the table {args.table} was profiled {'with' if kept else 'without'} freed memory kept, "
                                 f"this check would run {'with' if args.keep_freed_memory else 'without'}: "
                                 f"{'pass' if kept else 'drop'} --keep-freed-memory")
        args.check = True
    for name, default in PROFILING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not args.input_size:
        raise UserInputError("--input-size HxW is required (the size the model will run at), unless --table gives it")
    parse_input_size(args.input_size)
    if args.points < 2:
        raise UserInputError(f"--points {args.points}: time at least 2 widths per axis")
    if args.runs < 1 or args.passes < 1 or args.warmup < 0 or args.threads < 0:
        raise UserInputError("--runs and --passes must be >= 1; --warmup and --threads >= 0")
    if args.images < 1:
        raise UserInputError(f"--images {args.images}: profile on at least 1 image")
    if args.check_weights and not args.check:
        raise UserInputError("--check-weights is used with --check")
    for path in args.check_weights:
        check_weights_available(path)
    if args.proposals and min(_numbers(args.proposals, "--proposals")) < 1:
        raise UserInputError(f"--proposals '{args.proposals}': proposal counts are >= 1")
    if any(not 0.0 <= r < 1.0 for r in _numbers(args.check_ratios, "--check-ratios", float)):
        raise UserInputError(f"--check-ratios '{args.check_ratios}': ratios are fractions in [0, 1)")
    if os.path.isdir(args.output):
        raise UserInputError(f"--output '{args.output}' is a folder: give the table's file name, e.g. table.json")
    if os.path.exists(args.output) and not args.overwrite:
        raise UserInputError(f"'{args.output}' already exists: pass --overwrite to replace it, or choose another --output")


def build_config(args):
    """The frozen config of this run (no side effects beyond reading files)."""
    return build_run_config(args.config, args.config_file, CONFIGS_DIR, args.opts)


def profile_images(cfg, args):
    """``(images, where from)``: the ``--images`` images to profile on (see the module docstring)."""
    size = parse_input_size(args.input_size)
    dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
    reason = "--noise-images" if args.noise_images else "" if dataset else "the config has no DATASETS.TEST"
    if not reason:
        register_custom_datasets(cfg)
        try:
            check_dataset_available(dataset)
        except UserInputError as e:
            reason = f"{dataset} is not at hand ({e})"
    if reason:
        print(f"profiling on {args.images} noise images: {reason}", file=sys.stderr)
        return fixed_size_images(None, size, args.images), "noise"
    return fixed_size_images(dataset, size, args.images), dataset


def profile(cfg, args, timer=None):
    """Build the model and measure its table (and the check rows); nothing is written."""
    weights = cfg.MODEL.WEIGHTS if args.weights is None else args.weights
    if weights:
        weights = check_weights_available(weights)
    profiled_with = args.table_to_check.metadata.get("weights") if args.table else None
    if profiled_with is not None and bool(profiled_with) != bool(weights):
        # a random and a trained model differ in proposal boxes and detections, which set the
        # pooler's and the post-processing's time: the share column would compare other models
        described = {True: "trained weights", False: "randomly initialised weights"}
        fix = f"--weights {profiled_with}" if profiled_with else "--weights ''"
        raise UserInputError(f"the table {args.table} was profiled with {described[bool(profiled_with)]}, this check "
                             f"would time the unpruned model with {described[bool(weights)]}: pass {fix}")
    cpu = cfg.clone()
    cpu.defrost()
    cpu.MODEL.DEVICE = "cpu"  # built on the CPU, measured on --device
    model = load_model(cpu, weights, strict=False, trusted=args.trust_weights)
    checked = {path: load_model(cpu, path, strict=False, trusted=args.trust_weights) for path in args.check_weights}
    images, source = profile_images(cfg, args)
    timing = Timing(
        args.device, "fp16" if args.fp16 else "fp32",
        timer=timer or default_timer(args.device, warmup=args.warmup, runs=args.runs),
        # whole models that are compared (other proposal counts, the calibration copies, the
        # check's models) are timed in --runs interleaved rounds, one call each a round after a
        # warm-up call: see time_interleaved
        whole_timer=timer or default_timer(args.device, warmup=1, runs=1), rounds=args.runs,
        # the host's clock weighs the element-wise work between a CPU's layers; a GPU's is counted
        clock=wall_clock_ms if timer is None and args.device == "cpu" else None,
    )
    multiple, floor = int(cfg.PRUNING.CHANNEL_MULTIPLE), int(cfg.PRUNING.MIN_CHANNELS)
    if args.table:
        table = args.table_to_check
        table.check_compatible(derive_channel_groups(model, allow_frozen=True), table.input_size, args.device)
        for key, name, now in (("pre_nms_topk_test", "MODEL.RPN.PRE_NMS_TOPK_TEST", cfg.MODEL.RPN.PRE_NMS_TOPK_TEST),
                               ("detections_per_image", "TEST.DETECTIONS_PER_IMAGE", cfg.TEST.DETECTIONS_PER_IMAGE)):
            profiled = table.metadata.get(key)
            if profiled is not None and profiled != int(now):
                raise UserInputError(f"the table {args.table} was profiled with {name} {profiled}, the config has {now}: "
                                     f"pass {name} {profiled} to check it there")
    else:
        settings = ProfileSettings(
            points=args.points, multiple=multiple, floor=floor,
            proposal_counts=_numbers(args.proposals, "--proposals") if args.proposals else None,
            layer_repeat=10 if args.device == "cuda" else 1, passes=args.passes)
        metadata = {
            "config": args.config or args.config_file, "weights": weights, "overrides": list(args.opts),
            "images_from": source,
            "warmup": args.warmup, "runs": args.runs,
            "pre_nms_topk_test": int(cfg.MODEL.RPN.PRE_NMS_TOPK_TEST),
            "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE),
        }
        table = profile_latency(model, parse_input_size(args.input_size), settings, timing, images=images,
                                metadata=metadata, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.check:
        started = time.perf_counter()
        rows = check_latency(model, table, _numbers(args.check_ratios, "--check-ratios", float), timing,
                             trained=checked, multiple=multiple, floor=floor, images=images)
        table.metadata["check"] = [{k: v for k, v in row.items() if k != "widths"} for row in rows]
        table.metadata["check_seconds"] = time.perf_counter() - started
    return table


def check_report(table) -> str:
    """The ``--check`` rows as a fixed-width table, and how fast the device ran meanwhile."""
    rows = table.metadata.get("check", [])
    lines = [f"check: whole model, {table.reference_proposals} proposals, on {table.describe()}",
             f"{'model':<40}  predicted ms  measured ms   error  | share of unpruned: predicted  measured   error"]
    for row in rows:
        model = f"uniformly pruned, ratio {row['ratio']:.2f}" if "ratio" in row else row["label"]
        lines.append(f"{model:<40}  {row['predicted_ms']:12.3f}  {row['measured_ms']:11.3f}  "
                     f"{row['error_percent']:+6.1f}%  |  {row['predicted_relative']:26.3f}  {row['relative']:8.3f}  "
                     f"{row['relative_error_percent']:+6.1f}%")
    if rows:
        now, then = rows[0]["unpruned_ms"], table.predict()
        lines.append(f"the unpruned model measured {now:.3f} ms in the same rounds, {then:.3f} ms when profiled "
                     f"({100.0 * (now - then) / then:+.1f}%): the share columns leave out that change of the device's speed")
    return "\n".join(lines)


def headroom_report(table) -> str:
    """How much of the unpruned model's predicted time channel pruning can remove at all: every
    group pruned to its fewest channels (``min_channels``, rounded to ``channel_multiple``)."""
    multiple, floor = table.metadata["channel_multiple"], table.metadata["min_channels"]
    fewest = {name: kept_count(size, 1.0, multiple, floor) for name, size in table.groups.items()}
    full, least = table.predict(), table.predict(fewest)
    return (f"every channel group at its fewest channels: {least:.3f} ms of {full:.3f} ms predicted "
            f"({100.0 * (full - least) / full:.1f}% is all that channel pruning can remove on this device at this size)")


def main(argv=None, timer=None) -> int:
    """``timer``: ``fn -> ms`` replacing real timing (tests)."""
    return run_tool(argument_parser(), argv, lambda args: run(args, timer))


def run(args, timer=None) -> int:
    check_args(args)
    cfg = build_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    folder = os.path.dirname(os.path.abspath(args.output))
    with claim_output_dir(folder, "--output") as output:
        table = profile(cfg, args, timer)
        output.start_writing()
        save_table(table, args.output)
    meta = table.metadata
    if args.table:
        print(f"checked {args.table} ({table.describe()}); unpruned model {table.predict():.3f} ms predicted "
              f"at {table.reference_proposals} proposals")
    else:
        # timings that the layer's other timings ruled out (a busy device) were timed again
        repeated = meta.get("repeated_layer_timings", 0)
        again = f", {repeated} timed again" if repeated else ""
        passes = meta.get("layer_passes", 1)
        again += f", the fastest of {passes} passes" if passes > 1 else ""
        print(f"profiled {len(table.entries)} layers ({meta['distinct_layer_timings']} distinct timings{again}) on "
              f"{table.describe()} in {meta['profile_seconds']:.1f} s; unpruned model {table.predict():.3f} ms "
              f"predicted at {table.reference_proposals} proposals")
        faults = page_fault_warning(table, args.output)
        if faults:
            print(faults)
        if not meta.get("weights"):
            pooled = sum(e.ms[-1][-1] for e in table.entries if e.kind == "roi_pooler")
            print(f"profiled with randomly initialised weights: the ROI pooler's time ({pooled:.3f} ms here) follows "
                  "the sizes of the RPN's proposals, which training changes; profile with --weights of a trained "
                  "model of this architecture to predict trained ones")
    print(headroom_report(table))
    if args.check:
        print(check_report(table))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

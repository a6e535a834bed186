#!/usr/bin/env python
"""Measure a detector's latency lookup table on the device it will run on.

Examples::

    python tools/profile_latency.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --device cpu \\
        --input-size 256x256 --output output/latency/r18_cpu_256.json --check
    python tools/profile_latency.py --config-file configs/faster_rcnn_R_50_FPN_voc.yaml --device cuda --fp16 \\
        --input-size 800x1333 --output jetson_r50_fp16.json --check

Run it where the detector will run (a Jetson, a server GPU, a CPU), with the threads and precision
it will use; copy the table anywhere and train with ``PRUNING.TARGET.KIND latency
PRUNING.TARGET.LATENCY.TABLE table.json`` or prune once with ``tools/prune_net.py --latency-table``.
Every prunable conv and linear layer (and the ROI pooler) is timed alone over a grid of widths,
the whole model at a few proposal counts and pruned copies of it in turn with the unpruned
model (``pgp_det.latency``). ``--check`` prints predicted against measured latency of pruned
models; ``--table T`` checks an existing table instead of profiling. How to profile, check and
merge tables, and what each option is for: docs/latency.md.

Bad input ends with one ``error:`` line on stderr, exit code 2, and nothing written.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)

from pgp_det.engine.profile_command import PROFILING_DEFAULTS, run_profile_command  # noqa: E402
from pgp_det.latency.page_faults import page_fault_warning  # noqa: E402
from pgp_det.benchmark.latency.report import calibration_report, check_report, headroom_report  # noqa: E402
from pgp_det.utils.cli import (  # noqa: E402
    OneLineArgumentParser, add_keep_freed_memory_argument, add_trust_argument, run_tool,
)

CONFIGS_DIR = os.path.join(ROOT, "configs")


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


def main(argv=None, timer=None) -> int:
    """``timer``: ``fn -> ms`` replacing real timing (tests)."""
    return run_tool(argument_parser(), argv, lambda args: run(args, timer))


def run(args, timer=None) -> int:
    table = run_profile_command(args, CONFIGS_DIR, timer)
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
    calibration = calibration_report(table)
    if calibration:
        print(calibration)
    if args.check:
        print(check_report(table))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Prune a Faster R-CNN once, by weight magnitude, and save the smaller model.

Examples::

    python tools/prune_net.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --ratio 0.5 \\
        --output output/synth_pruned MODEL.WEIGHTS output/synth_R_18_FPN/model_final.pth
    python tools/prune_net.py --config-file configs/faster_rcnn_R_50_FPN_voc.yaml --flops-reduction 0.5 \\
        --scopes backbone,fpn --output output/r50_half MODEL.WEIGHTS /path/to/model_final.pth
    python tools/prune_net.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --latency-table r18_cpu.json \\
        --target-fps 40 --allocation knapsack --output output/synth_40fps MODEL.WEIGHTS model_final.pth
    python tools/prune_net.py ... --latency-table r18_cpu.json --target-fps 40 --closed-loop ...  # on that device

Each flag sets the ``PRUNING`` key of the same name after the ``KEY VALUE`` overrides
(:class:`pgp_det.engine.one_shot_request.OneShotRequest`), and
:func:`pgp_det.engine.one_shot.prune_once` prunes once to that target, as the training hook's last
step would; no dataset is needed. ``--closed-loop`` (on the table's device) times the pruned model
against the unpruned one and prunes again with a corrected budget until the measured share is
within ``--tolerance`` (:func:`pgp_det.engine.closed_loop.prune_to_measured_latency`).
Writes ``--output``/model_pruned.pth (``train_net.py --eval-only`` or a fine-tuning run's
``MODEL.WEIGHTS`` rebuild the pruned model) and ``pruning_report.json``. Bad input ends with one
``error:`` line on stderr, exit code 2, and nothing written.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)

from pgp_det.config import resolve_config_path  # noqa: E402
from pgp_det.engine.closed_loop import prune_and_write  # noqa: E402
from pgp_det.engine.one_shot import MODEL_FILE, group_table  # noqa: E402
from pgp_det.engine.one_shot_request import ClosedLoopSettings, OneShotRequest  # noqa: E402
from pgp_det.engine.preflight import build_run_config  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.pruning import SCOPES  # noqa: E402
from pgp_det.pruning.allocation import ALLOCATION_REGISTRY  # noqa: E402
from pgp_det.pruning.target import cost_input_size  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, add_trust_argument, parse_input_size, run_tool  # noqa: E402
from pgp_det.utils.output_dir import check_output_dir  # noqa: E402

CONFIGS_DIR = os.path.join(ROOT, "configs")


def argument_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--config", metavar="NAME.yaml", default="", help="config file inside configs/")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="TARGET.CHANNELS.RATIO: share of each group's channels, in [0, 1)")
    target.add_argument("--flops-reduction", type=float, metavar="F", help="TARGET.FLOPS.REDUCTION, in (0, 1)")
    target.add_argument("--target-latency-ms", type=float, metavar="X", help="TARGET.LATENCY.MS (with --latency-table)")
    target.add_argument("--target-fps", type=float, metavar="F", help="TARGET.LATENCY.FPS (with --latency-table)")
    target.add_argument("--list-groups", action="store_true", help="print the channel groups with their FLOPs, exit")
    parser.add_argument("--latency-table", default="", metavar="T", help="TARGET.LATENCY.TABLE (tools/profile_latency.py)")
    parser.add_argument("--input-size", default=None, metavar="HxW", help="TARGET.FLOPS.INPUT_SIZE")
    parser.add_argument("--criterion", default="l1", help="channel score: l1, l2 (filter norms) or bn_gamma")
    parser.add_argument("--allocation", default=None, choices=sorted(name for name, _ in ALLOCATION_REGISTRY),
                        help="ALLOCATION.NAME")
    parser.add_argument("--scopes", default="", metavar="S1,S2", help=f"SCOPES, among {','.join(SCOPES)}")
    parser.add_argument("--multiple", type=int, default=None, help="ROUNDING.MULTIPLE")
    parser.add_argument("--min-channels", type=int, default=None, help="ROUNDING.MIN_CHANNELS")
    parser.add_argument("--floor", type=int, default=None, help=argparse.SUPPRESS)  # renamed: refused in one line
    parser.add_argument("--allow-frozen", action="store_true", help="ALLOW_FROZEN")
    parser.add_argument("--closed-loop", action="store_true",
                        help="on the latency table's device: measure, and prune again until within --tolerance")
    parser.add_argument("--tolerance", type=float, default=0.05, help="closed loop: relative tolerance (default 0.05)")
    parser.add_argument("--max-rounds", type=int, default=4, help="closed loop: most prunings (default 4)")
    parser.add_argument("--timing-rounds", type=int, default=7, help="closed loop: timing rounds (median ratio kept)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="closed loop: time with freed memory kept, as profile_latency --keep-freed-memory profiled")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", default="", metavar="DIR", help="folder for model_pruned.pth and the report")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/model_pruned.pth")
    add_trust_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def request_from(args) -> OneShotRequest:
    if args.floor is not None:
        raise UserInputError("--floor was renamed --min-channels (PRUNING.ROUNDING.MIN_CHANNELS): use --min-channels")
    scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())
    if args.scopes and not scopes:
        raise UserInputError(f"--scopes '{args.scopes}' names no scope; use some of {','.join(SCOPES)}")
    request = OneShotRequest(
        criterion=args.criterion, ratio=args.ratio, flops_reduction=args.flops_reduction,
        target_latency_ms=args.target_latency_ms, target_fps=args.target_fps, latency_table=args.latency_table,
        allocation=args.allocation, scopes=scopes, multiple=args.multiple, min_channels=args.min_channels,
        allow_frozen=args.allow_frozen, input_size=parse_input_size(args.input_size) if args.input_size else None)
    request.check()
    if args.closed_loop and not request.latency:
        raise UserInputError("--closed-loop measures against a latency target: give --latency-table and "
                             "--target-latency-ms or --target-fps")
    if args.threads < 0:
        raise UserInputError(f"--threads {args.threads}: use 0 (torch's choice) or more")
    return request


def run(args) -> int:
    request = request_from(args)
    if args.keep_freed_memory and not args.closed_loop:
        raise UserInputError("--keep-freed-memory sets how the closed loop times: use it with --closed-loop")
    loop = (ClosedLoopSettings(args.tolerance, args.max_rounds, args.timing_rounds, args.keep_freed_memory)
            if args.closed_loop else None)
    if loop:
        loop.check()
    if not args.list_groups:
        if not args.output:
            raise UserInputError("--output DIR is required: the folder for model_pruned.pth and pruning_report.json")
        check_output_dir(args.output, "--output")
        existing = os.path.join(args.output, MODEL_FILE + ".pth")
        if os.path.exists(existing) and not args.overwrite:
            raise UserInputError(f"'{existing}' already exists: pass --overwrite to replace it, or choose another --output")
    cfg = build_run_config(args.config, args.config_file, CONFIGS_DIR, list(args.opts) + request.overrides())
    if args.list_groups:
        print(group_table(cfg, cost_input_size(cfg), trusted=args.trust_weights))
        return 0
    prune_and_write(cfg, request.criterion, args.output, loop, trusted=args.trust_weights, threads=args.threads,
                    config_path=resolve_config_path(args.config, args.config_file, CONFIGS_DIR), overrides=args.opts)
    return 0


def main(argv=None) -> int:
    return run_tool(argument_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())

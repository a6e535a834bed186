#!/usr/bin/env python
"""Prune a Faster R-CNN once, by weight magnitude, and save the smaller model.

Examples::

    python tools/prune_net.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --ratio 0.5 \\
        --output output/synth_pruned MODEL.WEIGHTS output/synth_R_18_FPN/model_final.pth
    python tools/prune_net.py --config-file configs/faster_rcnn_R_50_FPN_voc.yaml --flops-reduction 0.5 \\
        --scopes backbone,fpn --output output/r50_half MODEL.WEIGHTS /path/to/model_final.pth
    python tools/train_net.py --config-file configs/faster_rcnn_R_50_FPN_voc.yaml --eval-only \\
        MODEL.WEIGHTS output/r50_half/model_pruned.pth
    python tools/prune_net.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --latency-table r18_cpu.json \\
        --target-fps 40 --allocation knapsack --output output/synth_40fps MODEL.WEIGHTS output/synth_R_18_FPN/model_final.pth
    python tools/prune_net.py ... --latency-table r18_cpu.json --target-fps 40 --closed-loop ...  # on that device

The flags set the config's ``PRUNING`` keys after the ``KEY VALUE`` overrides (``--ratio``
``RATIO``, ``--flops-reduction`` ``FLOPS_REDUCTION``, ``--latency-table`` ``LATENCY_TABLE`` with
``--target-latency-ms`` / ``--target-fps``, ``--allocation``, ``--scopes``, ``--multiple``
``CHANNEL_MULTIPLE``, ``--floor`` ``MIN_CHANNELS``, ``--allow-frozen``, ``--input-size``
``COST_INPUT_SIZE``, by default the latency table's size, else 800x1333), and
:func:`pgp_det.engine.one_shot.prune_once` prunes the model once to that target, as the training
hook's last step would. No dataset is needed. With ``--closed-loop`` (on the table's device) the
pruned model is timed against the unpruned one in turn, and pruned again from the original with a
corrected budget until the measured share is within ``--tolerance`` of the target
(:func:`pgp_det.engine.closed_loop.prune_to_measured_latency`; every round in the report).

Writes ``--output``/model_pruned.pth (a :class:`pgp_det.checkpoint.PrunedCheckpointer` checkpoint:
``train_net.py --eval-only`` or ``MODEL.WEIGHTS`` of a fine-tuning run rebuild the pruned model
from the config) and ``pruning_report.json`` (FLOPs and parameters before/after, per family;
kept/original channels per group; the settings). Bad input ends with one ``error:`` line on
stderr, exit code 2, and nothing written.
"""
import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)

import torch  # noqa: E402

from pgp_det.config import resolve_config_path  # noqa: E402
from pgp_det.engine.closed_loop import check_table_device, describe_rounds, measured_share  # noqa: E402
from pgp_det.engine.closed_loop import prune_to_measured_latency  # noqa: E402
from pgp_det.engine.one_shot import MODEL_FILE, check_one_shot_criterion, group_table, prune_once  # noqa: E402
from pgp_det.engine.preflight import build_run_config  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.pruning import SCOPES  # noqa: E402
from pgp_det.pruning.allocation import ALLOCATION_REGISTRY  # noqa: E402
from pgp_det.latency.io import load_table  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, add_trust_argument, parse_input_size, run_tool  # noqa: E402
from pgp_det.utils.output_dir import check_output_dir, claim_output_dir  # noqa: E402

CONFIGS_DIR = os.path.join(ROOT, "configs")


def argument_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--config", metavar="NAME.yaml", default="", help="config file inside configs/")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="fraction of each pruned group's channels to remove, in [0, 1)")
    target.add_argument("--flops-reduction", type=float, metavar="F",
                        help="fraction of the FLOPs at --input-size to remove, in (0, 1)")
    target.add_argument("--target-latency-ms", type=float, metavar="X",
                        help="latency the --latency-table must predict at most, in ms")
    target.add_argument("--target-fps", type=float, metavar="F",
                        help="frame rate the --latency-table must predict at least (1000 / F ms)")
    target.add_argument("--list-groups", action="store_true",
                        help="print the model's channel groups with their FLOPs share at --input-size, and exit")
    parser.add_argument("--criterion", default="l1", help="channel score: l1, l2 (filter norms) or bn_gamma")
    parser.add_argument("--allocation", default=None, choices=sorted(name for name, _ in ALLOCATION_REGISTRY),
                        help="how the target is shared among groups (default: PRUNING.ALLOCATION, uniform)")
    parser.add_argument("--scopes", default="", metavar="S1,S2",
                        help=f"parts to prune, among {','.join(SCOPES)} (default: PRUNING.SCOPES, all)")
    parser.add_argument("--multiple", type=int, default=None,
                        help="kept counts are rounded to this multiple (default: PRUNING.CHANNEL_MULTIPLE, 8)")
    parser.add_argument("--floor", type=int, default=None,
                        help="no group keeps fewer channels (default: PRUNING.MIN_CHANNELS, 8)")
    parser.add_argument("--allow-frozen", action="store_true",
                        help="also prune groups touching frozen layers (default: PRUNING.ALLOW_FROZEN)")
    parser.add_argument("--latency-table", default="", metavar="T",
                        help="latency table of the device (tools/profile_latency.py), for --target-latency-ms/--target-fps")
    parser.add_argument("--closed-loop", action="store_true",
                        help="on the latency table's device: time the pruned model against the unpruned one in turn "
                             "and prune again with a corrected budget until the measured share is within --tolerance")
    parser.add_argument("--tolerance", type=float, default=0.05, help="closed loop: relative tolerance (default 0.05)")
    parser.add_argument("--max-rounds", type=int, default=4, help="closed loop: most prunings (default 4)")
    parser.add_argument("--timing-rounds", type=int, default=7,
                        help="closed loop: rounds of timing the two models in turn (the median ratio is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--input-size", default=None, metavar="HxW",
                        help="input size FLOPs are counted at (default: the latency table's, else 800x1333)")
    parser.add_argument("--output", default="", metavar="DIR", help="folder for model_pruned.pth and the report")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/model_pruned.pth")
    add_trust_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def check_args(args) -> None:
    """Reject bad arguments before anything is loaded (the config is checked as it is built)."""
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise UserInputError(f"--ratio {args.ratio} is outside [0, 1): give the fraction of channels to remove")
    if args.flops_reduction is not None and not 0.0 < args.flops_reduction < 1.0:
        raise UserInputError(f"--flops-reduction {args.flops_reduction} is outside (0, 1): give the fraction of FLOPs to remove")
    if args.target_latency_ms is not None or args.target_fps is not None:
        for flag, value in (("--target-latency-ms", args.target_latency_ms), ("--target-fps", args.target_fps)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UserInputError(f"{flag} {value}: give a number > 0")
        if not args.latency_table:
            raise UserInputError("a latency target needs --latency-table T, made by tools/profile_latency.py on the "
                                 "device the model will run on")
    elif args.latency_table:
        raise UserInputError("--latency-table is used with --target-latency-ms or --target-fps; give one of them")
    if args.closed_loop and not args.latency_table:
        raise UserInputError("--closed-loop measures against a latency target: give --latency-table and "
                             "--target-latency-ms or --target-fps")
    if not 0.0 < args.tolerance < 1.0 or args.max_rounds < 1 or args.timing_rounds < 1 or args.threads < 0:
        raise UserInputError("--tolerance must be in (0, 1); --max-rounds and --timing-rounds >= 1; --threads >= 0")
    check_one_shot_criterion(args.criterion)
    if args.scopes and not _scopes(args.scopes):
        raise UserInputError(f"--scopes '{args.scopes}' names no scope; use some of {','.join(SCOPES)}")
    for scope in _scopes(args.scopes):
        if scope not in SCOPES:
            raise UserInputError(f"--scopes: unknown scope {scope!r}; scopes are {','.join(SCOPES)}")
    for flag, value in (("--multiple", args.multiple), ("--floor", args.floor)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} {value}: use an integer >= 1")
    if args.input_size is not None:
        parse_input_size(args.input_size)
    if args.list_groups:
        return
    if not args.output:
        raise UserInputError("--output DIR is required: the folder for model_pruned.pth and pruning_report.json")
    check_output_dir(args.output, "--output")
    existing = os.path.join(args.output, MODEL_FILE + ".pth")
    if os.path.exists(existing) and not args.overwrite:
        raise UserInputError(f"'{existing}' already exists: pass --overwrite to replace it, or choose another --output")


def _scopes(text: str):
    return tuple(s.strip() for s in text.split(",") if s.strip())


def pruning_keys(args) -> list:
    """The ``PRUNING`` keys the flags set, as ``KEY VALUE`` items applied after the user's overrides."""
    if args.flops_reduction is not None:
        keys = ["TARGET", "flops", "FLOPS_REDUCTION", args.flops_reduction]
    elif args.latency_table:
        keys = ["TARGET", "latency", "LATENCY_TABLE", args.latency_table,
                "TARGET_LATENCY_MS", args.target_latency_ms or 0.0, "TARGET_FPS", args.target_fps or 0.0]
    else:
        keys = ["TARGET", "ratio", "RATIO", args.ratio or 0.0]
    keys += ["SCOPE_RATIOS", ()]  # one ratio for every pruned group
    if args.input_size is not None:
        size = parse_input_size(args.input_size)
    else:  # a latency target is met at its table's size
        size = load_table(args.latency_table).input_size if args.latency_table else (800, 1333)
    keys += ["COST_INPUT_SIZE", tuple(size)]
    for key, value in (("ALLOCATION", args.allocation), ("SCOPES", _scopes(args.scopes) or None),
                       ("CHANNEL_MULTIPLE", args.multiple), ("MIN_CHANNELS", args.floor),
                       ("ALLOW_FROZEN", True if args.allow_frozen else None)):
        if value is not None:
            keys += [key, value]
    return [item for i in range(0, len(keys), 2) for item in (f"PRUNING.{keys[i]}", keys[i + 1])]


def run(args) -> int:
    check_args(args)
    cfg = build_run_config(args.config, args.config_file, CONFIGS_DIR, list(args.opts) + pruning_keys(args))
    if args.list_groups:
        print(group_table(cfg, tuple(cfg.PRUNING.COST_INPUT_SIZE), trusted=args.trust_weights))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    report_args = dict(overrides=args.opts, config_path=resolve_config_path(args.config, args.config_file, CONFIGS_DIR))
    with claim_output_dir(args.output, "--output") as output:
        started = time.perf_counter()
        if args.closed_loop:
            table = load_table(args.latency_table)
            check_table_device(table)
            result = prune_to_measured_latency(
                cfg, args.criterion, measured_share(table, args.timing_rounds), tolerance=args.tolerance,
                max_rounds=args.max_rounds, trusted=args.trust_weights, progress=print, **report_args)
        else:
            result = prune_once(cfg, args.criterion, trusted=args.trust_weights, **report_args)
        for line in result.warnings:
            print(f"warning: {line}", file=sys.stderr)
        output.start_writing()
        written = result.write(args.output, cfg)
    print("\n".join(filter(None, [result.summary(), describe_rounds(result.report)])))
    print(f"wrote {', '.join(written)} in {time.perf_counter() - started:.0f} s")
    return 0


def main(argv=None) -> int:
    return run_tool(argument_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())

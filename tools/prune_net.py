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

The prunable channel groups (see ``pgp_det.pruning.derive_channel_groups``) in ``--scopes`` are
pruned in one step by the library's ``--allocation`` (``pgp_det.pruning.allocation``, as the
training hook's last step would: ``uniform`` prunes every group by ``--ratio``, ``global`` and
``adaptive`` share the same total of channels differently), each group keeping the channels with
the highest ``--criterion`` score (``l1``/``l2``: norm of each filter, normalised per producing
layer and averaged over the group's producing layers; ``bn_gamma``: |gamma| of their norms). With
``--flops-reduction F`` every allocation removes F of the FLOPs at ``--input-size`` (predicted by
``pgp_det.pruning.cost.CostModel``; within a fraction of a point, never less). With
``--latency-table T`` (made by ``tools/profile_latency.py`` on the device the model will run on)
and ``--target-latency-ms X`` or ``--target-fps F``, every allocation brings the latency the table
predicts (at ``MODEL.RPN.POST_NMS_TOPK_TEST`` proposals) to at most the target, ``knapsack``
keeping the most importance; the table must fit the model, and ``--input-size`` (default: the
table's) must be the table's. Kept counts are
multiples of ``--multiple`` and at least ``--floor``. Groups touching frozen layers
(``MODEL.BACKBONE.FREEZE_AT``) are pruned only with ``--allow-frozen`` (or
``PRUNING.ALLOW_FROZEN True``). No dataset is needed.

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

from detectron2.utils.env import seed_all_rng  # noqa: E402

from pgp_det.checkpoint import PrunedCheckpointer, load_model  # noqa: E402
from pgp_det.config import resolve_config_path as find_config  # noqa: E402
from pgp_det.engine.preflight import build_run_config  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.pruning import SCOPES, derive_channel_groups, hard_prune  # noqa: E402
from pgp_det.pruning.groups import removable_channels  # noqa: E402
from pgp_det.pruning.allocation import ALLOCATION_REGISTRY  # noqa: E402
from pgp_det.pruning.cost import CostModel, format_group_costs  # noqa: E402
from pgp_det.pruning.criteria import CRITERION_REGISTRY, build_criterion  # noqa: E402
from pgp_det.pruning.hook import plan_pruning_step  # noqa: E402
from pgp_det.pruning.latency import LatencyTable  # noqa: E402
from pgp_det.pruning.target import build_target  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, add_trust_argument, parse_arguments, parse_input_size  # noqa: E402
from pgp_det.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from pgp_det.utils.output_dir import check_output_dir, claim_output_dir  # noqa: E402
from pgp_det.utils.weights import check_weights_available  # noqa: E402

CONFIGS_DIR = os.path.join(ROOT, "configs")
MODEL_FILE = "model_pruned"  # .pth
REPORT_FILE = "pruning_report.json"


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
    parser.add_argument("--input-size", default=None, metavar="HxW",
                        help="input size FLOPs are counted at (default: the latency table's, else 800x1333)")
    parser.add_argument("--output", default="", metavar="DIR", help="folder for model_pruned.pth and the report")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/model_pruned.pth")
    add_trust_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def resolve_config_path(args) -> str:
    """``--config NAME`` is looked up in ``configs/``; ``--config-file PATH`` is taken as is."""
    return find_config(args.config, args.config_file, CONFIGS_DIR)


def build_config(args):
    """The frozen config of this run (no side effects beyond reading files)."""
    return build_run_config(args.config, args.config_file, CONFIGS_DIR, args.opts)


def _one_shot_criteria():
    """Registered criteria that score from the weights alone (no training data or gradients)."""
    names = []
    for name, factory in sorted(CRITERION_REGISTRY):
        criterion = factory()
        if not (criterion.needs_gradients or criterion.needs_activations or criterion.needs_extra_pass):
            names.append(name)
    return names


def check_args(args) -> None:
    """Reject bad arguments before anything is loaded (the config is checked by build_config)."""
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise UserInputError(f"--ratio {args.ratio} is outside [0, 1): give the fraction of channels to remove")
    if args.flops_reduction is not None and not 0.0 < args.flops_reduction < 1.0:
        raise UserInputError(f"--flops-reduction {args.flops_reduction} is outside (0, 1): give the fraction of FLOPs to remove")
    latency_target = args.target_latency_ms is not None or args.target_fps is not None
    if latency_target:
        for flag, value in (("--target-latency-ms", args.target_latency_ms), ("--target-fps", args.target_fps)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UserInputError(f"{flag} {value}: give a number > 0")
        if not args.latency_table:
            raise UserInputError("a latency target needs --latency-table T, made by tools/profile_latency.py on the "
                                 "device the model will run on")
    elif args.latency_table:
        raise UserInputError("--latency-table is used with --target-latency-ms or --target-fps; give one of them")
    usable = _one_shot_criteria()
    if args.criterion not in usable:
        why = "needs training (gradients or activations)" if args.criterion in CRITERION_REGISTRY else "is unknown"
        raise UserInputError(f"--criterion {args.criterion!r} {why}; one-shot pruning takes {', '.join(usable)}")
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
    _check_output(args.output, args.overwrite)


def _scopes(text: str):
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _check_output(directory: str, overwrite: bool) -> None:
    check_output_dir(directory, "--output")
    existing = os.path.join(directory, MODEL_FILE + ".pth")
    if os.path.exists(existing) and not overwrite:
        raise UserInputError(f"'{existing}' already exists: pass --overwrite to replace it, or choose another --output")


def prune(cfg, args) -> dict:
    """Load ``cfg``'s model, prune it as ``args`` say; return the model and the report (nothing
    is written)."""
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)  # a randomly initialised model is reproducible
    weights = cfg.MODEL.WEIGHTS
    if weights:
        weights = check_weights_available(weights)
    # partial checkpoints are fine: an ImageNet backbone is pruned before the detector is trained
    model = load_model(cfg, weights, strict=False, trusted=args.trust_weights)
    allow_frozen = bool(args.allow_frozen or cfg.PRUNING.ALLOW_FROZEN)
    scopes = _scopes(args.scopes) if args.scopes else tuple(cfg.PRUNING.SCOPES)
    multiple = args.multiple if args.multiple is not None else int(cfg.PRUNING.CHANNEL_MULTIPLE)
    floor = args.floor if args.floor is not None else int(cfg.PRUNING.MIN_CHANNELS)
    if args.input_size is not None:
        height, width = parse_input_size(args.input_size)
    else:
        height, width = LatencyTable.load(args.latency_table).input_size if args.latency_table else (800, 1333)

    groups = derive_channel_groups(model, allow_frozen=allow_frozen)
    if removable_channels(groups, scopes, floor) == 0:
        print(f"warning: --floor / PRUNING.MIN_CHANNELS {floor} is at least the width of every prunable group in "
              f"{','.join(scopes)}: nothing will be pruned; lower it", file=sys.stderr)
    costs = CostModel(model, height, width)
    before = costs.predict({})  # the measurement itself: nothing pruned yet
    allocation = args.allocation or cfg.PRUNING.ALLOCATION
    # one-shot pruning is the hook's pruning step 1 of 1 (the final target at once), on the target
    # these flags name, in the config's words
    step = cfg.clone()
    step.defrost()
    step.PRUNING.merge_from_list([
        "TARGET", "flops" if args.flops_reduction is not None else "latency" if args.latency_table else "ratio",
        "RATIO", args.ratio or 0.0, "FLOPS_REDUCTION", args.flops_reduction or 0.0, "SCOPES", scopes,
        "SCOPE_RATIOS", (), "LATENCY_TABLE", args.latency_table, "TARGET_LATENCY_MS", args.target_latency_ms or 0.0,
        "TARGET_FPS", args.target_fps or 0.0, "COST_INPUT_SIZE", (height, width), "ALLOCATION", allocation,
        "CHANNEL_MULTIPLE", multiple, "MIN_CHANNELS", floor,
    ])
    target = build_target(step, groups, cost_model=lambda: costs)
    pruned = {name: g for name, g in groups.items() if g.prunable and g.scope in scopes}
    ratio = next(iter(target.ratios(pruned).values()), None)

    criterion = build_criterion(args.criterion)
    criterion.attach(model, groups)
    scores = criterion.scores(model)
    weak = plan_pruning_step(step, model, pruned, scores, 1, 1, {name: g.size for name, g in pruned.items()}, target)
    for line in target.warnings:  # after every refusal: a refused request gets its one line only
        print(f"warning: {line}", file=sys.stderr)
    removals = {name: channels for name, channels in weak.items() if channels}
    sizes = {name: group.size - len(removals.get(name, ())) for name, group in groups.items()}
    hard_prune(model, removals, allow_frozen=allow_frozen, groups=groups)
    predicted = costs.predict(sizes)
    after = CostModel(model, height, width).predict({})  # measured again, on the pruned model

    def per_family(values: dict, scale: float) -> dict:
        return {family: value / scale for family, value in values.items()}

    def reduction(old: float, new: float) -> float:
        return 100.0 * (1.0 - new / old) if old else 0.0

    if args.flops_reduction is not None:
        requested = {"flops_reduction": args.flops_reduction}
    elif args.latency_table:
        requested = {"target_latency_ms": args.target_latency_ms} if args.target_latency_ms else {"target_fps": args.target_fps}
    else:
        requested = {"ratio": args.ratio}
    flops_before = per_family(before["flops_per_family"], 1e9)
    flops_after = per_family(after["flops_per_family"], 1e9)
    report = {
        "config": resolve_config_path(args),
        "weights": cfg.MODEL.WEIGHTS,
        "settings": {
            "criterion": args.criterion,
            "allocation": allocation,
            "ratio": None if args.latency_table else ratio,
            "requested": requested,
            "scopes": list(scopes),
            "multiple": multiple,
            "floor": floor,
            "allow_frozen": allow_frozen,
            "input_size": [height, width],
            "overrides": list(args.opts),
        },
        "flops": {
            "input_size": [height, width],
            "before_gflops": before["gflops"],
            "after_gflops": after["gflops"],
            "predicted_after_gflops": predicted["gflops"],
            "reduction_percent": reduction(before["gflops"], after["gflops"]),
            "before_gflops_per_family": flops_before,
            "after_gflops_per_family": flops_after,
            "reduction_percent_per_family": {f: reduction(flops_before[f], flops_after[f]) for f in flops_before},
        },
        "params": {
            "before": before["params"],
            "after": after["params"],
            "reduction_percent": reduction(before["params"], after["params"]),
            "before_per_family": before["params_per_family"],
            "after_per_family": after["params_per_family"],
        },
        "groups": {
            name: {
                "scope": group.scope,
                "original": group.size,
                "kept": sizes[name],
                **({} if group.prunable else {"fixed": group.reason}),
                **({} if group.scope in scopes else {"out_of_scope": True}),
            }
            for name, group in groups.items()
        },
    }
    report.update(target.report(sizes))
    return {"model": model, "report": report}


def group_table(cfg, args) -> str:
    """The channel groups of ``cfg``'s model: name, scope, size, GFLOPs share, parameters, and
    whether each may be pruned."""
    weights = check_weights_available(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else ""
    model = load_model(cfg, weights, strict=False, trusted=args.trust_weights)
    groups = derive_channel_groups(model, allow_frozen=bool(args.allow_frozen or cfg.PRUNING.ALLOW_FROZEN))
    costs = CostModel(model, *parse_input_size(args.input_size or "800x1333")).group_costs()
    table = format_group_costs(groups, costs).splitlines()
    fixed = {name: f"fixed: {g.reason}" for name, g in groups.items() if not g.prunable}
    return "\n".join([table[0]] + [f"{line}  {fixed.get(name, '')}".rstrip() for name, line in zip(costs, table[1:])])


def write_outputs(cfg, model, report: dict, directory: str) -> list:
    """DIR/model_pruned.pth (not tagged as ``last_checkpoint``: it is no training run to resume),
    DIR/pruning_report.json and DIR/config.yaml (the config, ``MODEL.WEIGHTS`` pointing at the
    pruned checkpoint, for ``eval_map_fps.py --model`` or ``train_net.py --config-file`` to
    fine-tune it), each written atomically."""
    os.makedirs(directory, exist_ok=True)
    PrunedCheckpointer(model, save_dir=directory, save_to_disk=True).save(MODEL_FILE, tag_last_checkpoint=False)
    report_path = atomic_write_json(report, os.path.join(directory, REPORT_FILE))
    weights = os.path.abspath(os.path.join(directory, MODEL_FILE + ".pth"))
    config = cfg.clone()
    config.defrost()
    config.MODEL.WEIGHTS = weights
    config_path = atomic_write_text(os.path.join(directory, "config.yaml"), config.dump())
    return [weights, report_path, config_path]


def summary(report: dict) -> str:
    flops, params, groups = report["flops"], report["params"], report["groups"].values()
    pruned = sum(1 for g in groups if g["kept"] < g["original"])
    settings = report["settings"]
    families = ", ".join(
        f"{family} {flops['before_gflops_per_family'][family]:.2f}->{flops['after_gflops_per_family'].get(family, 0.0):.2f}"
        for family in flops["before_gflops_per_family"]
    )
    height, width = flops["input_size"]
    ratio = "" if settings["ratio"] is None else f"ratio {settings['ratio']:.3f}, "
    lines = [
        f"pruned {pruned} of {len(report['groups'])} channel groups ({settings['criterion']}, "
        f"{settings['allocation']} allocation, {ratio}scopes {','.join(settings['scopes'])}, "
        f"multiple {settings['multiple']}, floor {settings['floor']})",
        f"GFLOPs at {height}x{width}: {flops['before_gflops']:.2f} -> {flops['after_gflops']:.2f} "
        f"(-{flops['reduction_percent']:.1f}%; {families})",
        f"parameters: {params['before'] / 1e6:.2f} M -> {params['after'] / 1e6:.2f} M (-{params['reduction_percent']:.1f}%)",
    ]
    latency = report.get("latency")
    if latency:
        lines.append(
            f"latency predicted on {latency['device']}, {latency['proposals']} proposals: {latency['before_ms']:.3f} ms -> "
            f"{latency['predicted_after_ms']:.3f} ms (target {latency['target_ms']:.3f} ms)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args, cfg, code = parse_arguments(argument_parser(), argv, check_args, build_config)
    if args is None:
        return code
    try:
        if args.list_groups:
            print(group_table(cfg, args))
            return 0
        with claim_output_dir(args.output, "--output") as output:
            started = time.perf_counter()
            result = prune(cfg, args)
            output.start_writing()
            written = write_outputs(cfg, result["model"], result["report"], args.output)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(result["report"]))
    print(f"wrote {', '.join(written)} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

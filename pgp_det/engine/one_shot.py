"""One-shot pruning: a trained (or freshly initialised) detector pruned once, to the target its
config's ``PRUNING`` node names, by a criterion that needs only the weights.

One-shot pruning is the training hook's pruning step 1 of 1 (the final target at once): the same
target (:func:`~pgp_det.pruning.target.build_target`), allocation and rounding, read from the same
keys (``TARGET`` and its keys, ``SCOPES``, ``ALLOCATION.NAME``, ``ROUNDING``, ``ALLOW_FROZEN``).
Per-scope ratios (``TARGET.CHANNELS.SCOPE_RATIOS``) are not used: one-shot pruning takes one ratio
for every pruned group. Use::

    result = prune_once(cfg, "l1")      # loads MODEL.WEIGHTS; nothing is written
    print(result.summary())
    result.write("output/pruned", cfg)  # model_pruned.pth, pruning_report.json, config.yaml
"""
import os
from dataclasses import dataclass, field
from typing import List, Tuple

import torch.nn as nn
from detectron2.utils.env import seed_all_rng

from ..checkpoint import PrunedCheckpointer, load_model
from ..errors import UserInputError
from ..pruning import derive_channel_groups, hard_prune
from ..pruning.cost import CostModel, format_group_costs
from ..pruning.criteria import CRITERION_REGISTRY, build_criterion
from ..pruning.groups import removable_channels
from ..pruning.hook import plan_pruning_step
from ..pruning.target import build_target, cost_input_size
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.weights import check_weights_available

__all__ = ["MODEL_FILE", "REPORT_FILE", "OneShotResult", "check_one_shot_criterion", "group_table", "load_model_to_prune",
           "one_shot_criteria", "prune_once"]

MODEL_FILE = "model_pruned"  # .pth
REPORT_FILE = "pruning_report.json"


def one_shot_criteria() -> List[str]:
    """Registered criteria that score from the weights alone (no training data or gradients)."""
    names = []
    for name, factory in sorted(CRITERION_REGISTRY):
        criterion = factory()
        if not (criterion.needs_gradients or criterion.needs_activations or criterion.needs_extra_pass):
            names.append(name)
    return names


def check_one_shot_criterion(name: str, option: str = "--criterion") -> None:
    """Raises:
        UserInputError: ``name`` is unknown, or needs training (gradients, activations)."""
    usable = one_shot_criteria()
    if name not in usable:
        why = "needs training (gradients or activations)" if name in CRITERION_REGISTRY else "is unknown"
        raise UserInputError(f"{option} {name!r} {why}; one-shot pruning takes {', '.join(usable)}")


@dataclass
class OneShotResult:
    """A pruned model and its report (``pruning_report.json``: FLOPs and parameters before and
    after, per family; kept/original channels per group; the settings; what the target says)."""

    model: nn.Module
    report: dict
    warnings: List[str] = field(default_factory=list)  # what the caller should show the user

    def summary(self) -> str:
        """Three or four lines for the terminal: groups pruned, GFLOPs, parameters, latency."""
        report = self.report
        flops, params, groups = report["flops"], report["params"], report["groups"].values()
        pruned = sum(1 for g in groups if g["kept"] < g["original"])
        settings = report["settings"]
        families = ", ".join(
            f"{family} {flops['before_gflops_per_family'][family]:.2f}->"
            f"{flops['after_gflops_per_family'].get(family, 0.0):.2f}"
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
            f"parameters: {params['before'] / 1e6:.2f} M -> {params['after'] / 1e6:.2f} M "
            f"(-{params['reduction_percent']:.1f}%)",
        ]
        latency = report.get("latency")
        if latency:
            lines.append(
                f"latency predicted on {latency['device']}, {latency['proposals']} proposals: {latency['before_ms']:.3f} "
                f"ms -> {latency['predicted_after_ms']:.3f} ms (target {latency['target_ms']:.3f} ms"
                + (f", the table's budget after the closed loop {latency['budget_ms']:.3f} ms)" if "budget_ms" in latency
                   else ")")
            )
        return "\n".join(lines)

    def write(self, directory: str, cfg) -> List[str]:
        """Write, each atomically, ``directory``/model_pruned.pth (a
        :class:`~pgp_det.checkpoint.PrunedCheckpointer` checkpoint, not tagged as
        ``last_checkpoint``: it is no training run to resume), ``pruning_report.json`` and
        ``config.yaml`` (``cfg`` with ``MODEL.WEIGHTS`` pointing at the pruned checkpoint, for
        ``eval_map_fps.py --model`` or ``train_net.py --config-file`` to fine-tune it); return
        their paths. The caller has checked and claimed ``directory``
        (:func:`~pgp_det.utils.output_dir.claim_output_dir`)."""
        os.makedirs(directory, exist_ok=True)
        PrunedCheckpointer(self.model, save_dir=directory, save_to_disk=True).save(MODEL_FILE, tag_last_checkpoint=False)
        report_path = atomic_write_json(self.report, os.path.join(directory, REPORT_FILE))
        weights = os.path.abspath(os.path.join(directory, MODEL_FILE + ".pth"))
        config = cfg.clone()
        config.defrost()
        config.MODEL.WEIGHTS = weights
        config_path = atomic_write_text(os.path.join(directory, "config.yaml"), config.dump())
        return [weights, report_path, config_path]


def load_model_to_prune(cfg, trusted: bool = False) -> nn.Module:
    """``cfg``'s model with ``MODEL.WEIGHTS`` loaded (a partial checkpoint is fine), or seeded random
    weights (``SEED``): what one-shot pruning starts from."""
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)  # a randomly initialised model is reproducible
    weights = check_weights_available(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else ""
    # partial checkpoints are fine: an ImageNet backbone is pruned before the detector is trained
    return load_model(cfg, weights, strict=False, trusted=trusted)


def _per_family(values: dict) -> dict:
    return {family: value / 1e9 for family, value in values.items()}


def _reduction(old: float, new: float) -> float:
    return 100.0 * (1.0 - new / old) if old else 0.0


def prune_once(cfg, criterion: str = "l1", *, trusted: bool = False, config_path: str = "",
               overrides=()) -> OneShotResult:
    """Load ``cfg``'s model (``MODEL.WEIGHTS``, or a seeded random initialisation) and prune it
    once to ``cfg.PRUNING``'s target, each pruned group keeping its channels with the highest
    ``criterion`` scores; nothing is written.

    Args:
        cfg: the run's config; FLOPs are counted at
            :func:`~pgp_det.pruning.target.cost_input_size` (``PRUNING.TARGET.FLOPS.INPUT_SIZE``,
            or a latency target's table size).
        criterion: a registered criterion that needs only the weights (:func:`one_shot_criteria`).
        trusted: load weights files that pickle Python objects (runs code they hold).
        config_path, overrides: recorded in the report (how the config was made).

    Raises:
        UserInputError: unknown criterion, unreadable weights, an unreachable target (one line
            naming the fix).
    """
    check_one_shot_criterion(criterion)
    p = cfg.PRUNING
    model = load_model_to_prune(cfg, trusted)
    scopes = tuple(p.SCOPES)
    height, width = cost_input_size(cfg)
    groups = derive_channel_groups(model, allow_frozen=p.ALLOW_FROZEN)
    costs = CostModel(model, height, width)
    before = costs.predict({})  # the measurement itself: nothing pruned yet
    target = build_target(cfg, groups, cost_model=lambda: costs)  # refuses an unreachable target first
    warnings = list(target.warnings)
    if removable_channels(groups, scopes, p.ROUNDING.MIN_CHANNELS) == 0:
        warnings.append(f"PRUNING.ROUNDING.MIN_CHANNELS (--min-channels) {p.ROUNDING.MIN_CHANNELS} is at least the width "
                        f"of every prunable group in {','.join(scopes)}: nothing will be pruned; lower it")
    pruned = {name: g for name, g in groups.items() if g.prunable and g.scope in scopes}
    ratio = target.uniform_ratio(pruned)

    scorer = build_criterion(criterion)
    scorer.attach(model, groups)
    weak = plan_pruning_step(cfg, model, pruned, scorer.scores(model), 1, 1,
                             {name: group.size for name, group in pruned.items()}, target)
    removals = {name: channels for name, channels in weak.items() if channels}
    sizes = {name: group.size - len(removals.get(name, ())) for name, group in groups.items()}
    hard_prune(model, removals, allow_frozen=p.ALLOW_FROZEN, groups=groups)
    predicted = costs.predict(sizes)
    after = CostModel(model, height, width).predict({})  # measured again, on the pruned model

    flops_before, flops_after = _per_family(before["flops_per_family"]), _per_family(after["flops_per_family"])
    report = {
        "config": config_path,
        "weights": cfg.MODEL.WEIGHTS,
        "settings": {
            "criterion": criterion,
            "allocation": p.ALLOCATION.NAME,
            "ratio": ratio,
            "requested": target.request(),
            "scopes": list(scopes),
            "multiple": int(p.ROUNDING.MULTIPLE),
            "floor": int(p.ROUNDING.MIN_CHANNELS),
            "allow_frozen": bool(p.ALLOW_FROZEN),
            "input_size": [height, width],
            "overrides": list(overrides),
        },
        "flops": {
            "input_size": [height, width],
            "before_gflops": before["gflops"],
            "after_gflops": after["gflops"],
            "predicted_after_gflops": predicted["gflops"],
            "reduction_percent": _reduction(before["gflops"], after["gflops"]),
            "before_gflops_per_family": flops_before,
            "after_gflops_per_family": flops_after,
            "reduction_percent_per_family": {f: _reduction(flops_before[f], flops_after[f]) for f in flops_before},
        },
        "params": {
            "before": before["params"],
            "after": after["params"],
            "reduction_percent": _reduction(before["params"], after["params"]),
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
    return OneShotResult(model, report, warnings)


def group_table(cfg, input_size: Tuple[int, int], *, trusted: bool = False) -> str:
    """The channel groups of ``cfg``'s model, one line each: name, scope, size, GFLOPs at
    ``input_size`` (height, width) and their share, parameters, and why a group is fixed."""
    model = load_model_to_prune(cfg, trusted)
    groups = derive_channel_groups(model, allow_frozen=bool(cfg.PRUNING.ALLOW_FROZEN))
    costs = CostModel(model, *input_size).group_costs()
    table = format_group_costs(groups, costs).splitlines()
    fixed = {name: f"fixed: {g.reason}" for name, g in groups.items() if not g.prunable}
    return "\n".join([table[0]] + [f"{line}  {fixed.get(name, '')}".rstrip() for name, line in zip(costs, table[1:])])

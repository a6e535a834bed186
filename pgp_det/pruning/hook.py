"""Progressive pruning while training, as a detectron2 hook.

At each pruning step ``k`` of ``K`` (iterations set by ``PRUNING.SCHEDULE.START/END/INTERVAL``):

1. the criterion's scores (accumulated since the previous step from what training already
   computed) rank each group's current channels;
2. the schedule gives the fraction ``p_k`` of each group's *original* channels to be gone (with
   ``TARGET.KIND flops``: of the original FLOPs, which every allocation meets at
   ``TARGET.FLOPS.INPUT_SIZE``; with ``latency``: of the way from the unpruned model's latency, predicted by the
   device's :class:`~pgp_det.latency.table.LatencyTable`, to the target), and the allocation
   picks the weak set: the channels that must not survive this step (:func:`plan_pruning_step`);
3. the lowest ``SOFT.REMOVE_RATIO`` share of the weak set is removed physically (surgery: smaller
   tensors, optimizer momentum sliced; removed channels that are still zeroed have their constant
   output folded into their consumers), the rest is zeroed: its filter weights are set to 0 (and
   their momentum cleared with ``SOFT.MODE "pgp"``), while its bias and norm parameters stay, so
   it keeps receiving gradient and may grow back before the next step, unless ``SOFT.KEEP_ZEROED``
   masks its filters. At step ``K`` the whole weak set is removed, so the model ends physically at
   the target. Each step logs how many of the channels zeroed by the previous step grew back.

Decisions depend only on values that are identical on every rank (scores are all-reduced by
the criterion), and each step checks that all ranks chose the same channels before surgery.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Dict, List, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..utils.io import atomic_write_json
from ..utils.modules import rewrap_model, unwrap_model
from .allocation import allocate
from .channel_stats import protect_by_gradient, weight_sparsity
from .weak_sets import split_hard_soft, whole_widths
from .criteria import RecentGradientCriterion, build_criterion
from .dependency import derive_channel_groups
from .loss_change import LossChangeEstimate
from .schedules import pruned_fraction, resolve_pruning_iterations
from .surgery import ChannelMasks, hard_prune, zeroed_channels
from .target import PruningTarget, build_target, cost_input_size

__all__ = ["PGPHook", "iterations_per_epoch", "plan_pruning_step"]

logger = logging.getLogger(__name__)


def plan_pruning_step(cfg, model, groups, scores, step: int, num_steps: int, original_sizes: Dict[str, int],
                      target: PruningTarget, protected=None, zeroed=None, normalisation: str = "mean",
                      values=None) -> Dict[str, List[int]]:
    """The weak set of every pruned group at pruning step ``step`` of ``num_steps``, as the hook
    decides it (one-shot pruning is step 1 of 1: the final target at once).

    The step's budget is the schedule's share of the final ``target``
    (:meth:`~pgp_det.pruning.target.PruningTarget.budget`; with a channel target each group is
    scheduled to have lost ``p_k(ratio)`` of its original channels, ``p_k`` =
    :func:`~pgp_det.pruning.schedules.pruned_fraction` of ``PRUNING.SCHEDULE.NAME``). ``adaptive``
    measures weight sparsity over live channels only (``zeroed`` left out).

    Args:
        cfg: reads ``PRUNING.SCHEDULE.NAME``, ``ALLOCATION.NAME`` and ``ROUNDING``.
        model: the model being pruned (its weights, for ``adaptive``).
        groups: ``{name: ChannelGroup}``, the pruned groups at their current sizes.
        scores: ``{group: (C,) scores}`` of the criterion.
        original_sizes: ``{group: C0}``, sizes before the first step.
        target: the run's :class:`~pgp_det.pruning.target.PruningTarget` (:func:`build_target`).
        protected: ``{group: bool (C,)}`` channels kept out of the weak sets.
        zeroed: ``{group: channel indices}`` zeroed by the previous step.
        normalisation: the criterion's ``global_normalisation`` (``global`` ranks FRS's
            per-layer L2-normalised scores as they are).
        values: ``knapsack``: ``{group: (C,)}`` worth of each channel on one scale for all
            groups (the hook's :class:`~pgp_det.pruning.loss_change.LossChangeEstimate` with
            ``ALLOCATION.KNAPSACK_VALUE`` ``taylor``/``taylor_squared``); None: the normalised scores.

    Returns:
        ``{group: sorted weak channel indices}`` (see :func:`~pgp_det.pruning.allocation.allocate`);
        at the last step, :func:`~pgp_det.pruning.weak_sets.whole_widths` of them.
    """
    p = cfg.PRUNING
    ratios = target.ratios(groups)
    fractions = {name: pruned_fraction(p.SCHEDULE.NAME, step, num_steps, ratios[name]) for name in groups}
    sparsity = weight_sparsity(model, groups, excluded=zeroed) if p.ALLOCATION.NAME == "adaptive" else None
    weak = allocate(
        p.ALLOCATION.NAME, scores, groups, fractions, original_sizes, multiple=p.ROUNDING.MULTIPLE, floor=p.ROUNDING.MIN_CHANNELS,
        weight_sparsity=sparsity, protected=protected, budget=target.budget(p.SCHEDULE.NAME, step, num_steps),
        normalisation=normalisation, values=values, knapsack_objective=p.ALLOCATION.KNAPSACK_OBJECTIVE,
    )
    if step == num_steps:  # the widths kept for good are whole multiples
        weak = whole_widths(weak, scores, groups, p.ROUNDING.MULTIPLE, p.ROUNDING.MIN_CHANNELS)
    return weak


def _digest(decision: Dict[str, List[int]]) -> str:
    return hashlib.sha1(json.dumps(decision, sort_keys=True).encode()).hexdigest()[:16]


class PGPHook(HookBase):
    """Prune the trainer's model progressively during training (see the module docstring).

    Logs to detectron2's event storage at each step: ``pruning/step``, ``pruning/kept_<scope>``
    (channels kept in each scope), ``pruning/gflops`` (at ``PRUNING.TARGET.FLOPS.INPUT_SIZE``),
    ``pruning/params_m``, ``pruning/regrown`` (channels zeroed by the previous step whose filters
    are no longer all zero), ``pruning/step_seconds`` and, with a latency target,
    ``pruning/latency_ms`` (the table's prediction for the model's widths after the step, zeroed
    channels included: they still compute until removed) and ``pruning/latency_kept_ms`` (for
    the kept channels only: what the step's budget limits); and keeps ``pruning_log.json`` in
    ``OUTPUT_DIR`` (per step also ``previously_zeroed``, ``regrown``, ``regrown_per_group``, and
    ``latency_ms``, ``latency_kept_ms``, ``latency_budget_ms``).
    Its state (schedule position, original sizes, masks, criterion accumulators) goes into the
    trainer's checkpoints, so ``--resume`` continues the schedule.
    """

    def __init__(self, cfg, iters_per_epoch: Optional[int] = None):
        self.cfg = cfg
        p = cfg.PRUNING
        self.step_iters = resolve_pruning_iterations(cfg, iters_per_epoch)
        self.start_iter = int(p.SCHEDULE.START * (iters_per_epoch if p.SCHEDULE.UNIT == "epoch" else 1))
        self.criterion = build_criterion(p.CRITERION.NAME)
        # protection watches a recent-gradient statistic of its own, whatever the criterion:
        # gradient L1 with a half-life of a quarter of the shortest interval between steps
        self.protector = None
        if p.ALLOCATION.PROTECT_QUANTILE > 0:
            bounds = [self.start_iter] + self.step_iters
            shortest = min(b - a for a, b in zip(bounds, bounds[1:]))
            self.protector = RecentGradientCriterion(half_life=max(1.0, shortest / 4))
        # the knapsack's values on one scale for all groups: an estimate of its own, any criterion
        self.value_estimate = None
        if p.ALLOCATION.NAME == "knapsack" and p.ALLOCATION.KNAPSACK_VALUE != "scores":
            self.value_estimate = LossChangeEstimate(p.ALLOCATION.KNAPSACK_VALUE)
        self.masks = ChannelMasks(mode=p.SOFT.MODE)  # zeroes filters (and, in "pgp", their momentum)
        self.steps_done = 0
        self.original_sizes: Dict[str, int] = {}
        self.target: Optional[PruningTarget] = None  # built in before_train, at the original widths
        self.log: List[dict] = []
        self.zeroed: Dict[str, List[int]] = {}  # channels zeroed by the last step (current numbering)
        self.hook_seconds = 0.0
        self._restored: Optional[dict] = None
        self._groups = None
        self._cost_model = None
        self._extra_data = None  # the extra pass's own data iterator, built when first needed

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return unwrap_model(self.trainer.model)

    def _derive(self):
        groups = derive_channel_groups(self.model, allow_frozen=self.cfg.PRUNING.ALLOW_FROZEN)
        scopes = set(self.cfg.PRUNING.SCOPES)
        self._groups = groups
        self.pruned_groups = {n: g for n, g in groups.items() if g.prunable and g.scope in scopes}
        return groups

    def _criteria(self):
        return [c for c in (self.criterion, self.protector) if c is not None]

    def _attach(self):
        for criterion in dict.fromkeys(self._criteria()):
            criterion.attach(self.model, self.pruned_groups)
        if self.value_estimate is not None:
            self.value_estimate.attach(self.model, self.pruned_groups)

    def _build_target(self):
        """The run's target, built from the config at the model's original widths (a resumed
        run's model is already pruned)."""
        p = self.cfg.PRUNING
        original = {n: dataclasses.replace(g, size=self.original_sizes.get(n, g.size)) for n, g in self._groups.items()}
        self.target = build_target(self.cfg, original, cost_model=self._cost)
        for line in self.target.warnings:
            logger.warning(line)
        logger.info("PRUNING.TARGET.KIND %s: each step's %s allocation meets the schedule's share of %s", p.TARGET.KIND,
                    p.ALLOCATION.NAME, self.target.describe())

    def _extra_pass_data(self):
        """The batches of the criterion's extra pass: an iterator of its own over the training set,
        built as the trainer builds its loader (``build_train_loader``), so that training still
        sees every batch of its own stream."""
        if self._extra_data is None:
            self._extra_data = iter(self.trainer.build_train_loader(self.cfg))
        return self._extra_data

    def _cost(self):
        from .cost import CostModel

        if self._cost_model is None:
            height, width = cost_input_size(self.cfg)
            # referred to the original widths: a resumed run measures the model already pruned
            self._cost_model = CostModel(self.model, height, width).rescaled(self.original_sizes)
        return self._cost_model

    # -- HookBase ---------------------------------------------------------------------------------

    def before_train(self):
        started = time.perf_counter()
        self._derive()
        if not self.pruned_groups:
            raise ValueError(f"PRUNING.SCOPES {tuple(self.cfg.PRUNING.SCOPES)} contain no prunable channel group")
        if self._restored is not None:
            state, self._restored = self._restored, None
            self.steps_done = state["steps_done"]
            self.original_sizes = dict(state["original_sizes"])
            self.log = list(state["log"])
            self._attach()
            if state["criterion"] is not None:  # None once every step is done
                self.criterion.load_state_dict(state["criterion"])
            if self.protector is not None and self.protector is not self.criterion and state.get("protector"):
                self.protector.load_state_dict(state["protector"])
            if self.value_estimate is not None and state.get("values"):
                self.value_estimate.load_state_dict(state["values"])
            self.masks.load(self._groups, state["masked"])
            self.zeroed = dict(state["zeroed"])
            self._build_target()
        else:
            self.original_sizes = {name: g.size for name, g in self.pruned_groups.items()}
            self._build_target()
            self._attach()
        logger.info("pruning %d channel groups at iterations %s (%d done)", len(self.pruned_groups),
                    self.step_iters, self.steps_done)
        self.hook_seconds += time.perf_counter() - started

    def after_step(self):
        started = time.perf_counter()
        done = self.trainer.iter + 1  # iterations completed, this one included
        if self.steps_done < len(self.step_iters) and done > self.start_iter:
            for criterion in dict.fromkeys(self._criteria()):
                if criterion.needs_gradients or criterion.needs_activations:
                    criterion.update(self.model)
            if self.value_estimate is not None:
                self.value_estimate.update()
            if len(self.masks):
                self.masks.apply(self.model, self.trainer.optimizer)
            if done in self.step_iters[self.steps_done:]:
                self._prune_step()
        self.hook_seconds += time.perf_counter() - started

    def after_train(self):
        self.trainer.storage.put_scalar("pruning/hook_seconds", self.hook_seconds, smoothing_hint=False)

    # -- a pruning step ---------------------------------------------------------------------------

    def _regrown(self) -> Dict[str, int]:
        """Per group, how many channels zeroed by the previous step have a non-zero filter now."""
        counts = {}
        for name, channels in self.zeroed.items():
            group = self.pruned_groups.get(name)
            if group is not None and channels:
                alive = ~zeroed_channels(self.model, group)[torch.tensor(channels, dtype=torch.long)]
                counts[name] = int(alive.sum())
        return counts

    def _prune_step(self):
        started = time.perf_counter()
        p = self.cfg.PRUNING
        step = self.steps_done + 1
        num_steps = len(self.step_iters)
        model = self.model
        # before this step zeroes anything: what became of the previous step's zeroed channels
        regrown = self._regrown()
        previously_zeroed = sum(len(v) for v in self.zeroed.values())
        if self.criterion.needs_extra_pass:
            self.criterion.run_extra_pass(model, self._extra_pass_data(), p.CRITERION.EXTRA_PASS_BATCHES)
        scores = self.criterion.scores(model)
        protected = None
        if self.protector is not None:
            protected = protect_by_gradient(self.protector.scores(model), quantile=p.ALLOCATION.PROTECT_QUANTILE)
        weak = plan_pruning_step(
            self.cfg, model, self.pruned_groups, scores, step, num_steps, self.original_sizes, self.target,
            protected=protected, zeroed=self.zeroed, normalisation=self.criterion.global_normalisation,
            values=None if self.value_estimate is None else self.value_estimate.values(),
        )
        remove_ratio = 1.0 if step == num_steps else float(p.SOFT.REMOVE_RATIO)
        remove, zero = split_hard_soft(weak, scores, remove_ratio, groups=self.pruned_groups)
        remove = {name: list(idx) for name, idx in remove.items() if len(idx)}
        zero = {name: list(idx) for name, idx in zero.items() if len(idx)}
        digests = self._check_same_on_all_ranks({"remove": remove, "zero": zero})

        # zeroed channels are re-decided at every step: the previous masks end here
        self.masks.clear()
        for name, indices in zero.items():
            self.masks.add(self.pruned_groups[name], indices)
        before = self._groups
        hard_prune(model, remove, optimizer=self.trainer.optimizer, allow_frozen=p.ALLOW_FROZEN, groups=before)
        after = self._derive()
        self.masks.after_hard_prune(after, remove)
        self.masks.apply(model, self.trainer.optimizer)
        self.zeroed = self.masks.masked()
        if not (p.SOFT.KEEP_ZEROED or p.SOFT.MODE == "zero_path"):
            # zero_path channels wait, dead, for the next step (the authors' code): held at zero,
            # since a norm-free layer with no ReLU after it (FPN) would otherwise learn them back
            self.masks.clear()
        # the scores restart from zero after every step: re-attaching to the new groups does both
        self._attach()
        if remove:
            # a DistributedDataParallel wrapper holds the old parameters: wrap the smaller model anew
            rewrap_model(self.trainer)
        self.steps_done = step
        seconds = time.perf_counter() - started
        self._record(step, num_steps, remove, zero, remove_ratio, (previously_zeroed, regrown), digests, seconds)

    def _check_same_on_all_ranks(self, decision) -> List[str]:
        """Each rank's digest of ``decision``; raises before any surgery if they differ."""
        digests = comm.all_gather(_digest(decision))
        if len(set(digests)) != 1:
            raise RuntimeError(f"pruning decisions differ across ranks ({digests}): scores were not reduced")
        return digests

    def _record(self, step, num_steps, remove, zero, remove_ratio, recovery, digests, seconds):
        """``remove_ratio``: the share of the weak sets asked to be removed at this step;
        ``recovery``: (channels zeroed by the previous step, ``{group: how many regrew}``)."""
        kept = {}
        for name, group in self.pruned_groups.items():
            kept[group.scope] = kept.get(group.scope, 0) + group.size
        sizes = {name: g.size for name, g in self._groups.items()}
        cost = self._cost().predict(sizes)
        storage = self.trainer.storage
        storage.put_scalar("pruning/step", step, smoothing_hint=False)
        for scope, count in kept.items():
            storage.put_scalar(f"pruning/kept_{scope}", count, smoothing_hint=False)
        storage.put_scalar("pruning/gflops", cost["flops"] / 1e9, smoothing_hint=False)
        storage.put_scalar("pruning/params_m", cost["params"] / 1e6, smoothing_hint=False)
        previously_zeroed, regrown = recovery
        storage.put_scalar("pruning/regrown", sum(regrown.values()), smoothing_hint=False)
        storage.put_scalar("pruning/step_seconds", seconds, smoothing_hint=False)
        # the model as it runs now (zeroed channels still compute) and as the allocation chose it
        kept_sizes = {name: size - len(self.zeroed.get(name, ())) for name, size in sizes.items()}
        measured = self.target.step_record(sizes, kept_sizes, self.cfg.PRUNING.SCHEDULE.NAME, step, num_steps)
        for key in ("latency_ms", "latency_kept_ms"):
            if key in measured:
                storage.put_scalar(f"pruning/{key}", measured[key], smoothing_hint=False)
        removed, zeroed = sum(len(v) for v in remove.values()), sum(len(v) for v in zero.values())
        entry = {
            "step": step,
            "of": num_steps,
            "iteration": self.trainer.iter + 1,
            "removed": removed,
            "zeroed": zeroed,
            # the share of the weak channels removed, against the share asked for (whole channels)
            "remove_ratio": remove_ratio,
            "removed_share": removed / (removed + zeroed) if removed + zeroed else None,
            "removed_zeroed_per_group": {name: [len(remove.get(name, ())), len(zero.get(name, ()))]
                                         for name in sorted(set(remove) | set(zero))},
            # channels zeroed by the previous step, and those of them whose filters grew back
            "previously_zeroed": previously_zeroed,
            "regrown": sum(regrown.values()),
            "regrown_per_group": {name: count for name, count in regrown.items() if count},
            "kept_per_scope": kept,
            "gflops": cost["flops"] / 1e9,
            "params": cost["params"],
            **measured,
            "seconds": seconds,
            "rank_digests": digests,
        }
        self.log.append(entry)
        logger.info(
            "pruning step %d/%d at iteration %d: removed %d, zeroed %d channels; kept %s; %.2f GFLOPs; %.2fs",
            step, num_steps, entry["iteration"], entry["removed"], entry["zeroed"], kept, entry["gflops"], seconds,
        )
        if "latency_ms" in measured:
            logger.info("pruning step %d/%d: %.3f ms predicted (%.3f ms for the kept channels; budget %.3f ms)",
                        step, num_steps, measured["latency_ms"], measured["latency_kept_ms"],
                        measured["latency_budget_ms"])
        if comm.is_main_process():
            log = {"steps": self.log, "architecture": sizes, "original_sizes": self.original_sizes,
                   **self.target.run_record()}
            atomic_write_json(log, os.path.join(self.cfg.OUTPUT_DIR, "pruning_log.json"))

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self):
        if self._restored is not None:  # loaded but training has not started: keep it as is
            return self._restored
        state = {
            "steps_done": self.steps_done,
            "original_sizes": dict(self.original_sizes),
            "masked": self.masks.masked(),
            "zeroed": dict(self.zeroed),
            "log": list(self.log),
        }
        # after the last step the accumulators are never read again: checkpoints (model_final.pth
        # included) do not carry them (PGP's are as large as the weights)
        finished = self.steps_done >= len(self.step_iters)
        state["criterion"] = None if finished else self.criterion.state_dict()
        if self.protector is not None and self.protector is not self.criterion and not finished:
            state["protector"] = self.protector.state_dict()
        if self.value_estimate is not None and not finished:
            state["values"] = self.value_estimate.state_dict()
        return state

    def load_state_dict(self, state_dict):
        # groups are derived in before_train, once the checkpoint's architecture is in place
        self._restored = state_dict


def iterations_per_epoch(cfg) -> int:
    """Training iterations in one pass over ``cfg.DATASETS.TRAIN`` at ``SOLVER.IMS_PER_BATCH``.

    The images are those detectron2's training loader keeps: with
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` it drops images without (non-crowd) annotations, so
    they are counted with detectron2's own ``get_detection_dataset_dicts``.
    """
    from detectron2.data.build import get_detection_dataset_dicts

    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
    )
    return max(1, math.ceil(len(dicts) / cfg.SOLVER.IMS_PER_BATCH))

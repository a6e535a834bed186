"""What a pruning run must reach: one class per kind of target, built once from a config.

A target knows the final fraction every pruned group works from (:meth:`PruningTarget.ratios`),
refuses at construction what no pruning can reach (one line naming the fix), and gives the
:class:`Budget` of step ``k`` of ``n``: a cost of the kept widths and the most it may be after
that step, ``full * (1 - p_k(r))`` with ``p_k`` the schedule. Allocations take that budget;
nothing else needs to know which kind of target it is.

Kinds (``PRUNING.TARGET.KIND``):

``channels`` (:class:`ChannelTarget`, ``TARGET.CHANNELS``)
    Prune ``RATIO`` (per scope: ``SCOPE_RATIOS``) of every pruned group's channels; the step's
    budget is the scheduled channel count of each group (no cost model).
``flops`` (:class:`FlopsTarget`, ``TARGET.FLOPS``)
    Remove ``REDUCTION`` of the unpruned model's FLOPs at ``INPUT_SIZE``
    (:class:`~pgp_det.pruning.cost.CostModel`).
``latency`` (:class:`LatencyTarget`, ``TARGET.LATENCY``)
    Bring the latency a device's table predicts (:class:`~pgp_det.latency.table.LatencyTable`,
    at ``MODEL.RPN.POST_NMS_TOPK_TEST`` proposals) down to ``MS`` or ``1000 / FPS``, at the
    table's input size.

Each kind also says at which input size FLOPs are counted for it (:func:`cost_input_size`) and
what it needs of the config (:meth:`PruningTarget.check_config`).

A new kind (energy, memory, another runtime's latency) is one new class and one line of
:data:`TARGET_KINDS`.
"""
import copy
import math
import numbers
import os
from typing import Dict, Mapping, Optional, Tuple

from .allocation import Budget
from .cost import ratio_for_flops_reduction, uniform_sizes
from .groups import ChannelGroup, PruningRequestError
from ..errors import UserInputError
from ..latency.io import load_table
from ..latency.page_faults import page_fault_warning
from ..latency.schema import DEVICE_KINDS
from ..latency.table import LatencyTable
from .schedules import pruned_fraction

__all__ = [
    "ChannelTarget", "FlopsTarget", "LatencyTarget", "PruningTarget", "TARGET_KINDS", "build_target",
    "check_latency_settings", "cost_input_size", "flops_budget", "latency_budget", "latency_reduction",
    "latency_table_at_test_settings", "load_latency_table", "target_latency_ms",
]


def target_latency_ms(target_ms: float = 0.0, target_fps: float = 0.0) -> float:
    """The latency budget in milliseconds from exactly one of a latency (ms) and a frame rate
    (frames per second of batch-1 inference: ``1000 / fps`` ms).

    Raises:
        UserInputError: both or neither positive, or a negative value.
    """
    for label, value in (("latency", target_ms), ("frame rate", target_fps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise UserInputError(f"target {label} {value!r} must be a number >= 0")
    if (target_ms > 0) == (target_fps > 0):
        raise UserInputError(
            f"give exactly one latency target: a latency in ms or a frame rate, not {'both' if target_ms > 0 else 'neither'}"
        )
    return float(target_ms) if target_ms > 0 else 1000.0 / float(target_fps)


def latency_reduction(table: LatencyTable, target_ms: float) -> float:
    """The fraction of the unpruned model's predicted latency (at ``table.proposals``) a target
    of ``target_ms`` removes, in (0, 1).

    Raises:
        PruningRequestError: the target is not below the unpruned model's prediction.
    """
    full = table.predict()
    if not 0 < target_ms < full:
        raise PruningRequestError(
            f"target latency {target_ms:.4g} ms is not below the unpruned model's {full:.4g} ms predicted on "
            f"{table.describe()} at {table.proposals} proposals: nothing to prune; lower the target"
        )
    return 1.0 - target_ms / full


def flops_budget(cost_model, limit: float) -> Budget:
    """At most ``limit`` FLOPs as ``cost_model`` (:class:`~pgp_det.pruning.cost.CostModel`)
    predicts them for the kept widths."""
    return Budget(lambda kept: cost_model.predict(kept)["flops"], float(limit),
                  lambda flops: f"{flops / 1e9:.4g} GFLOPs at {cost_model.height}x{cost_model.width}")


def latency_budget(table, limit: float) -> Budget:
    """At most ``limit`` milliseconds as ``table`` (:class:`~pgp_det.latency.table.LatencyTable`)
    predicts them for the kept widths."""
    return Budget(table.predict, float(limit), lambda ms: f"{ms:.4g} ms on {table.describe()}")


class PruningTarget:
    """What the pruning must reach (see the module docstring); subclasses set :attr:`kind`."""

    kind = ""

    warnings = ()  # what the config does differently from what the target was measured with

    # whether a pruned model's cost can be measured against the target on a device (closed loop)
    measured_on_device = False

    @staticmethod
    def config_with_limit(cfg, limit: float):
        """A frozen copy of ``cfg`` whose target is the final cost ``limit`` in this kind's unit
        (the closed loop's corrected budget); only kinds measured on a device have one."""
        raise NotImplementedError(f"a {cfg.PRUNING.TARGET.KIND} target has no measured limit")

    @staticmethod
    def check_config(cfg) -> None:
        """Refuse, at start-up, ``PRUNING`` keys this kind cannot use (one line naming the key);
        per-scope ratios belong to channel targets only."""
        scope_ratios = cfg.PRUNING.TARGET.CHANNELS.SCOPE_RATIOS
        if scope_ratios:
            raise UserInputError(f"PRUNING.TARGET.CHANNELS.SCOPE_RATIOS = {scope_ratios!r} is invalid: per-scope "
                                 "ratios apply to PRUNING.TARGET.KIND 'channels' only")

    @staticmethod
    def input_size(cfg) -> Tuple[int, int]:
        """(height, width) at which this kind counts FLOPs: ``PRUNING.TARGET.FLOPS.INPUT_SIZE``."""
        height, width = (int(v) for v in cfg.PRUNING.TARGET.FLOPS.INPUT_SIZE)
        return height, width

    @classmethod
    def from_config(cls, cfg, groups: Mapping[str, ChannelGroup], cost_model) -> "PruningTarget":
        """The target of ``cfg.PRUNING`` (see :func:`build_target` for the arguments)."""
        raise NotImplementedError

    def ratios(self, pruned_groups: Mapping[str, ChannelGroup]) -> Dict[str, float]:
        """``{group: final pruned fraction}`` the allocations work from (a cost budget decides
        the widths; the fractions are then only checked)."""
        raise NotImplementedError

    def budget(self, schedule: str, step: int, num_steps: int) -> Optional[Budget]:
        """The budget of step ``step`` of ``num_steps`` under the schedule named ``schedule``;
        None: the scheduled fractions of :meth:`ratios` are the budget."""
        return None

    def describe(self) -> str:
        """The target in words, for the log."""
        raise NotImplementedError

    def request(self) -> dict:
        """What was asked for, in the config's words (``{"flops_reduction": 0.5}``), for reports."""
        raise NotImplementedError

    def uniform_ratio(self, pruned_groups: Mapping[str, ChannelGroup]) -> Optional[float]:
        """The fraction of channels a uniform cut removes from every pruned group; None where the
        target's cost decides the widths and no ratio stands for it."""
        return next(iter(self.ratios(pruned_groups).values()), None)

    def step_record(self, widths: Mapping[str, int], kept: Mapping[str, int], schedule: str, step: int,
                    num_steps: int) -> dict:
        """What ``pruning_log.json`` records of this target after a step: ``widths`` as the model
        computes (zeroed channels included), ``kept`` without the zeroed channels."""
        return {}

    def run_record(self) -> dict:
        """What ``pruning_log.json`` records of this target once per run."""
        return {}

    def report(self, widths: Mapping[str, int]) -> dict:
        """What one-shot pruning's ``pruning_report.json`` says of this target, for the pruned
        ``widths``."""
        return {}


class ChannelTarget(PruningTarget):
    """Prune ``ratios[scope]`` of every pruned group's channels."""

    kind = "channels"

    @staticmethod
    def check_config(cfg):
        pass  # TARGET.CHANNELS.SCOPE_RATIOS are checked with the other PRUNING keys

    def __init__(self, scope_ratios: Mapping[str, float], ratio: Optional[float] = None):
        self.scope_ratios = dict(scope_ratios)
        self.ratio = ratio  # RATIO, the scopes' default

    @classmethod
    def from_config(cls, cfg, groups, cost_model):
        p = cfg.PRUNING
        ratios = {scope: float(p.TARGET.CHANNELS.RATIO) for scope in p.SCOPES}
        ratios.update({scope: float(ratio) for scope, ratio in p.TARGET.CHANNELS.SCOPE_RATIOS})
        return cls(ratios, float(p.TARGET.CHANNELS.RATIO))

    def request(self):
        return {"ratio": self.ratio, **({"scope_ratios": self.scope_ratios} if len(set(self.scope_ratios.values())) > 1
                                        else {})}

    def ratios(self, pruned_groups):
        return {name: self.scope_ratios[group.scope] for name, group in pruned_groups.items()}

    def describe(self):
        return "prune " + ", ".join(f"{100 * r:.1f}% of {scope}'s channels" for scope, r in self.scope_ratios.items())


class FlopsTarget(PruningTarget):
    """Remove ``reduction`` of the FLOPs ``cost_model`` measured on the unpruned model.

    Raises:
        PruningRequestError: pruning every group in ``scopes`` to its floor does not reach it.
    """

    kind = "flops"

    def __init__(self, cost_model, reduction: float, groups: Mapping[str, ChannelGroup], multiple: int, floor: int,
                 scopes):
        self.cost_model = cost_model
        self.reduction = float(reduction)
        # the uniform ratio that meets it: checks it is reachable, and what `uniform` starts from
        self.ratio = ratio_for_flops_reduction(cost_model, groups, self.reduction, multiple, floor, scopes)

    @classmethod
    def from_config(cls, cfg, groups, cost_model):
        p = cfg.PRUNING
        return cls(cost_model(), p.TARGET.FLOPS.REDUCTION, groups, p.ROUNDING.MULTIPLE, p.ROUNDING.MIN_CHANNELS, tuple(p.SCOPES))

    def ratios(self, pruned_groups):
        return {name: self.ratio for name in pruned_groups}

    def budget(self, schedule, step, num_steps):
        limit = self.cost_model.flops * (1.0 - pruned_fraction(schedule, step, num_steps, self.reduction))
        return flops_budget(self.cost_model, limit)

    def request(self):
        return {"flops_reduction": self.reduction}

    def describe(self):
        return (f"a {100 * self.reduction:.1f}% FLOPs reduction at {self.cost_model.height}x{self.cost_model.width} "
                f"(uniformly: a ratio of {self.ratio:.4f})")


class LatencyTarget(PruningTarget):
    """Bring ``table``'s prediction (bound to the test-time proposal count) to ``target_ms``.

    Raises:
        PruningRequestError: the target is not below the unpruned model's prediction, or pruning
            every group in ``scopes`` to its floor stays above it.
    """

    kind = "latency"

    measured_on_device = True

    @staticmethod
    def config_with_limit(cfg, limit):
        """``cfg`` with ``TARGET.LATENCY.MS`` ``limit`` (milliseconds) and no frame-rate target."""
        cfg = cfg.clone()
        cfg.defrost()
        cfg.PRUNING.TARGET.LATENCY.MS = float(limit)
        cfg.PRUNING.TARGET.LATENCY.FPS = 0.0
        cfg.freeze()
        return cfg

    @staticmethod
    def check_config(cfg):
        PruningTarget.check_config(cfg)
        check_latency_settings(cfg)

    @staticmethod
    def input_size(cfg):
        """The latency table's input size: the target holds there, and FLOPs are counted there."""
        return tuple(load_latency_table(cfg.PRUNING.TARGET.LATENCY.TABLE).input_size)

    def __init__(self, table, target_ms: float, groups: Mapping[str, ChannelGroup], multiple: int, floor: int,
                 scopes, table_path: str = "", warnings=(), target_fps: float = 0.0):
        self.table = table
        self.target_ms = float(target_ms)
        self.target_fps = float(target_fps)  # > 0: the target was asked for as a frame rate
        self.table_path = table_path
        self.warnings = list(warnings)
        self.reduction = latency_reduction(table, self.target_ms)
        floor_ms = table.predict(uniform_sizes(groups, 1.0, multiple, floor, scopes))
        if floor_ms > self.target_ms:
            raise PruningRequestError(
                f"a latency of {self.target_ms:.4g} ms on {table.describe()} is unreachable: pruning every prunable "
                f"group in scopes {', '.join(scopes)} down to its floor of {floor} channels leaves {floor_ms:.4g} ms; "
                "raise the target, lower the floor, prune more scopes, or lower MODEL.RPN.POST_NMS_TOPK_TEST"
            )

    @classmethod
    def from_config(cls, cfg, groups, cost_model):
        """Loads ``TARGET.LATENCY.TABLE``, checks that it was made for this model on a
        ``TARGET.LATENCY.DEVICE`` device, and binds it to ``MODEL.RPN.POST_NMS_TOPK_TEST``; what the
        config does differently from the profiled run is in :attr:`warnings`."""
        p = cfg.PRUNING
        latency = p.TARGET.LATENCY
        target = target_latency_ms(float(latency.MS), float(latency.FPS))
        table = load_latency_table(latency.TABLE)
        table.check_compatible({n: g.size for n, g in groups.items()}, table.input_size, latency.DEVICE or None)
        table, warnings = latency_table_at_test_settings(cfg, table, latency.TABLE)
        return cls(table, target, groups, p.ROUNDING.MULTIPLE, p.ROUNDING.MIN_CHANNELS, tuple(p.SCOPES),
                   table_path=latency.TABLE, warnings=warnings,
                   target_fps=0.0 if float(latency.MS) > 0 else float(latency.FPS))

    def ratios(self, pruned_groups):
        return {name: self.reduction for name in pruned_groups}  # only checked: the budget decides

    def uniform_ratio(self, pruned_groups):
        return None

    def request(self):
        return {"target_fps": self.target_fps} if self.target_fps else {"target_latency_ms": self.target_ms}

    def limit(self, schedule: str, step: int, num_steps: int) -> float:
        """Milliseconds after step ``step``: ``full * (1 - p_k(r))``, ``r = 1 - target / full``;
        that is ``full - (p_k(r) / r) (full - target)``, the target itself at the last step."""
        return self.table.predict() * (1.0 - pruned_fraction(schedule, step, num_steps, self.reduction))

    def budget(self, schedule, step, num_steps):
        return latency_budget(self.table, self.limit(schedule, step, num_steps))

    def describe(self):
        return (f"the way from {self.table.predict():.3g} ms to {self.target_ms:.3g} ms (-{100 * self.reduction:.1f}%) "
                f"predicted on {self.table.describe()}")

    def step_record(self, widths, kept, schedule, step, num_steps):
        return {"latency_ms": self.table.predict(widths), "latency_kept_ms": self.table.predict(kept),
                "latency_budget_ms": self.limit(schedule, step, num_steps)}

    def report(self, widths):
        return {"latency": {"table": self.table_path, "device": self.table.describe(),
                            "device_kind": self.table.device_kind, "input_size": list(self.table.input_size),
                            "proposals": self.table.proposals, "before_ms": self.table.predict(),
                            "target_ms": self.target_ms, "predicted_after_ms": self.table.predict(widths)}}

    def run_record(self):
        return {"latency": {"table": self.table_path, "device": self.table.describe(),
                            "proposals": self.table.proposals, "unpruned_ms": self.table.predict(),
                            "target_ms": self.target_ms}}


def check_latency_settings(cfg):
    """Check ``PRUNING.TARGET.LATENCY``'s keys and load the table: ``TABLE`` names a readable
    table measured on a ``DEVICE`` device (when set), and exactly one of ``MS`` and ``FPS`` is > 0.
    Whether the table fits the model is checked where the model is built (the hook's
    ``before_train``, ``tools/prune_net.py``).

    Returns:
        ``(table, target milliseconds)``.

    Raises:
        UserInputError: one line naming the bad key.
    """
    latency = cfg.PRUNING.TARGET.LATENCY
    if latency.DEVICE not in ("",) + DEVICE_KINDS:
        raise UserInputError(f"PRUNING.TARGET.LATENCY.DEVICE = {latency.DEVICE!r} is invalid: use 'cpu', 'cuda' or '' "
                             "(any)")
    if not latency.TABLE:
        raise UserInputError(
            "PRUNING.TARGET.LATENCY.TABLE is empty: a latency target needs a table made by tools/profile_latency.py on "
            "the device the model will run on"
        )
    try:
        target = target_latency_ms(float(latency.MS), float(latency.FPS))
    except UserInputError as e:
        raise UserInputError(f"PRUNING.TARGET.LATENCY.MS = {latency.MS!r}, PRUNING.TARGET.LATENCY.FPS = "
                             f"{latency.FPS!r} are invalid: {e}") from None
    table = load_latency_table(latency.TABLE)
    if latency.DEVICE and latency.DEVICE != table.device_kind:
        raise UserInputError(
            f"PRUNING.TARGET.LATENCY.DEVICE = {latency.DEVICE!r} is invalid: the latency table {latency.TABLE} was "
            f"measured on {table.device_kind} ({table.metadata.get('device_name', '?')}); profile on the device the "
            "model will run on"
        )
    return table, target


def load_latency_table(path: str) -> LatencyTable:
    """The table at ``path``, read once per version of the file: a run asks for it where its
    settings are checked, where its input size is needed and where the target is built."""
    stat = os.stat(path) if os.path.isfile(path) else None
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size) if stat else None
    if key is None or key not in _TABLES:
        table = load_table(path)  # raises the one-line error for a missing or bad file
        if key is None:
            return table
        _TABLES.clear()  # one table at a time is all a run uses
        _TABLES[key] = table
    return copy.deepcopy(_TABLES[key])


_TABLES: Dict[tuple, LatencyTable] = {}


def cost_input_size(cfg) -> Tuple[int, int]:
    """(height, width) at which ``cfg``'s target kind counts FLOPs and reaches its budget
    (``PRUNING.TARGET.FLOPS.INPUT_SIZE``, or a latency table's input size)."""
    return TARGET_KINDS[cfg.PRUNING.TARGET.KIND].input_size(cfg)


def latency_table_at_test_settings(cfg, table: LatencyTable, source: str):
    """Bind a latency table to the proposal count the config tests with
    (``MODEL.RPN.POST_NMS_TOPK_TEST``), and say where the config leaves the ground it was measured on.

    Args:
        source: how the table is named in the warnings (its path).

    Returns:
        ``(table at that proposal count, [warning lines])``: a count outside the table's is
        extrapolated; an ``INPUT.MIN_SIZE_TEST`` other than the shorter side of the table's input
        size means the budget holds at a size the model is not tested at; a
        ``MODEL.RPN.PRE_NMS_TOPK_TEST`` or ``TEST.DETECTIONS_PER_IMAGE`` other than the one the
        table was profiled with (when it recorded them) means its fixed part is another one; a
        table profiled on a CPU whose whole model faulted many pages in per inference, without
        freed memory kept, may miss by their time (:mod:`~pgp_det.latency.page_faults`).
    """
    warnings = []
    for key, value, recorded in (("MODEL.RPN.PRE_NMS_TOPK_TEST", cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, "pre_nms_topk_test"),
                                 ("TEST.DETECTIONS_PER_IMAGE", cfg.TEST.DETECTIONS_PER_IMAGE, "detections_per_image")):
        profiled = table.metadata.get(recorded)
        if profiled is not None and int(profiled) != int(value):
            # these set the work of proposal selection and of the final NMS, the table's fixed part
            warnings.append(f"{key} {value} differs from the {int(profiled)} latency table {source} was profiled "
                            "with: its fixed part (proposal selection, NMS) is that of the profiled value; "
                            f"profile with {key} {value}")
    proposals = int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST)
    if not table.proposal_counts[0] <= proposals <= table.proposal_counts[-1]:
        warnings.append(f"MODEL.RPN.POST_NMS_TOPK_TEST {proposals} is outside the proposal counts "
                        f"{list(table.proposal_counts)} of latency table {source}: its proposal-dependent parts "
                        "are extrapolated")
    shorter = int(cfg.INPUT.MIN_SIZE_TEST)
    if shorter > 0 and shorter != min(table.input_size):
        # detectron2 resizes test images' shorter side to MIN_SIZE_TEST: the budget is then met at another size
        height, width = table.input_size
        warnings.append(f"latency table {source} was measured at {height}x{width}, but INPUT.MIN_SIZE_TEST {shorter} "
                        f"resizes test images' shorter side to {shorter}: the latency target holds at the table's "
                        "size, not at the tested one; profile at the size the model will be deployed at")
    faults = page_fault_warning(table, source)
    if faults:
        warnings.append(faults)
    return table.with_proposals(proposals), warnings


def build_target(cfg, groups: Mapping[str, ChannelGroup], cost_model=None) -> PruningTarget:
    """The target ``cfg.PRUNING`` asks for (its ``TARGET`` kind, :data:`TARGET_KINDS`).

    Args:
        groups: every channel group of the model at its *original* widths.
        cost_model: ``() -> CostModel`` of the unpruned model at :func:`cost_input_size` (called only
            by the kinds that count FLOPs).

    Raises:
        PruningRequestError: the target is unreachable (one line naming the fix).
        UserInputError: a latency table that cannot be read or was made for something else.
    """
    return TARGET_KINDS[cfg.PRUNING.TARGET.KIND].from_config(cfg, groups, cost_model)


# PRUNING.TARGET.KIND -> the class that implements it
TARGET_KINDS = {"channels": ChannelTarget, "flops": FlopsTarget, "latency": LatencyTarget}

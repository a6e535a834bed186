"""What a one-shot pruning command asks for, checked and turned into ``PRUNING`` keys.

``tools/prune_net.py``'s flags carry the config's own words (``--ratio`` is
``PRUNING.TARGET.CHANNELS.RATIO``, ``--multiple`` ``PRUNING.ROUNDING.MULTIPLE``, ...). A
:class:`OneShotRequest` holds them, :meth:`OneShotRequest.check` refuses a bad one before anything
is loaded, and :meth:`OneShotRequest.overrides` gives the ``KEY VALUE`` items applied after the
user's own overrides, so the request wins.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..errors import UserInputError
from ..pruning.groups import SCOPES
from .one_shot import check_one_shot_criterion

__all__ = ["ClosedLoopSettings", "OneShotRequest"]


@dataclass(frozen=True)
class ClosedLoopSettings:
    """How the closed loop of :func:`~pgp_det.engine.closed_loop.prune_to_measured_latency` runs:
    relative ``tolerance`` on the measured share, at most ``max_rounds`` prunings, each timed over
    ``timing_rounds`` rounds of the two models in turn, with the memory the process frees kept for
    reuse when ``keep_freed_memory`` (as the table must have been profiled)."""

    tolerance: float = 0.05
    max_rounds: int = 4
    timing_rounds: int = 7
    keep_freed_memory: bool = False

    def check(self) -> None:
        if not 0.0 < self.tolerance < 1.0 or self.max_rounds < 1 or self.timing_rounds < 1:
            raise UserInputError("--tolerance must be in (0, 1); --max-rounds and --timing-rounds >= 1")


@dataclass(frozen=True)
class OneShotRequest:
    """One target (exactly one of ``ratio``, ``flops_reduction``, ``target_latency_ms``,
    ``target_fps``; the latency ones with ``latency_table``) and the optional ``PRUNING`` settings
    (None: the config's)."""

    criterion: str = "l1"
    ratio: Optional[float] = None
    flops_reduction: Optional[float] = None
    target_latency_ms: Optional[float] = None
    target_fps: Optional[float] = None
    latency_table: str = ""
    allocation: Optional[str] = None
    scopes: Tuple[str, ...] = ()
    multiple: Optional[int] = None
    min_channels: Optional[int] = None
    allow_frozen: bool = False
    input_size: Optional[Tuple[int, int]] = None

    @property
    def latency(self) -> bool:
        return self.target_latency_ms is not None or self.target_fps is not None

    def check(self) -> None:
        """Refuse bad values before anything is loaded (the config checks the rest as it is built).

        Raises:
            UserInputError: one line naming the flag and the fix.
        """
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise UserInputError(f"--ratio {self.ratio} is outside [0, 1): give the fraction of channels to remove")
        if self.flops_reduction is not None and not 0.0 < self.flops_reduction < 1.0:
            raise UserInputError(f"--flops-reduction {self.flops_reduction} is outside (0, 1): give the fraction of "
                                 "FLOPs to remove")
        if self.latency:
            for flag, value in (("--target-latency-ms", self.target_latency_ms), ("--target-fps", self.target_fps)):
                if value is not None and not (value > 0 and math.isfinite(value)):
                    raise UserInputError(f"{flag} {value}: give a number > 0")
            if not self.latency_table:
                raise UserInputError("a latency target needs --latency-table T, made by tools/profile_latency.py on the "
                                     "device the model will run on")
            if self.input_size is not None:
                raise UserInputError("--input-size does not apply to a latency target: it is met at its latency table's "
                                     "input size; drop --input-size")
        elif self.latency_table:
            raise UserInputError("--latency-table is used with --target-latency-ms or --target-fps; give one of them")
        check_one_shot_criterion(self.criterion)
        for scope in self.scopes:
            if scope not in SCOPES:
                raise UserInputError(f"--scopes: unknown scope {scope!r}; scopes are {','.join(SCOPES)}")
        for flag, value in (("--multiple", self.multiple), ("--min-channels", self.min_channels)):
            if value is not None and value < 1:
                raise UserInputError(f"{flag} {value}: use an integer >= 1")

    def overrides(self) -> List:
        """The ``PRUNING`` keys this request sets, as ``KEY VALUE`` items; one ratio for every
        pruned group (no per-scope ratios)."""
        if self.flops_reduction is not None:
            keys = ["TARGET.KIND", "flops", "TARGET.FLOPS.REDUCTION", self.flops_reduction]
        elif self.latency:
            keys = ["TARGET.KIND", "latency", "TARGET.LATENCY.TABLE", self.latency_table,
                    "TARGET.LATENCY.MS", self.target_latency_ms or 0.0, "TARGET.LATENCY.FPS", self.target_fps or 0.0]
        else:
            keys = ["TARGET.KIND", "channels", "TARGET.CHANNELS.RATIO", self.ratio or 0.0]
        keys += ["TARGET.CHANNELS.SCOPE_RATIOS", ()]
        for key, value in (("TARGET.FLOPS.INPUT_SIZE", tuple(self.input_size) if self.input_size else None),
                           ("ALLOCATION.NAME", self.allocation), ("SCOPES", self.scopes or None),
                           ("ROUNDING.MULTIPLE", self.multiple), ("ROUNDING.MIN_CHANNELS", self.min_channels),
                           ("ALLOW_FROZEN", True if self.allow_frozen else None)):
            if value is not None:
                keys += [key, value]
        return [item for i in range(0, len(keys), 2) for item in (f"PRUNING.{keys[i]}", keys[i + 1])]

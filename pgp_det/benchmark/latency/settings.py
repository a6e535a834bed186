"""What a latency profile measures: the width grids, the proposal counts, the repetitions and
the calibration copies (:class:`ProfileSettings`)."""
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["ACTIVATION_WEIGHTS", "CALIBRATION_RATIOS", "CONTRAST_RATIO", "KNAPSACK_SHARES", "ProfileSettings"]

CALIBRATION_RATIOS = (0.2, 0.45, 0.7)  # apart from --check's default ratios, so that the check tests the fit
# the shares of the unpruned model's time at which a latency target's allocation shapes a copy
KNAPSACK_SHARES = (0.7, 0.5)
# the cut that prices each group's element-wise work, and that the two contrast_cuts copies make
# in half of the groups each
CONTRAST_RATIO = 0.5
# what a table's ``activations`` weigh a group's channels by, without and with a clock
ACTIVATION_WEIGHTS = ("elements written", "ms between layers")


@dataclass(frozen=True)
class ProfileSettings:
    """How :func:`~pgp_det.benchmark.latency.profile.profile_latency` profiles a model.

    Attributes:
        points: grid widths per axis of a layer (at most;
            :func:`~pgp_det.benchmark.latency.layers.grid_widths`), >= 2.
        multiple, floor: the widths pruning may produce (``PRUNING.ROUNDING.MULTIPLE``,
            ``ROUNDING.MIN_CHANNELS``): the grid and the steps are sampled from them.
        proposal_counts: RPN ``POST_NMS_TOPK_TEST`` values to time the proposal-dependent parts
            at; the model's own is always added (the grid's reference). None:
            :func:`~pgp_det.benchmark.latency.profile.default_proposal_counts`.
        layer_repeat: a layer's calls are repeated this many times per timed sample (and the
            time divided): more than 1 on a GPU hides the per-sample synchronisation.
        passes: every layer timing is made this many times, in passes through all the layers,
            and the fastest kept: on a device that other work slows down for seconds at a time,
            more than 1 keeps those seconds out of the layers' relative prices.
        calibration_ratios: uniform pruning ratios of the copies whose whole-model timings fit
            the part of the rest that shrinks with the channels
            (:func:`~pgp_det.latency.fit.fit_rest`); empty: no fit (the rest stays fixed).
        contrast: with ``calibration_ratios``, also time the two
            :func:`~pgp_det.benchmark.latency.calibrate.contrast_cuts` copies, which keep the fit's two
            parts apart.
        knapsack_shares: with ``calibration_ratios``, also time one copy per share of the
            unpruned model's time, cut as the ``knapsack`` allocation cuts the model for a latency
            target of that share (:func:`~pgp_det.benchmark.latency.calibrate.knapsack_cuts`): the
            shapes a latency target produces, not only uniform ones, enter the fit and its
            stated error.
    """

    points: int = 5
    multiple: int = 8
    floor: int = 8
    proposal_counts: Optional[Sequence[int]] = None
    layer_repeat: int = 1
    passes: int = 1
    calibration_ratios: Sequence[float] = CALIBRATION_RATIOS
    contrast: bool = True
    knapsack_shares: Sequence[float] = KNAPSACK_SHARES

    def check(self) -> None:
        """Raises ValueError for settings no profile can be made with."""
        if self.points < 2:
            raise ValueError(f"points must be >= 2, got {self.points}")
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got {self.passes}")
        if any(not 0.0 < share < 1.0 for share in self.knapsack_shares):
            raise ValueError(f"knapsack shares must be in (0, 1), got {tuple(self.knapsack_shares)}")

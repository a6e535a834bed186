"""Pruning-rate schedules: the fraction of a group's original channels pruned after each step.

A schedule maps pruning step ``k`` (1..``num_steps``) and the final ratio ``r`` to the pruned
fraction ``p_k``; every schedule reaches ``p_{num_steps} == r`` exactly, and ``p_0 == 0``.
Pick one by name through :data:`SCHEDULE_REGISTRY` (``PRUNING.SCHEDULE.NAME``). When the steps happen:
:func:`pruning_iterations`, and :func:`resolve_pruning_iterations` from a config.
"""
import math
import numbers
from typing import List, Optional

from detectron2.utils.registry import Registry

from .groups import PruningRequestError

SCHEDULE_REGISTRY = Registry("PRUNING_SCHEDULE")
SCHEDULE_REGISTRY.__doc__ = "fn(step: int, num_steps: int, ratio: float) -> pruned fraction in [0, ratio]"

# PSFP's asymptotic curve: about 1 - 0.147 of the way is covered at the rate the public
# re-implementation uses (k = -ln(0.147) / E).
_PSFP_DECAY = -math.log(0.147)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(step: int, num_steps: int, ratio: float) -> None:
    if not _is_int(num_steps) or num_steps < 1:
        raise PruningRequestError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not _is_int(step) or not 0 <= step <= num_steps:
        raise PruningRequestError(f"step must be an integer in 0..{num_steps}, got {step!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise PruningRequestError(f"ratio must be in [0, 1), got {ratio!r}")


@SCHEDULE_REGISTRY.register()
def pgp_exponential(step: int, num_steps: int, ratio: float) -> float:
    """PGP as the paper writes it: keep ``C0 * exp(-lambda * k)`` channels after step ``k``,
    ``lambda = -ln(1 - r) / E``, so step ``E`` keeps exactly ``C0 (1 - r)``: ``p_k = 1 - (1 - r)^(k/E)``.

    The authors' public loop differs by one step (:func:`pgp_exponential_shifted`); this one is
    the default because its steps reach the target at the last step instead of before it.
    """
    _check(step, num_steps, ratio)
    if step == num_steps:
        return ratio
    lam = -math.log(1.0 - ratio) / num_steps
    return 1.0 - math.exp(-lam * step)


@SCHEDULE_REGISTRY.register()
def pgp_exponential_shifted(step: int, num_steps: int, ratio: float) -> float:
    """PGP as the authors' public code indexes it: their loop runs ``for epoch in 1..E`` and keeps
    ``C0 * exp(-lambda * (epoch + 1))``, so step ``k`` keeps ``C0 * exp(-lambda * (k + 1))``:
    ``p_k = min(1 - (1 - r)^((k + 1)/E), r)``, and ``p_E = r``.

    It prunes harder at every step than :func:`pgp_exponential` (step 1 already removes what
    that one removes at step 2) and reaches ``r`` at step ``E - 1``, so the last step prunes
    nothing more; the clip at ``r`` stands for the code's stop at the target.
    """
    _check(step, num_steps, ratio)
    if step == 0:
        return 0.0
    if step == num_steps:
        return ratio
    lam = -math.log(1.0 - ratio) / num_steps
    return min(1.0 - math.exp(-lam * (step + 1)), ratio)


@SCHEDULE_REGISTRY.register()
def psfp(step: int, num_steps: int, ratio: float) -> float:
    """PSFP: ``P(k) = a (exp(-d k) - 1)``, ``d = -ln(0.147) / E``, ``a = r / (exp(-d E) - 1)``:
    fast at first, flattening toward the target."""
    _check(step, num_steps, ratio)
    if step == num_steps:
        return ratio
    decay = _PSFP_DECAY / num_steps
    scale = ratio / (math.exp(-decay * num_steps) - 1.0)
    return scale * (math.exp(-decay * step) - 1.0)


@SCHEDULE_REGISTRY.register()
def linear(step: int, num_steps: int, ratio: float) -> float:
    """Equal steps: ``p_k = r k / E`` (PGP's linear option)."""
    _check(step, num_steps, ratio)
    return ratio * (step / num_steps)  # step / num_steps is exactly 1.0 at the end


@SCHEDULE_REGISTRY.register()
def cubic(step: int, num_steps: int, ratio: float) -> float:
    """Gradual pruning's cubic ramp: ``p_k = r (1 - (1 - k / E)^3)``, large steps early."""
    _check(step, num_steps, ratio)
    return ratio * (1.0 - (1.0 - step / num_steps) ** 3)


def pruned_fraction(name: str, step: int, num_steps: int, ratio: float) -> float:
    """Fraction pruned after ``step`` with the schedule registered as ``name``.

    Raises:
        PruningRequestError: unknown name (the message lists the known ones) or bad arguments.
    """
    if name not in SCHEDULE_REGISTRY:
        known = ", ".join(sorted(n for n, _ in SCHEDULE_REGISTRY))
        raise PruningRequestError(f"unknown pruning schedule {name!r}; known: {known}")
    return SCHEDULE_REGISTRY.get(name)(step, num_steps, ratio)


def pruning_iterations(start_iter: int, end_iter: int, interval: int) -> List[int]:
    """The training iterations at which pruning steps happen: ``start, start+interval, ...``,
    with ``end_iter`` always the last one (so the target is reached there exactly); the last
    interval is shorter when ``end - start`` is not a multiple of ``interval``."""
    if not all(_is_int(v) for v in (start_iter, end_iter, interval)):
        raise PruningRequestError(
            f"pruning iterations must be integers, got start={start_iter!r} end={end_iter!r} interval={interval!r}"
        )
    if interval < 1 or start_iter < 0 or end_iter < start_iter:
        raise PruningRequestError(
            f"need interval >= 1 and 0 <= start <= end, got start={start_iter} end={end_iter} interval={interval}"
        )
    iters = list(range(start_iter, end_iter, interval))
    return iters + [end_iter]


def resolve_pruning_iterations(cfg, iters_per_epoch: Optional[int] = None) -> List[int]:
    """Numbers of completed training iterations after which the pruning steps happen.

    ``START``/``END``/``INTERVAL`` are converted from epochs when ``PRUNING.SCHEDULE.UNIT == "epoch"``
    (``iters_per_epoch`` required). Steps happen once ``START + INTERVAL, START + 2 INTERVAL, ...``
    iterations are done and at ``END`` (at most ``SOLVER.MAX_ITER``); scores accumulate from
    ``START``.

    Raises:
        ValueError: epochs without ``iters_per_epoch``, or pruning that would end before it starts.
    """
    p = cfg.PRUNING
    scale = 1
    if p.SCHEDULE.UNIT == "epoch":
        if not iters_per_epoch:
            raise ValueError("PRUNING.SCHEDULE.UNIT 'epoch' needs the number of iterations per epoch")
        scale = iters_per_epoch
    start = int(p.SCHEDULE.START * scale)
    end = int(p.SCHEDULE.END * scale) if p.SCHEDULE.END != -1 else (3 * cfg.SOLVER.MAX_ITER) // 4
    interval = int(p.SCHEDULE.INTERVAL * scale) if p.SCHEDULE.INTERVAL != -1 else max(1, (end - start) // 10)
    end = min(end, cfg.SOLVER.MAX_ITER)
    if end <= start:
        raise ValueError(f"pruning ends at iteration {end}, not after it starts ({start}): check PRUNING.SCHEDULE.START/END")
    return pruning_iterations(start + interval, end, interval) if start + interval <= end else [end]

"""How the profiler reads time on a device.

A :data:`Timer` is ``timer(fn) -> milliseconds`` of one ``fn()`` call (warm-up and repetitions
are the timer's business): :func:`default_timer` is the median of
:func:`~pgp_det.benchmark.timing.time_callable`; tests inject fake ones (e.g. counting FLOPs) so
that no real timing runs. A :data:`Clock` reads the time now, in milliseconds
(:func:`wall_clock_ms`). :class:`Timing` says where models run and which timers and clock time
them.
"""
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..timing import _sync_for, time_callable

__all__ = ["Clock", "Timer", "Timing", "default_timer", "wall_clock_ms"]

Timer = Callable[[Callable[[], object]], float]
Clock = Callable[[], float]


def default_timer(device="cpu", warmup: int = 2, runs: int = 7) -> Timer:
    """Median milliseconds of ``runs`` timed calls after ``warmup`` untimed ones (synchronising
    CUDA around each)."""
    sync = _sync_for(torch.device(device))
    return lambda fn: time_callable(fn, warmup=warmup, runs=runs, sync=sync).median


def wall_clock_ms() -> float:
    """A :data:`Clock` of the host: milliseconds, monotonic (a CPU's own work is done when read)."""
    return time.perf_counter() * 1e3


@dataclass(frozen=True)
class Timing:
    """Where models run and how they are timed, for :func:`~pgp_det.benchmark.latency.profile.profile_latency`
    and :func:`~pgp_det.benchmark.latency.check.check_latency`.

    Attributes:
        device: where the models run (``"cpu"``, ``"cuda"`` or a :class:`torch.device`).
        dtype: ``"fp32"``, or ``"fp16"`` (CUDA autocast, CUDA only).
        timer: ``fn -> ms`` of layers timed alone and of the unpruned model timed alone;
            default :func:`default_timer` of ``device``.
        whole_timer: ``fn -> ms`` of whole models compared in interleaved rounds (other
            proposal counts, calibration copies, the check's models): each is called once a
            round; default ``timer``.
        rounds: how many rounds those models are timed in
            (:func:`~pgp_det.benchmark.latency.whole_model.time_interleaved`).
        clock: what weighs the element-wise work that pruning a group shrinks (profiling only):
            with a clock (:func:`wall_clock_ms` on a CPU), the time the whole model spends after
            the group's layers (:func:`~pgp_det.benchmark.latency.calibrate.element_wise_ms_per_channel`);
            None: the activation elements the group's layers write (on a CUDA device, where hooks
            cannot time that work without synchronising it).
    """

    device: Union[str, torch.device] = "cpu"
    dtype: str = "fp32"
    timer: Optional[Timer] = None
    whole_timer: Optional[Timer] = None
    rounds: int = 1
    clock: Optional[Clock] = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def layer_timer(self) -> Timer:
        """:attr:`timer`, or the device's :func:`default_timer`."""
        return self.timer or default_timer(self.torch_device)

    def whole_model_timer(self) -> Timer:
        """:attr:`whole_timer`, or :meth:`layer_timer`."""
        return self.whole_timer or self.layer_timer()

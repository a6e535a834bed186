"""The latency profiler: measures a detector's :class:`~pgp_det.latency.table.LatencyTable` on
the device it runs on, one stage per module (built on the pruning core and
:mod:`pgp_det.benchmark.timing`):

* :mod:`.settings`: :class:`ProfileSettings`, what a profile measures.
* :mod:`.timers`: :class:`Timing`, timers and clocks.
* :mod:`.inference`: how every inference runs (images, proposal counts, pinned proposals,
  pruned copies).
* :mod:`.record`: the layers' calls recorded in the whole model.
* :mod:`.whole_model`: the whole model timed, alone and in interleaved rounds.
* :mod:`.layers`: every prunable layer timed alone over a grid of widths.
* :mod:`.activations`: the element-wise work of each group's channels weighed.
* :mod:`.calibrate`: other proposal counts and pruned copies timed, the fixed rest, the fit.
* :mod:`.profile`: :func:`profile_latency`, the stages in order.
* :mod:`.check`: :func:`check_latency`, predictions against whole-model timings.
* :mod:`.report`: what a check and a profile's headroom say, as text.
"""
from .calibrate import contrast_cuts
from .check import check_latency
from .layers import grid_widths
from .profile import profile_latency
from .report import check_report, headroom_report
from .settings import CALIBRATION_RATIOS, ProfileSettings
from .timers import Timing, default_timer, wall_clock_ms
from .whole_model import time_interleaved, time_whole_model

__all__ = [
    "CALIBRATION_RATIOS", "ProfileSettings", "Timing", "check_latency", "check_report", "contrast_cuts",
    "default_timer", "grid_widths", "headroom_report", "profile_latency", "time_interleaved", "time_whole_model",
    "wall_clock_ms",
]

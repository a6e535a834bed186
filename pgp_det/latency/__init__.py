"""A detector's latency on one device, predicted for any channel widths from a table measured on
that device, one job per module.

The table (imports nothing above the pruning core; :mod:`pgp_det.pruning.target` uses it):

* :mod:`.table`: :class:`LatencyEntry`, :class:`LatencyTable`: the prediction (``predict``,
  ``breakdown``, ``with_proposals``, ``check_compatible``, ``describe``).
* :mod:`.schema`: the format's name and version, and the checks every table passes when built.
* :mod:`.io`: tables as JSON (:func:`load_table`, :func:`save_table`, :func:`table_from_dict`,
  :func:`table_to_dict`).
* :mod:`.fit`: :func:`fit_rest`, the rest that shrinks with the channels, by non-negative least
  squares.
* :mod:`.merge`: :func:`merge_tables`, several profiles of one device into a steadier table.
* :mod:`.page_faults`: what a table's recorded page faults and freed-memory setting mean
  (:func:`page_fault_warning`).

The profiler (runs models; built on the pruning core and :mod:`pgp_det.benchmark.timing`):

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
* :mod:`.report`, :mod:`.command`: what ``tools/profile_latency.py`` prints and does.

The profiler's names are imported on first use, so that reading a table loads no profiling code.
"""
from .fit import fit_rest
from .io import load_table, save_table, table_from_dict, table_to_dict
from .merge import merge_tables
from .page_faults import MANY_PAGE_FAULTS, page_fault_warning, profiled_with_freed_memory_kept
from .schema import DEVICE_KINDS, TABLE_FORMAT, TABLE_VERSION
from .settings import CALIBRATION_RATIOS, ProfileSettings
from .table import LatencyEntry, LatencyTable

_PROFILER_EXPORTS = {
    "Timing": "pgp_det.latency.timers",
    "default_timer": "pgp_det.latency.timers",
    "wall_clock_ms": "pgp_det.latency.timers",
    "time_whole_model": "pgp_det.latency.whole_model",
    "time_interleaved": "pgp_det.latency.whole_model",
    "grid_widths": "pgp_det.latency.layers",
    "contrast_cuts": "pgp_det.latency.calibrate",
    "profile_latency": "pgp_det.latency.profile",
    "check_latency": "pgp_det.latency.check",
    "check_report": "pgp_det.latency.report",
    "headroom_report": "pgp_det.latency.report",
}

__all__ = [
    "CALIBRATION_RATIOS", "DEVICE_KINDS", "LatencyEntry", "LatencyTable", "MANY_PAGE_FAULTS", "ProfileSettings",
    "TABLE_FORMAT", "TABLE_VERSION", "fit_rest", "load_table", "merge_tables", "page_fault_warning",
    "profiled_with_freed_memory_kept", "save_table", "table_from_dict", "table_to_dict",
]
__all__ += sorted(_PROFILER_EXPORTS)


def __getattr__(name):
    if name not in _PROFILER_EXPORTS:
        raise AttributeError(f"module 'pgp_det.latency' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PROFILER_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PROFILER_EXPORTS))

"""A detector's latency on one device, predicted for any channel widths from a table measured on
that device, one job per module.

The table (imports only :mod:`pgp_det.errors` and :mod:`pgp_det.utils`; the pruning target
:mod:`pgp_det.pruning.target` uses it as a cost):

* :mod:`.table`: :class:`LatencyEntry`, :class:`LatencyTable`: the prediction (``predict``,
  ``breakdown``, ``with_proposals``, ``check_compatible``, ``describe``).
* :mod:`.schema`: the format's name and version, and the checks every table passes when built.
* :mod:`.io`: tables as JSON (:func:`load_table`, :func:`save_table`, :func:`table_from_dict`,
  :func:`table_to_dict`).
* :mod:`.fit`: :func:`fit_rest`, the rest that shrinks with the channels, by non-negative least
  squares.
* :mod:`.merge`: :func:`merge_tables`, several profiles of one device into a steadier table.
* :mod:`.page_faults`: what a table's recorded page faults and freed-memory setting mean
  (:func:`page_fault_warning`, :func:`check_freed_memory_setting`).

The profiler that measures tables is :mod:`pgp_det.benchmark.latency`; ``tools/profile_latency.py``
runs it through :mod:`pgp_det.engine.profile_command`.
"""
from .fit import fit_rest
from .io import load_table, save_table, table_from_dict, table_to_dict
from .merge import merge_tables
from .page_faults import (MANY_PAGE_FAULTS, check_freed_memory_setting, page_fault_warning,
                          profiled_with_freed_memory_kept)
from .schema import DEVICE_KINDS, TABLE_FORMAT, TABLE_VERSION
from .table import LatencyEntry, LatencyTable

__all__ = [
    "DEVICE_KINDS", "LatencyEntry", "LatencyTable", "MANY_PAGE_FAULTS", "TABLE_FORMAT", "TABLE_VERSION",
    "check_freed_memory_setting", "fit_rest", "load_table", "merge_tables", "page_fault_warning",
    "profiled_with_freed_memory_kept", "save_table", "table_from_dict", "table_to_dict",
]

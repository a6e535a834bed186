"""A detector's latency on one device, predicted for any channel widths from a table measured on
that device, one job per module (imports nothing above the pruning core;
:mod:`pgp_det.pruning.target` uses it):

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

Tables are measured by :mod:`pgp_det.benchmark.latency_profile`.
"""
from .fit import fit_rest
from .io import load_table, save_table, table_from_dict, table_to_dict
from .merge import merge_tables
from .page_faults import MANY_PAGE_FAULTS, page_fault_warning, profiled_with_freed_memory_kept
from .schema import DEVICE_KINDS, TABLE_FORMAT, TABLE_VERSION
from .table import LatencyEntry, LatencyTable

__all__ = [
    "DEVICE_KINDS", "LatencyEntry", "LatencyTable", "MANY_PAGE_FAULTS", "TABLE_FORMAT", "TABLE_VERSION", "fit_rest",
    "load_table", "merge_tables", "page_fault_warning", "profiled_with_freed_memory_kept", "save_table",
    "table_from_dict", "table_to_dict",
]

"""Several profiles of one model at the same settings on the same device merged into one
steadier table (:func:`merge_tables`; from files and to one, :func:`merge_table_files`, what
``tools/merge_latency_tables.py`` does)."""
import os
import statistics
from typing import List, Sequence, Tuple

from ..errors import UserInputError
from ..utils.output_dir import claim_output_dir
from .fit import fit_rest
from .io import load_table, save_table
from .table import LatencyEntry, LatencyTable

__all__ = ["merge_table_files", "merge_tables"]

# what profiles of one model on one device must share to be merged (metadata keys)
_SAME_PROFILE_SETTINGS = ("device_kind", "device_name", "num_threads", "precision", "channel_multiple", "min_channels",
                          "pre_nms_topk_test", "detections_per_image", "activation_weights")


def merge_tables(tables: Sequence[LatencyTable]) -> LatencyTable:
    """One table from several profiles of the same model at the same settings on the same device:
    every layer timing (grid, steps, proposal counts), every group's element-wise weight
    (``activations``) and the unpruned model's time at each proposal count is the median over
    the profiles (the fixed rest is what the merged layers leave
    of that time), and the rest that shrinks with the channels is fitted again
    (:func:`fit_rest`) to all their calibration copies together, each its share of its own
    profile's unpruned model times the merged unpruned model. Two profiles of a noisy device
    disagree on what pruning a group saves; their median is steadier than either.

    Raises:
        UserInputError: fewer than two tables, or tables that differ in architecture, input size,
            proposal counts, layers or their grids, device, threads, precision, test-time
            settings or kind of weights (trained or random), or that mix profiles with and without
            calibration copies (one line).
    """
    calibrated = _check_mergeable(tables)
    first = tables[0]
    entries = [_median_entry([t.entries[k] for t in tables]) for k in range(len(first.entries))]
    metadata = {key: value for key, value in first.metadata.items()
                if key not in ("calibration", "check", "check_seconds", "profile_seconds", "repeated_layer_timings")}
    metadata["merged_from"] = [
        {"source": t.source, "created": t.metadata.get("created"), "unpruned_ms": t.predict()}
        for t in tables]
    merged = LatencyTable(first.groups, first.input_size, entries, first.proposal_counts,
                          [0.0] * len(first.proposal_counts), first.reference_proposals, metadata,
                          # a group one profile weighed at nothing (a saving lost in noise) is 0 there
                          activations={name: statistics.median([t.activations.get(name, 0.0) for t in tables])
                                       for name in dict.fromkeys(n for t in tables for n in t.activations)})
    # the whole model was measured, the fixed rest is what the layers leave of it: the merged rest
    # is the median whole model less the merged layers (the prediction while the rest is zero)
    merged.fixed_ms = tuple(statistics.median([t.predict(proposals=n) for t in tables]) - merged.predict(proposals=n)
                            for n in first.proposal_counts)
    if calibrated:
        full = merged.predict()
        rows = [(row["widths"], row["relative"] * full) for t in tables for row in t.metadata["calibration"]]
        merged = fit_rest(merged, rows)
        merged.metadata["calibration"] = [
            dict(row, measured_ms=row["relative"] * full) for t in tables for row in t.metadata["calibration"]]
    return merged


def _layout(table: LatencyTable) -> list:
    """What two profiles' layers must share to be merged: names, kinds, groups and every width timed."""
    return [(e.name, e.kind, e.in_group, e.out_group, e.in_widths, e.out_widths, e.proposal_ms is None,
             tuple(w for w, _ in e.in_steps), tuple(w for w, _ in e.out_steps)) for e in table.entries]


def _check_mergeable(tables: Sequence[LatencyTable]) -> bool:
    """Refuse tables :func:`merge_tables` cannot merge (see its ``Raises``); return whether they
    all have calibration copies."""
    if len(tables) < 2:
        raise UserInputError(f"merging needs at least two latency tables, got {len(tables)}: profile again "
                             f"at the same settings and give every table")
    first = tables[0]

    def refuse(table: LatencyTable, what: str):
        raise UserInputError(f"latency tables {first.source or '#1'} and {table.source or 'another'} differ in {what}: "
                             f"merge only profiles of one model at the same settings on one device")

    for table in tables[1:]:
        for what, a, b in (("channel groups", first.groups, table.groups), ("input size", first.input_size, table.input_size),
                           ("proposal counts", first.proposal_counts, table.proposal_counts),
                           ("reference proposal count", first.reference_proposals, table.reference_proposals)):
            if a != b:
                refuse(table, what)
        for key in _SAME_PROFILE_SETTINGS:
            if first.metadata.get(key) != table.metadata.get(key):
                refuse(table, key)
        if bool(first.metadata.get("weights")) != bool(table.metadata.get("weights")):
            # a random RPN proposes other boxes than a trained one: the pooler's work differs
            refuse(table, "weights (one profiled trained weights, the other randomly initialised ones)")
        if _layout(table) != _layout(first):
            refuse(table, "their layers or the widths they were timed at")
    calibrated = [bool(t.metadata.get("calibration")) for t in tables]
    if any(calibrated) and not all(calibrated):
        refuse(tables[calibrated.index(not calibrated[0])], "calibration copies (one has them, one does not)")
    if any("widths" not in row for t in tables for row in t.metadata.get("calibration", [])):
        raise UserInputError("a latency table's calibration copies do not record their widths (made by an older "
                             "profiler): profile again with tools/profile_latency.py to merge")
    return all(calibrated)


def _median_entry(profiles: Sequence[LatencyEntry]) -> LatencyEntry:
    """One layer's timings (grid, steps, proposal counts), each the median over ``profiles`` (the
    same layer in every table, timed at the same widths)."""
    entry = profiles[0]
    ms = tuple(tuple(statistics.median([e.ms[i][j] for e in profiles]) for j in range(len(entry.out_widths)))
               for i in range(len(entry.in_widths)))
    proposal_ms = None if entry.proposal_ms is None else tuple(
        statistics.median([e.proposal_ms[n] for e in profiles]) for n in range(len(entry.proposal_ms)))

    def median_steps(steps_of):
        columns = [steps_of(e) for e in profiles]
        return tuple((w, statistics.median([steps[k][1] for steps in columns])) for k, (w, _) in enumerate(columns[0]))

    return LatencyEntry(entry.name, entry.kind, entry.in_group, entry.out_group, entry.in_widths, entry.out_widths,
                        ms, proposal_ms, median_steps(lambda e: e.in_steps), median_steps(lambda e: e.out_steps))


def merge_table_files(paths: Sequence[str], output: str) -> Tuple[List[LatencyTable], LatencyTable]:
    """Read the tables at ``paths``, merge them (:func:`merge_tables`) and write the merged table
    to ``output`` (its folder claimed while it is written); returns ``(tables read, merged)``.

    Raises:
        UserInputError: a table cannot be read, the tables cannot be merged, or the folder is
            taken (one line), with nothing written.
    """
    with claim_output_dir(os.path.dirname(os.path.abspath(output)), "--output") as folder:
        tables = [load_table(path) for path in paths]
        merged = merge_tables(tables)
        folder.start_writing()
        save_table(merged, output)
    return tables, merged

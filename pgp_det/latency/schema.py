"""What a valid latency table is: the file format's name and version, the kinds of device and
layer a table knows, and the checks every table passes when it is built (in memory or from a
file), each failing with one line that names the problem."""
import math

from ..errors import UserInputError

__all__ = ["DEVICE_KINDS", "ENTRY_KINDS", "TABLE_FORMAT", "TABLE_VERSION", "check_table"]

TABLE_FORMAT = "pgp_det latency table"
TABLE_VERSION = 2
DEVICE_KINDS = ("cpu", "cuda")
ENTRY_KINDS = ("conv", "linear", "roi_pooler")


def _fail(table, problem: str):
    where = f"latency table {table.source}" if table.source else "latency table"
    raise UserInputError(f"{where}: {problem}; make it again with tools/profile_latency.py")


def check_table(table) -> None:
    """Refuse a :class:`~pgp_det.latency.table.LatencyTable` whose fields contradict each other:
    widths below 1, proposal counts out of order, a fixed time per count missing, an unknown
    device or layer kind, grids that do not end at their group's width, time grids of the wrong
    shape, negative or infinite times, steps or proposal timings that do not fit.

    Raises:
        UserInputError: one line naming the first problem found.
    """
    if any(w < 1 for w in table.groups.values()):
        _fail(table, "a group width is below 1")
    if min(table.input_size) < 1:
        _fail(table, f"input size {table.input_size} is not a size in pixels")
    counts = table.proposal_counts
    if not counts or list(counts) != sorted(set(counts)) or counts[0] < 1:
        _fail(table, f"proposal counts {list(counts)} must be distinct, ascending and >= 1")
    if len(table.fixed_ms) != len(counts) or not all(math.isfinite(v) for v in table.fixed_ms):
        _fail(table, "fixed_ms needs one finite value per proposal count")
    if table.reference_proposals not in counts:
        _fail(table, f"reference proposal count {table.reference_proposals} is not among {list(counts)}")
    for name, count in table.activations.items():
        if name not in table.groups or not math.isfinite(count) or count < 0:
            _fail(table, f"activations: {name} must be a known channel group with a weight >= 0")
    for label, value, least in (("activation_ms", table.activation_ms, 0.0),
                                ("layer_overhead", table.layer_overhead, -1.0)):
        if not math.isfinite(value) or value < least:
            _fail(table, f"{label} must be finite and >= {least:g}")
    kind = table.metadata.get("device_kind")
    if kind not in DEVICE_KINDS:
        _fail(table, f"device_kind {kind!r} is not one of {', '.join(DEVICE_KINDS)}")
    names = set()
    for e in table.entries:
        if e.name in names:
            _fail(table, f"layer {e.name} is listed twice")
        names.add(e.name)
        _check_entry(table, e)


def _check_entry(table, e) -> None:
    """The checks of one :class:`~pgp_det.latency.table.LatencyEntry` against its table."""
    if e.kind not in ENTRY_KINDS:
        _fail(table, f"layer {e.name} has unknown kind {e.kind!r}")
    for group, grid in ((e.in_group, e.in_widths), (e.out_group, e.out_widths)):
        if not grid or list(grid) != sorted(set(grid)) or grid[0] < 1:
            _fail(table, f"layer {e.name}: widths {list(grid)} must be distinct, ascending and >= 1")
        if group is None:
            if len(grid) != 1:
                _fail(table, f"layer {e.name}: an axis without a channel group has one width")
        elif group not in table.groups:
            _fail(table, f"layer {e.name} names unknown channel group {group}")
        elif grid[-1] != table.groups[group]:
            _fail(table, f"layer {e.name}: its grid ends at {grid[-1]}, not at {group}'s {table.groups[group]} channels")
    if len(e.ms) != len(e.in_widths) or any(len(row) != len(e.out_widths) for row in e.ms):
        _fail(table, f"layer {e.name}: ms must be a {len(e.in_widths)} x {len(e.out_widths)} grid")
    if not all(math.isfinite(v) and v >= 0 for row in e.ms for v in row):
        _fail(table, f"layer {e.name}: times must be finite and >= 0")
    for group, grid, steps in ((e.in_group, e.in_widths, e.in_steps), (e.out_group, e.out_widths, e.out_steps)):
        widths = [w for w, _ in steps]
        if steps and (group is None or widths != sorted(set(widths)) or widths[0] < 1 or widths[-1] != grid[-1]
                      or not all(math.isfinite(ms) and ms >= 0 for _, ms in steps)):
            _fail(table, f"layer {e.name}: steps must be ascending widths of a channel group ending at its full "
                  "width, with finite times >= 0")
    if e.proposal_ms is not None and (
        len(e.proposal_ms) != len(table.proposal_counts) or not all(math.isfinite(v) and v >= 0 for v in e.proposal_ms)
    ):
        _fail(table, f"layer {e.name}: proposal_ms needs one finite time >= 0 per proposal count")

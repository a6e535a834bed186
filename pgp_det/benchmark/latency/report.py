"""What ``tools/profile_latency.py`` prints about a table: the check's rows against the
device (:func:`check_report`) and how much of the unpruned model's time channel pruning can
remove at all (:func:`headroom_report`)."""
from ...pruning.groups import kept_count
from ...latency.table import LatencyTable

__all__ = ["calibration_report", "check_report", "headroom_report", "next_target_line"]


def check_report(table: LatencyTable) -> str:
    """The ``--check`` rows as a fixed-width table, and how fast the device ran meanwhile."""
    rows = table.metadata.get("check", [])
    height, width = table.input_size
    images = table.metadata.get("images_from", "the profile's images")
    # what these figures are (docs/latency.md, "Which latency to hold against a target")
    lines = [f"check: whole model at {height}x{width} ({images}, stretched), {table.reference_proposals} proposals, "
             f"on {table.describe()}; each model timed in turn with the unpruned one, the median of the rounds: "
             "the figures a latency target is held against",
             f"{'model':<40}  predicted ms  measured ms   error  | share of unpruned: predicted  measured   error"]
    for row in rows:
        model = f"uniformly pruned, ratio {row['ratio']:.2f}" if "ratio" in row else row["label"]
        lines.append(f"{model:<40}  {row['predicted_ms']:12.3f}  {row['measured_ms']:11.3f}  "
                     f"{row['error_percent']:+6.1f}%  |  {row['predicted_relative']:26.3f}  {row['relative']:8.3f}  "
                     f"{row['relative_error_percent']:+6.1f}%")
    for row in rows:
        if "target_share" in row:
            lines.append(next_target_line(row))
    if rows:
        now, then = rows[0]["unpruned_ms"], table.predict()
        lines.append(f"the unpruned model measured {now:.3f} ms in the same rounds, {then:.3f} ms when profiled "
                     f"({100.0 * (now - then) / then:+.1f}%): the share columns leave out that change of the device's speed")
    return "\n".join(lines)


def headroom_report(table: LatencyTable) -> str:
    """How much of the unpruned model's predicted time channel pruning can remove at all: every
    group pruned to its fewest channels (``min_channels``, rounded to ``channel_multiple``)."""
    multiple, floor = table.metadata["channel_multiple"], table.metadata["min_channels"]
    fewest = {name: kept_count(size, 1.0, multiple, floor) for name, size in table.groups.items()}
    full, least = table.predict(), table.predict(fewest)
    return (f"every channel group at its fewest channels: {least:.3f} ms of {full:.3f} ms predicted "
            f"({100.0 * (full - least) / full:.1f}% is all that channel pruning can remove on this device at this size)")


def next_target_line(row: dict) -> str:
    """For a checked model pruned to a latency target (``row["target_ms"]``, ``row["target_share"]``
    of the unpruned model's predicted time): its measured share against the target share, and the
    target that corrects the miss next time, ``target_ms * target_share / measured`` (the closed
    loop's correction: the table under- or over-predicts this deep a cut by that factor)."""
    measured, wanted = row["relative"], row["target_share"]
    miss = 100.0 * (measured - wanted) / wanted
    corrected = row["target_ms"] * wanted / measured
    return (f"{row['label']}: pruned to {row['target_ms']:.3f} ms (share {wanted:.3f}); measured share {measured:.3f} "
            f"({miss:+.1f}%): train with PRUNING.TARGET.LATENCY.MS {corrected:.3f} to reach the share {wanted:.3f} here")


def _copy_label(row: dict) -> str:
    """How a calibration copy was cut: a knapsack allocation for a share of the unpruned model's
    time, half of the groups ("half": which half) at a ratio, or every group at a ratio."""
    if "knapsack" in row:
        return f"knapsack for {row['knapsack']:.2f}"
    return f"{row['half']} half at {row['ratio']:.2f}" if "half" in row else f"uniform {row['ratio']:.2f}"


def calibration_report(table: LatencyTable) -> str:
    """How far the fitted table's share of the unpruned model's time is from the share measured
    on the calibration copies (``metadata["calibration"]``), by depth of cut: the error to expect
    of a target at about that depth on this device. "" for a table without calibration copies."""
    rows = [row for row in table.metadata.get("calibration", []) if "widths" in row and "relative" in row]
    if not rows:
        return ""
    full = table.predict()
    parts = []
    for row in sorted(rows, key=lambda r: -table.predict(r["widths"]) / full):
        predicted = table.predict(row["widths"]) / full
        error = 100.0 * (predicted - row["relative"]) / row["relative"]
        label = _copy_label(row)
        parts.append(f"{label}: predicted {predicted:.3f}, measured {row['relative']:.3f} ({error:+.1f}%)")
    return ("calibration copies, share of the unpruned model's time (the error to expect of a target that deep): "
            + "; ".join(parts))

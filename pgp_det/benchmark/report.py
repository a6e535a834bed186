"""Write benchmark results: CSV, JSON, a Markdown table and mAP-vs-speed/cost plots.

A result is a flat row (``dict`` of column -> number/str) per model; see :data:`COLUMN_DOCS`.
Every file is written atomically (temporary file in the target folder, then ``os.replace``) so
a reader never sees half a file, and each carries the reproducibility record of the run.
"""
import csv
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

from ..utils.io import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

__all__ = [
    "COLUMN_DOCS",
    "pareto_front",
    "reproducibility_record",
    "write_csv",
    "write_json",
    "markdown_table",
    "plot_tradeoff",
    "write_report",
    "summarize_seeds",
    "exceeds_spread",
    "seed_summary_markdown",
]

# Known columns, in report order, with units. Rows may carry more (appended after these).
COLUMN_DOCS = {
    "label": "model name (with @runtime for a runtime other than pytorch)",
    "runtime": "what runs the model: pytorch (eager), pytorch_compiled, pytorch_cudagraphs, torchscript, onnxruntime, "
               "onnxruntime_int8",
    "runtime_version": "the runtime's version",
    "runtime_provider": "the runtime's execution provider",
    "sweep": "test-time overrides of this point (eval_map_fps --sweep)",
    "pareto": "yes: no other row has both higher mAP and higher FPS",
    "config": "config file",
    "weights": "checkpoint file",
    "dataset": "evaluation dataset",
    "map_metric": "which metric mAP is (VOC: AP50 11-point; COCO: AP@[.5:.95])",
    "mAP": "headline accuracy, percent",
    "AP": "AP averaged over IoU 0.50:0.95, percent",
    "AP50": "AP at IoU 0.5, percent (VOC: 11-point)",
    "AP75": "AP at IoU 0.75, percent",
    "input_size": "fixed timing input, HxW pixels",
    "dtype": "fp32, fp16, or int8 (onnxruntime_int8: convolutions and linear layers)",
    "batch_size": "images per timed call at the fixed size",
    "latency_median_ms": "latency of one call (batch_size images) at the fixed size, median, ms",
    "latency_p90_ms": "latency of one call (batch_size images) at the fixed size, 90th percentile, ms",
    "fps": "images per second at the fixed size: 1000 * batch_size / latency_median_ms",
    "dataset_latency_median_ms": "batch-1 latency over dataset images, median, ms",
    "dataset_latency_p90_ms": "batch-1 latency over dataset images, 90th percentile, ms",
    "dataset_fps": "1000 / dataset_latency_median_ms",
    "dataset_images": "number of dataset images timed",
    "speedup": "median over the dataset images of the reference model's time over this model's, timed in turn",
    "reference": "the reference model of speedup (eval_map_fps --reference)",
    "reference_latency_median_ms": "the reference's median latency over the same images, in the same turns, ms",
    "stage_preprocess_ms": "normalise + pad, median ms",
    "stage_backbone_fpn_ms": "backbone + FPN, median ms",
    "stage_rpn_ms": "proposal generator, median ms",
    "stage_roi_heads_ms": "box head + NMS, median ms",
    "stage_postprocess_ms": "rescale to image size, median ms",
    "gflops": "GFLOPs (1 multiply-add = 1 FLOP) at the fixed size",
    "gflops_backbone": "bottom-up backbone GFLOPs",
    "gflops_fpn": "FPN GFLOPs",
    "gflops_rpn": "RPN GFLOPs",
    "gflops_roi_heads": "ROI heads GFLOPs (full proposal budget)",
    "params_M": "parameters, millions",
    "params_backbone_M": "bottom-up backbone parameters, millions",
    "params_fpn_M": "FPN parameters, millions",
    "params_rpn_M": "RPN parameters, millions",
    "params_roi_heads_M": "ROI heads parameters, millions",
    "checkpoint_mb": "checkpoint file size, MB (10^6 bytes)",
    "model_file_mb": "size of the file the runtime runs (the exported graph), MB (10^6 bytes)",
}

_MARKDOWN_COLUMNS = (
    "label",
    "runtime",
    "batch_size",
    "pareto",
    "mAP",
    "AP",
    "AP50",
    "latency_median_ms",
    "latency_p90_ms",
    "fps",
    "dataset_latency_median_ms",
    "dataset_fps",
    "speedup",
    "gflops",
    "params_M",
    "checkpoint_mb",
    "model_file_mb",
)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool] = (True, True)) -> List[int]:
    """Indices of the points no other point dominates, in input order.

    A point dominates another when it is at least as good in every objective and strictly better
    in one; ``maximize[k]`` says whether objective k is better high (mAP, FPS) or low (GFLOPs).
    Points with a missing or non-finite coordinate are never on the front; equal points are
    both kept.
    """
    signs = [1.0 if m else -1.0 for m in maximize]
    valid = [i for i, p in enumerate(points) if all(_is_number(v) for v in p)]
    scored = {i: [s * float(v) for s, v in zip(signs, points[i])] for i in valid}
    front = []
    for i in valid:
        a = scored[i]
        dominated = any(
            all(bj >= aj for aj, bj in zip(a, scored[j])) and any(bj > aj for aj, bj in zip(a, scored[j]))
            for j in valid
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def reproducibility_record(environment: dict, seed: Optional[int], settings: dict, argv: Sequence[str] = None) -> dict:
    """What is needed to reproduce the figures: environment (see ``timing.environment_info``),
    seed, the run's settings and the exact command line."""
    argv = sys.argv if argv is None else argv
    return {
        "environment": environment,
        "seed": seed,
        "settings": settings,
        "command": " ".join(shlex.quote(a) for a in argv),
    }


def _columns(rows: Sequence[dict]) -> List[str]:
    seen = [c for c in COLUMN_DOCS if any(c in r for r in rows)]
    for row in rows:
        seen.extend(k for k in row if k not in seen)
    return seen


def write_csv(rows: Sequence[dict], path: str, columns: Sequence[str] = None) -> str:
    """One line per row; numbers at full precision, missing values empty."""
    columns = list(columns or _columns(rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())


def write_json(obj, path: str) -> str:
    return atomic_write_json(obj, path)


def _format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = None) -> str:
    """A GitHub-flavoured Markdown table of ``columns`` (default: the headline figures present)."""
    if columns is None:
        columns = [c for c in _MARKDOWN_COLUMNS if any(c in r for r in rows)]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c == "label" else "---:" for c in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(
    rows: Sequence[dict],
    x_key: str,
    y_key: str,
    path: str,
    maximize_x: bool,
    xlabel: str,
    ylabel: str,
    title: str = "",
    metadata: dict = None,
) -> Optional[str]:
    """Scatter ``y_key`` against ``x_key``, one labelled point per row, Pareto front marked.

    Returns the path written, or None when no row has both values (nothing to plot).
    """
    points = [(r.get(x_key), r.get(y_key)) for r in rows]
    plotted = [i for i, p in enumerate(points) if all(_is_number(v) for v in p)]
    if not plotted:
        return None
    front = set(pareto_front([(y, x) for x, y in points], maximize=(True, maximize_x)))

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    others = [i for i in plotted if i not in front]
    ax.scatter([points[i][0] for i in others], [points[i][1] for i in others], c="0.55", label="dominated", zorder=2)
    front_sorted = sorted(front, key=lambda i: points[i][0])
    ax.plot(
        [points[i][0] for i in front_sorted],
        [points[i][1] for i in front_sorted],
        "o-",
        color="tab:red",
        label="Pareto front",
        zorder=3,
    )
    for i in plotted:
        ax.annotate(str(rows[i].get("label", i)), points[i], textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_metadata = {"Software": "pgp_det"}
    if metadata:
        # the figure file carries its own reproducibility record (PNG text chunk)
        png_metadata["Description"] = json.dumps(metadata, default=str)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", metadata=png_metadata))
    finally:
        plt.close(fig)
    return path


def write_report(
    rows: Sequence[dict], output_dir: str, reproducibility: dict, details: Dict[str, dict] = None
) -> Dict[str, str]:
    """Write results.csv/.json/.md, map_vs_fps.png and map_vs_gflops.png into ``output_dir``.

    Args:
        rows: one flat dict per model (columns of :data:`COLUMN_DOCS` and any others).
        reproducibility: from :func:`reproducibility_record`; stored in the JSON, the Markdown
            and the PNGs' metadata.
        details: optional per-label extras for the JSON (e.g. every timing sample).

    Returns:
        kind ("csv", "json", "md", "map_vs_fps", "map_vs_gflops") -> path written. A plot is
        left out when no row has mAP and the x value (e.g. with evaluation skipped).
    """
    os.makedirs(output_dir, exist_ok=True)
    rows = list(rows)
    columns = _columns(rows)
    written = {
        "csv": write_csv(rows, os.path.join(output_dir, "results.csv"), columns),
        "json": write_json(
            {
                "columns": {c: COLUMN_DOCS.get(c, "") for c in columns},
                "results": rows,
                "details": details or {},
                "reproducibility": reproducibility,
            },
            os.path.join(output_dir, "results.json"),
        ),
    }

    env = reproducibility.get("environment", {})
    kept = ", freed memory kept" if env.get("freed_memory_kept") else ""
    where = f"{env.get('device_name', '?')} ({env.get('device', '?')}, {env.get('num_threads', '?')} threads{kept})"
    metric = next((r["map_metric"] for r in rows if r.get("map_metric")), "mAP")
    batches = sorted({r.get("batch_size", 1) for r in rows})
    batch = "batch " + "/".join(str(b) for b in batches)
    md = [
        "# mAP vs inference speed\n",
        f"mAP = {metric}. Latency: {batch} at the fixed size, batch 1 on dataset images, wall clock, on {where}.\n",
        markdown_table(rows),
        "## Reproducibility\n",
        f"- command: `{reproducibility.get('command', '')}`",
        f"- seed: {reproducibility.get('seed')}",
        f"- versions: torch {env.get('torch')}, torchvision {env.get('torchvision')}, "
        f"detectron2 {env.get('detectron2')}, python {env.get('python')}, {env.get('platform')}"
        + (f", CUDA {env.get('cuda')}, driver {env.get('gpu_driver')}" if env.get("cuda") else ""),
        f"- settings: `{json.dumps(reproducibility.get('settings', {}), default=str)}`",
        "",
    ]
    written["md"] = atomic_write_text(os.path.join(output_dir, "results.md"), "\n".join(md))

    title = f"{metric} | {where}"
    for kind, x_key, maximize_x, xlabel in (
        ("map_vs_fps", "fps", True, f"FPS ({batch}, fixed input size)"),
        ("map_vs_gflops", "gflops", False, "GFLOPs (fixed input size)"),
    ):
        path = plot_tradeoff(
            rows, x_key, "mAP", os.path.join(output_dir, kind + ".png"), maximize_x, xlabel, f"mAP ({metric})", title,
            reproducibility,
        )
        if path:
            written[kind] = path
    return written


SEED_SUFFIX = re.compile(r"_s(\d+)$")  # labels of one method's seeds: "<method>_s<seed>"

# figures summarised over seeds, in table order
SEED_SUMMARY_COLUMNS = ("AP50", "AP", "AP75", "mAP", "gflops", "params_M", "latency_median_ms", "fps")


def summarize_seeds(rows: Sequence[dict]) -> List[dict]:
    """Mean and sample standard deviation over the seeds of each method.

    Rows whose label ends in ``_s<seed>`` are grouped by the label without it (other rows are
    groups of one). Returns one row per method, in first-seen order: ``label``, ``seeds`` (count),
    and ``<column>_mean`` / ``<column>_std`` for each of :data:`SEED_SUMMARY_COLUMNS` present
    (``std`` is None for a single seed).
    """
    groups: Dict[str, List[dict]] = {}
    for row in rows:
        groups.setdefault(SEED_SUFFIX.sub("", str(row["label"])), []).append(row)
    summary = []
    for label, members in groups.items():
        out = {"label": label, "seeds": len(members)}
        for column in SEED_SUMMARY_COLUMNS:
            values = [float(r[column]) for r in members if _is_number(r.get(column))]
            if values:
                out[f"{column}_mean"] = statistics.fmean(values)
                out[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(out)
    return summary


def exceeds_spread(a: dict, b: dict, column: str) -> Optional[bool]:
    """Whether methods ``a`` and ``b`` (rows of :func:`summarize_seeds`) differ in ``column`` by more
    than their seed spreads: ``|mean_a - mean_b| > std_a + std_b`` (their mean +- std intervals do
    not overlap). None when either has fewer than two seeds."""
    std_a, std_b = a.get(f"{column}_std"), b.get(f"{column}_std")
    if std_a is None or std_b is None:
        return None
    return abs(a[f"{column}_mean"] - b[f"{column}_mean"]) > std_a + std_b


def seed_summary_markdown(summary: Sequence[dict], reference: Optional[str] = None, column: str = "AP50") -> str:
    """A Markdown table of :func:`summarize_seeds`: mean +- std per figure, and for each method its
    difference in ``column`` to ``reference`` (default: the first method) and whether that
    difference exceeds the seed spread (:func:`exceeds_spread`)."""
    if not summary:
        return ""
    base = next((r for r in summary if r["label"] == reference), summary[0])
    columns = [c for c in SEED_SUMMARY_COLUMNS if any(f"{c}_mean" in r for r in summary)]
    header = ["label", "seeds", *columns, f"{column} vs {base['label']}", "exceeds spread"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(columns) + "---:|---|"]
    for row in summary:
        cells = [str(row["label"]), str(row["seeds"])]
        for c in columns:
            mean, std = row.get(f"{c}_mean"), row.get(f"{c}_std")
            cells.append("-" if mean is None else _format_cell(mean) + ("" if std is None else f" +- {_format_cell(std)}"))
        if row is base or f"{column}_mean" not in row or f"{column}_mean" not in base:
            cells += ["", ""]
        else:
            verdict = exceeds_spread(row, base, column)
            cells += [f"{row[f'{column}_mean'] - base[f'{column}_mean']:+.2f}",
                      {None: "n/a (1 seed)", True: "yes", False: "no"}[verdict]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

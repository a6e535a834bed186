"""The part of a latency table's rest that shrinks with the channels, fitted to whole-model
timings of pruned copies of the model.

A table's ``rest_saved(widths) = activation_ms * (1 - A(widths) / A(full)) + layer_overhead *
(L(full) - L(widths))`` (:mod:`pgp_det.latency.table`) has two coefficients; :func:`fit_rest`
finds them by non-negative least squares, so that the fit never turns a saving into a cost.
"""
import copy
from typing import List, Mapping, Sequence, Tuple

from .table import LatencyTable

__all__ = ["fit_rest"]


def _nonnegative_least_squares(columns: Sequence[Sequence[float]], targets: Sequence[float]) -> List[float]:
    """``x >= 0`` minimising ``|sum_k x_k columns[k] - targets|^2`` for two or fewer columns (every
    subset of free coefficients is solved and the best non-negative solution kept)."""
    best, best_error = [0.0] * len(columns), sum(t * t for t in targets)
    subsets = [[0], [1], [0, 1]] if len(columns) == 2 else [[0]]
    for subset in subsets:
        a = [[sum(columns[i][r] * columns[j][r] for r in range(len(targets))) for j in subset] for i in subset]
        b = [sum(columns[i][r] * targets[r] for r in range(len(targets))) for i in subset]
        if len(subset) == 1:
            if a[0][0] <= 0:
                continue
            solution = [b[0] / a[0][0]]
        else:
            det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
            if abs(det) <= 1e-12 * max(a[0][0] * a[1][1], 1e-300):
                continue
            solution = [(b[0] * a[1][1] - b[1] * a[0][1]) / det, (a[0][0] * b[1] - a[1][0] * b[0]) / det]
        if min(solution) < 0:
            continue
        x = [0.0] * len(columns)
        for i, value in zip(subset, solution):
            x[i] = value
        error = sum((sum(x[k] * columns[k][r] for k in range(len(columns))) - targets[r]) ** 2
                    for r in range(len(targets)))
        if error < best_error:
            best, best_error = x, error
    return best


def fit_rest(table: LatencyTable, measured: Sequence[Tuple[Mapping[str, int], float]]) -> LatencyTable:
    """A copy of ``table`` whose ``activation_ms`` and ``layer_overhead`` (``rest_saved``, see the
    :mod:`pgp_det.latency.table`) best explain ``measured``: ``(widths, whole-model ms at the reference
    proposal count)`` of pruned copies of the model, by non-negative least squares. Without
    ``activations`` only ``layer_overhead`` is fitted. Measurements the table under-predicts (the
    copies saved less than their layers' times alone) leave ``activation_ms`` at zero and fit
    ``layer_overhead`` alone in ``[-1, 0)``: only that share of the layers' savings shows (at -1
    none; the fit never turns a saving into a cost).
    """
    base = copy.copy(table)
    base.activation_ms, base.layer_overhead = 0.0, 0.0
    base.proposals = table.reference_proposals
    full_layers = base.layer_sum(base.breakdown())
    activation_column, layer_column, targets = [], [], []
    for widths, ms in measured:
        times = base.breakdown(widths)
        activation_column.append(1.0 - base.activation_fraction(widths))
        layer_column.append(max(full_layers - base.layer_sum(times), 0.0))
        targets.append(sum(times.values()) - float(ms))  # what the rest saved
    columns = [layer_column] if not table.activations else [activation_column, layer_column]
    solution = _nonnegative_least_squares(columns, targets)
    result = copy.copy(table)
    result.activation_ms, result.layer_overhead = solution if table.activations else (0.0, solution[0])
    if max(solution) == 0.0 and max(layer_column, default=0.0) > 0.0:
        # the layers' savings show only in part: fit the share that shows, 1 + layer_overhead in [0, 1]
        shown = _nonnegative_least_squares([layer_column], [t + saved for t, saved in zip(targets, layer_column)])[0]
        result.layer_overhead = min(shown, 1.0) - 1.0
    return result

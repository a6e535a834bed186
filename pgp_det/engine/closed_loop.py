"""One-shot pruning to a latency target that holds where the model runs: prune by the table, time
the pruned model against the unpruned one in turn, correct the budget by what was measured, and
prune again from the original model until the measured share is within a tolerance.

A latency table predicts the sum of what it profiled; on a device whose whole-model time has
parts that do not shrink with the channels as the table assumes (fixed stages, memory traffic,
another thread count), the deeper the cut the more it under-predicts. The loop needs no model of
that error: each round's measured share ``m_k`` (pruned over unpruned, median over rounds timed
in turn) rescales the budget the table must meet::

    budget_{k+1} = budget_k * s* / m_k        s* = target_ms / (table's unpruned prediction)

Each round prunes afresh from the original weights, so the rounds differ only in their budget.
The loop runs only on the device the table was made on (its name and thread count): a share
measured elsewhere says nothing about that device.
"""
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn as nn
from detectron2.data import DatasetCatalog

from ..benchmark.measure import fixed_size_images
from ..benchmark.timing import environment_info
from ..errors import UserInputError
from ..pruning.groups import PruningRequestError
from ..latency.page_faults import check_freed_memory_setting
from ..latency.table import LatencyTable
from ..benchmark.latency.timers import default_timer
from ..benchmark.latency.whole_model import time_interleaved
from .one_shot import OneShotResult, load_model_to_prune, prune_once
from ..pruning.target import TARGET_KINDS, load_latency_table
from ..utils.allocator import keep_freed_memory
from ..utils.output_dir import claim_output_dir

__all__ = ["LoopRound", "check_table_device", "describe_rounds", "measured_share", "profiled_images", "prune_and_write",
           "prune_to_measured_latency"]

# (unpruned model, pruned model) -> pruned time over unpruned time, as measured on this device
ShareMeter = Callable[[nn.Module, nn.Module], float]


@dataclass
class LoopRound:
    """One round of the loop: the budget the table had to meet (ms), what it predicts for the
    pruned widths (ms, and as a share of its unpruned prediction), and the measured share."""

    budget_ms: float
    predicted_ms: float
    predicted_share: float
    measured_share: float

    def error_percent(self, target_share: float) -> float:
        """How far the measured share is from the target, in percent of the target (+: slower)."""
        return 100.0 * (self.measured_share - target_share) / target_share


def check_table_device(table: LatencyTable, device: str = "cpu", freed_memory_kept: bool = False) -> None:
    """Refuse to close the loop on a machine other than the table's (another CPU or GPU model, or
    another thread count), or in another memory setting than the table was profiled in
    (``freed_memory_kept``: whether this process keeps freed memory, :mod:`pgp_det.utils.allocator`).

    Raises:
        UserInputError: one line naming both machines, or both settings and the flag to change.
    """
    here = environment_info(device)
    made = table.metadata
    for key, what in (("device_name", "device"), ("num_threads", "thread count")):
        if made.get(key) is not None and made.get(key) != here[key]:
            raise UserInputError(
                f"the latency table was made with {what} {made.get(key)!r}, this machine has {here[key]!r}: the closed "
                "loop measures on the table's device only; run it there, or prune by the table alone (no --closed-loop)")
    check_freed_memory_setting(made, freed_memory_kept, "the latency table", "the closed loop would time")


def profiled_images(table: LatencyTable) -> List[np.ndarray]:
    """The images ``table`` was profiled on, at its input size: the first ``images`` of the
    dataset its metadata names (``images_from``), so that the loop measures what
    ``profile_latency --check-weights`` measures; noise images where the table was profiled on
    noise or its dataset is not registered here."""
    meta = table.metadata
    source = meta.get("images_from")
    dataset = source if source and source != "noise" and source in DatasetCatalog.list() else None
    return fixed_size_images(dataset, tuple(table.input_size), int(meta.get("images") or 1))


def measured_share(table: LatencyTable, rounds: int = 5, device: str = "cpu", images=None) -> ShareMeter:
    """A :data:`ShareMeter` timing both models whole (batch 1, the table's input size and
    reference proposal count, ``images`` or one noise image), one call each per round, in turn,
    over ``rounds`` rounds after a warm-up call: the median of the per-round ratios."""
    timer = default_timer(device, warmup=1, runs=1)

    def share(unpruned: nn.Module, pruned: nn.Module) -> float:
        samples = time_interleaved([(unpruned.eval(), None), (pruned.eval(), None)], table.input_size, timer,
                                   rounds, device, "fp32", table.reference_proposals, images)
        return float(np.median([p / u for u, p in zip(samples[0], samples[1])]))

    return share


def prune_to_measured_latency(cfg, criterion: str, meter: ShareMeter, *, tolerance: float = 0.05,
                              max_rounds: int = 4, trusted: bool = False, progress=None,
                              **report_args) -> OneShotResult:
    """Prune ``cfg``'s model once to its latency target (``PRUNING.TARGET.KIND "latency"``), then close
    the loop on the measured share (see the module docstring).

    Args:
        meter: measures a pruned model's share of the unpruned model's time on this device.
        tolerance: a round within ``tolerance`` of the target share (relative) ends the loop.
        max_rounds: at most this many prunings.
        progress: ``str -> None``, called with one line per round.
        report_args: passed to :func:`~pgp_det.engine.one_shot.prune_once`.

    Returns:
        the result of the round kept: the last within the tolerance; otherwise the least pruned
        round that is not slower than the target beyond the tolerance, else the fastest. Its
        report's ``"closed_loop"`` records every round, the round kept, whether it met the
        target and by how much it misses; its ``warnings`` say so when it misses.

    Raises:
        UserInputError: ``cfg`` has no latency target, or the first round's target is
            unreachable (one line).
    """
    kind = TARGET_KINDS[cfg.PRUNING.TARGET.KIND]
    if not kind.measured_on_device:
        raise UserInputError("the closed loop needs a latency target (--target-latency-ms or --target-fps)")
    if not 0.0 < tolerance < 1.0 or max_rounds < 1:
        raise UserInputError(f"closed loop: tolerance {tolerance} must be in (0, 1) and rounds {max_rounds} >= 1")
    say = progress or (lambda line: None)
    if cfg.SEED < 0 and not cfg.MODEL.WEIGHTS:  # every round must start from the same random weights
        cfg = cfg.clone()
        cfg.defrost()
        cfg.SEED = int(np.random.randint(2 ** 31))
        cfg.freeze()
    first = prune_once(cfg, criterion, trusted=trusted, **report_args)
    latency = first.report["latency"]
    full_ms, target_ms = latency["before_ms"], latency["target_ms"]
    target_share = target_ms / full_ms
    original = load_model_to_prune(cfg, trusted).eval()  # what every round starts from
    rounds: List[LoopRound] = []
    results: List[OneShotResult] = []
    result, budget, stopped = first, target_ms, ""
    while True:
        predicted = result.report["latency"]["predicted_after_ms"]
        record = LoopRound(budget, predicted, predicted / full_ms, meter(original, result.model))
        rounds.append(record)
        results.append(result)
        error = record.error_percent(target_share)
        say(f"round {len(rounds)}: budget {budget:.3f} ms, predicted {predicted:.3f} ms (share {record.predicted_share:.3f}), "
            f"measured share {record.measured_share:.3f} against {target_share:.3f} ({error:+.1f}%)")
        if abs(error) <= 100.0 * tolerance:
            break
        if len(rounds) == max_rounds:
            stopped = f"stopped after {max_rounds} rounds"
            break
        budget *= target_share / record.measured_share
        try:
            result = prune_once(kind.config_with_limit(cfg, budget), criterion, trusted=trusted, **report_args)
        except PruningRequestError as e:  # the correction asks for more than the floor allows
            stopped = f"the corrected budget {budget:.3f} ms is unreachable ({e})"
            break
        say(f"next budget {budget:.3f} ms")
    kept = _round_to_keep(rounds, target_share, tolerance)
    chosen = results[kept]
    miss = rounds[kept].error_percent(target_share)
    met = abs(miss) <= 100.0 * tolerance or miss < 0
    # the report names the user's target; the budget the kept round asked of the table beside it
    latency = chosen.report["latency"]
    latency["budget_ms"], latency["target_ms"] = latency["target_ms"], target_ms
    chosen.report["closed_loop"] = {
        "target_share": target_share, "tolerance": tolerance, "max_rounds": max_rounds, "kept_round": kept + 1,
        "met": met, "error_percent": miss, "stopped": stopped,
        "rounds": [{**vars(r), "error_percent": r.error_percent(target_share)} for r in rounds],
    }
    if not met:
        chosen.warnings.append(
            f"the pruned model measures {rounds[kept].measured_share:.3f} of the unpruned model's time, "
            f"{miss:+.1f}% from the target share {target_share:.3f} ({stopped}); raise the target, prune more scopes or "
            "lower the floor")
    return chosen


def _round_to_keep(rounds: List[LoopRound], target_share: float, tolerance: float) -> int:
    """The last round within the tolerance; else the least pruned round not slower than the
    target beyond it; else the fastest round."""
    within = [i for i, r in enumerate(rounds) if abs(r.error_percent(target_share)) <= 100.0 * tolerance]
    if within:
        return within[-1]
    meeting = [i for i, r in enumerate(rounds) if r.measured_share <= target_share]
    if meeting:
        return max(meeting, key=lambda i: rounds[i].measured_share)
    return min(range(len(rounds)), key=lambda i: rounds[i].measured_share)


def describe_rounds(report: dict) -> Optional[str]:
    """One line on the loop's outcome, for the terminal (None without a loop)."""
    loop = report.get("closed_loop")
    if not loop:
        return None
    kept = loop["rounds"][loop["kept_round"] - 1]
    return (f"closed loop: kept round {loop['kept_round']} of {len(loop['rounds'])}, measured share "
            f"{kept['measured_share']:.3f} against {loop['target_share']:.3f} ({loop['error_percent']:+.1f}%, "
            f"{'met' if loop['met'] else 'missed'})")


def prune_and_write(cfg, criterion: str, output: str, loop=None, *, trusted: bool = False, threads: int = 0,
                    config_path: str = "", overrides=(), say: Callable[[str], None] = print) -> List[str]:
    """Prune ``cfg``'s model once to its target (:func:`~pgp_det.engine.one_shot.prune_once`), or,
    with ``loop`` (:class:`~pgp_det.engine.one_shot_request.ClosedLoopSettings`), until its
    latency measured here is within the tolerance (:func:`prune_to_measured_latency`, on the latency
    table's device only), and write the result to ``output``, claimed first so that a failed run
    leaves an earlier one's files as they were. Progress and the summary go to ``say``, warnings
    to stderr.

    Returns:
        the paths written.
    """
    if threads:
        torch.set_num_threads(threads)
    report_args = dict(overrides=overrides, config_path=config_path)
    with claim_output_dir(output, "--output") as claimed:
        started = time.perf_counter()
        if loop is not None:
            table = load_latency_table(cfg.PRUNING.TARGET.LATENCY.TABLE)
            check_table_device(table, freed_memory_kept=loop.keep_freed_memory)
            if loop.keep_freed_memory:
                keep_freed_memory()
            result = prune_to_measured_latency(
                cfg, criterion, measured_share(table, loop.timing_rounds, images=profiled_images(table)),
                tolerance=loop.tolerance,
                max_rounds=loop.max_rounds, trusted=trusted, progress=say, **report_args)
        else:
            result = prune_once(cfg, criterion, trusted=trusted, **report_args)
        for line in result.warnings:
            print(f"warning: {line}", file=sys.stderr)
        claimed.start_writing()
        written = result.write(output, cfg)
    say("\n".join(filter(None, [result.summary(), describe_rounds(result.report)])))
    say(f"wrote {', '.join(written)} in {time.perf_counter() - started:.0f} s")
    return written

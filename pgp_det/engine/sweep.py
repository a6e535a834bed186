"""Sweeps of ``tools/sweep.py``: the runs one config is trained (or one-shot pruned) with, their
checks before the first run starts, running them P at a time, and the summary over seeds.

``args`` arguments are the tool's parsed options (``ratios``, ``flops_reductions``, ``variant``,
``baseline``, ``oneshot``, ``seeds``, ``config``, ``config_file``, ``output``, ``opts``, ``reuse``).
"""
import json
import os
import shlex
import subprocess
import time
from typing import Any, Dict, List, Tuple

from ..config import load_config, resolve_config_path
from .preflight import existing_run_files
from ..errors import UserInputError
from ..pruning.settings import check_pruning_config
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.output_dir import check_output_dir
from ..benchmark.measure import check_eval_arguments
from ..benchmark.report import seed_summary_markdown, summarize_seeds

__all__ = ["check_runs", "config_differences", "parse_fractions", "parse_variant", "plan_runs", "run", "run_parallel",
           "write_seed_summary"]


def parse_fractions(text: str, option: str) -> List[float]:
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserInputError(f"{option} '{text}': expected comma-separated fractions such as 0.3,0.5,0.7") from None
    bad = [v for v in values if not 0.0 < v < 1.0]
    if bad:
        raise UserInputError(f"{option}: {bad[0]} is outside (0, 1)")
    return values


def parse_variant(text: str) -> Tuple[str, List[str]]:
    label, sep, overrides = text.partition("=")
    opts = shlex.split(overrides)
    if not sep or not label or not opts or len(opts) % 2:
        raise UserInputError(f"--variant '{text}': expected LABEL='KEY VALUE [KEY VALUE ...]'")
    return label, opts


def plan_runs(args) -> List[Tuple[str, List[str]]]:
    """``[(label, extra train_net / prune_net arguments)]`` in run order."""
    ratios = parse_fractions(args.ratios, "--ratios")
    reductions = parse_fractions(args.flops_reductions, "--flops-reductions")
    variants = [parse_variant(v) for v in args.variant]
    if args.oneshot:
        if variants:
            raise UserInputError("--variant applies to training runs; drop it or --oneshot")
        runs = [(f"ratio{r:g}", ["--ratio", str(r)]) for r in ratios]
        runs += [(f"flops{f:g}", ["--flops-reduction", str(f)]) for f in reductions]
    else:
        targets = [(f"ratio{r:g}", ["PRUNING.TARGET.KIND", "channels", "PRUNING.TARGET.CHANNELS.RATIO", str(r)]) for r in ratios]
        targets += [(f"flops{f:g}", ["PRUNING.TARGET.KIND", "flops", "PRUNING.TARGET.FLOPS.REDUCTION", str(f)]) for f in reductions]
        runs = []
        for label, opts in targets:
            runs.append((f"pgp_{label}", ["PRUNING.ENABLED", "True", *opts]))
            runs += [(f"{name}_{label}", ["PRUNING.ENABLED", "True", *opts, *extra]) for name, extra in variants]
        if args.baseline:
            runs.insert(0, ("baseline", ["PRUNING.ENABLED", "False"]))
    if not runs:
        raise UserInputError("nothing to run: give --ratios and/or --flops-reductions (and --baseline)")
    seeds = getattr(args, "seeds", 1)
    if seeds < 1:
        raise UserInputError(f"--seeds {seeds}: give the number of seeds per run, >= 1")
    if seeds > 1:
        if args.oneshot:
            raise UserInputError("--seeds applies to training runs; one-shot pruning of given weights has no seed")
        # seeds 1..N (SEED also seeds the model's initialisation and the data order)
        runs = [(f"{label}_s{seed}", [*extra, "SEED", str(seed)]) for label, extra in runs for seed in range(1, seeds + 1)]
    return runs


def check_runs(args, runs: List[Tuple[str, List[str]]], configs_dir: str, eval_args: List[str]) -> None:
    """Check every run's config with its overrides, its output folder, and the arguments the
    measurement after them gets (``eval_args``, :func:`~.measure.check_eval_arguments`) before the
    first run starts (a bad variant must not surface hours into a sweep)."""
    path = resolve_config_path(args.config, args.config_file, configs_dir)
    check_output_dir(args.output, "--output")
    check_eval_arguments(eval_args, path, [label for label, _ in runs], args.opts)
    for label, extra in runs:
        out = os.path.join(args.output, label)
        if args.oneshot:  # prune_net checks its own arguments; its runs take seconds
            if os.path.exists(os.path.join(out, "model_pruned.pth")) and not args.reuse:
                raise UserInputError(f"run '{label}': '{out}' already holds a pruned model: pass --reuse to keep it, "
                                     "or choose another --output")
            continue
        cfg = load_config(path, [*args.opts, *extra], label=f"run '{label}'")
        try:
            check_pruning_config(cfg)
        except UserInputError as e:
            raise UserInputError(f"run '{label}': {e}") from None
        found = existing_run_files(out)
        if found and not args.reuse:
            raise UserInputError(
                f"run '{label}': '{out}' already holds a run ({', '.join(found)}): pass --reuse to keep finished runs "
                "and continue unfinished ones, or choose another --output")
        saved = os.path.join(out, "config.yaml")
        if found and os.path.isfile(saved):
            cfg.OUTPUT_DIR = out
            _check_reused_run(label, saved, cfg)


def _check_reused_run(label: str, saved_path: str, planned) -> None:
    """Refuse to keep (or continue) a run that was trained with other settings than the sweep's:
    its figures would stand in the report under a label that no longer describes it."""
    saved = load_config(saved_path, label=f"run '{label}'")
    differences = config_differences(saved, planned)
    if differences:
        key, was, now = differences[0]
        more = f" and {len(differences) - 1} more key(s)" if len(differences) > 1 else ""
        raise UserInputError(
            f"run '{label}': '{os.path.dirname(saved_path)}' was trained with {key} {was!r}, this sweep asks for "
            f"{now!r}{more}: choose another --output, or remove that folder to train the run again")


def config_differences(a, b) -> List[Tuple[str, Any, Any]]:
    """``[(dotted key, value in a, value in b)]`` for every key whose values differ, sorted by key;
    lists and tuples compare alike (a config written to YAML and read back holds lists)."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    return [(key, flat_a.get(key), flat_b.get(key)) for key in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(key) != flat_b.get(key)]


def _flatten(node, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _as_lists(value)
    return out


def _as_lists(value):
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value


def _check_exit(command: List[str], returncode: int, where: str = "above") -> None:
    if returncode == 2:
        raise UserInputError(f"{os.path.basename(command[1])} rejected its input (see the error line {where})")
    if returncode:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed with exit code {returncode} (see {where})")


def run(command: List[str]) -> None:
    print("+ " + " ".join(shlex.quote(c) for c in command), flush=True)
    _check_exit(command, subprocess.run(command).returncode)


def run_parallel(jobs: List[Tuple[List[str], str]], parallel: int) -> None:
    """Run ``(command, log file)`` jobs, ``parallel`` at a time, each with an equal share of the
    CPU cores (``OMP_NUM_THREADS``); a job's output goes to its log file. Raises after all
    started jobs end if any failed."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running, failures = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            command, log = pending.pop(0)
            print(f"+ {' '.join(shlex.quote(c) for c in command)}  > {log}", flush=True)
            handle = open(log, "w")
            running.append((subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env), command, log,
                            handle))
        time.sleep(1.0)
        for job in list(running):
            proc, command, log, handle = job
            if proc.poll() is not None:
                handle.close()
                running.remove(job)
                print(f"  done ({proc.returncode}): {log}", flush=True)
                if proc.returncode:
                    failures.append((command, proc.returncode, log))
    if failures:
        command, code, log = failures[0]
        _check_exit(command, code, where=log)


def write_seed_summary(report_dir: str) -> str:
    """``summary.md`` / ``summary.json`` beside the per-run report: mean +- std over seeds per run,
    and which AP50 differences to the first run exceed the seed spread."""
    with open(os.path.join(report_dir, "results.json")) as f:
        rows = json.load(f)["results"]
    summary = summarize_seeds(rows)
    atomic_write_json({"summary": summary, "rule": "exceeds spread: |mean_a - mean_b| > std_a + std_b"},
                      os.path.join(report_dir, "summary.json"))
    text = ("# Mean +- sample std over seeds\n\nA difference exceeds the seed spread when |mean_a - mean_b| > "
            "std_a + std_b.\n\n" + seed_summary_markdown(summary))
    return atomic_write_text(os.path.join(report_dir, "summary.md"), text)

#!/usr/bin/env python
"""Train (or one-shot prune) one model at several pruning targets, then measure them all.

Each run is ``tools/train_net.py`` in its own process, writing ``OUTPUT/<label>/``; then
``tools/eval_map_fps.py`` puts every model side by side in ``OUTPUT/report/`` (CSV, JSON,
Markdown, mAP-vs-FPS and mAP-vs-GFLOPs plots).

Examples::

    # the demo: unpruned baseline and PGP at half the FLOPs, same schedule
    python tools/sweep.py --config synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml --baseline \\
        --flops-reductions 0.5 --output output/demo
    # a trade-off curve: baseline and three FLOPs targets
    python tools/sweep.py --config synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml --baseline \\
        --flops-reductions 0.3,0.5,0.7 --output output/sweep
    # methods at the same target: PSFP (L2, soft) and one-shot prune at iteration 200 + fine-tune
    python tools/sweep.py --config synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml --flops-reductions 0.5 \\
        --variant psfp="PRUNING.CRITERION l2 PRUNING.SCHEDULE psfp PRUNING.REMOVE_RATIO 0.0" \\
        --variant oneshot="PRUNING.CRITERION l1 PRUNING.START 0 PRUNING.INTERVAL 200 PRUNING.END 200" \\
        --output output/methods
    # one-shot pruning of trained weights at several ratios, no training
    python tools/sweep.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --oneshot \\
        --ratios 0.3,0.5,0.7 MODEL.WEIGHTS output/synth_R_18_FPN/model_final.pth --output output/oneshot

Runs whose ``model_final.pth`` (or ``model_pruned.pth``) exists are reused with ``--reuse``, so
an interrupted sweep continues where it stopped. Trailing ``KEY VALUE`` pairs apply to every run.
Bad input ends with one ``error:`` line and exit code 2.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)
from pgp_det.benchmark.report import seed_summary_markdown, summarize_seeds  # noqa: E402
from pgp_det.config import load_config, resolve_config_path  # noqa: E402
from pgp_det.engine.preflight import existing_run_files  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.pruning.settings import check_pruning_config  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, add_trust_argument, check_overrides  # noqa: E402
from pgp_det.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from pgp_det.utils.output_dir import check_output_dir  # noqa: E402

TOOLS = os.path.join(ROOT, "tools")


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
        targets = [(f"ratio{r:g}", ["PRUNING.TARGET", "ratio", "PRUNING.RATIO", str(r)]) for r in ratios]
        targets += [(f"flops{f:g}", ["PRUNING.TARGET", "flops", "PRUNING.FLOPS_REDUCTION", str(f)]) for f in reductions]
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


def config_argument(args) -> List[str]:
    if bool(args.config) == bool(args.config_file):
        raise UserInputError("give exactly one of --config NAME.yaml (from configs/) or --config-file PATH")
    return ["--config", args.config] if args.config else ["--config-file", args.config_file]


def check_runs(args, runs: List[Tuple[str, List[str]]]) -> None:
    """Check every run's config with its overrides, and its output folder, before the first one
    starts (a bad variant must not surface hours into a sweep)."""
    path = resolve_config_path(args.config, args.config_file, os.path.join(ROOT, "configs"))
    check_output_dir(args.output, "--output")
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


def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", metavar="NAME.yaml", help="config file inside configs/")
    parser.add_argument("--config-file", default="", metavar="PATH")
    parser.add_argument("--ratios", default="", help="channel ratios, e.g. 0.3,0.5,0.7 (PRUNING.TARGET ratio)")
    parser.add_argument("--flops-reductions", default="", help="FLOPs reductions, e.g. 0.3,0.5 (PRUNING.TARGET flops)")
    parser.add_argument("--baseline", action="store_true", help="also train the unpruned model (training sweeps)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL='KEY VALUE ...'",
                        help="also train each target with these PRUNING overrides (repeatable)")
    parser.add_argument("--oneshot", action="store_true",
                        help="prune MODEL.WEIGHTS with tools/prune_net.py instead of training")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train every run with SEED 1..N (labels <run>_s<seed>) and report mean +- std per run")
    parser.add_argument("--parallel", type=int, default=1, metavar="P",
                        help="training runs at a time (each with OMP_NUM_THREADS = cores / P)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per training run")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs that already finished in OUTPUT, and continue (--resume) unfinished ones")
    parser.add_argument("--eval-args", default="", help="extra arguments for tools/eval_map_fps.py, quoted")
    parser.add_argument("--output", required=True, metavar="DIR")
    add_trust_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for every run")
    args = parser.parse_args(argv)
    try:
        check_overrides(parser, args.opts)
        config = config_argument(args)
        runs = plan_runs(args)
        check_runs(args, runs)
        if args.parallel < 1:
            raise UserInputError(f"--parallel {args.parallel}: give the number of runs at a time, >= 1")
        trust = ["--trust-weights"] if args.trust_weights else []
        models, jobs = [], []
        for label, extra in runs:
            out = os.path.join(args.output, label)
            if args.oneshot:
                done = os.path.join(out, "model_pruned.pth")
                command = [sys.executable, os.path.join(TOOLS, "prune_net.py"), *config, *extra, *trust,
                           "--output", out, *args.opts]
            else:
                done = os.path.join(out, "model_final.pth")
                # --reuse continues an unfinished run from its last checkpoint
                resume = ["--resume"] if args.reuse and existing_run_files(out) else []
                command = [sys.executable, os.path.join(TOOLS, "train_net.py"), *config, *trust, *resume,
                           "--num-gpus", str(args.num_gpus), *args.opts, *extra, "OUTPUT_DIR", out]
            if args.reuse and os.path.isfile(done):
                print(f"reusing {done}", flush=True)
            elif args.parallel > 1:
                os.makedirs(args.output, exist_ok=True)
                jobs.append((command, os.path.join(args.output, f"{label}.log")))
            else:
                run(command)
            if args.oneshot:
                models += ["--model", f"{label}={os.path.join(out, 'config.yaml')}:{done}"]
            else:
                models += ["--run-dir", out]
        run_parallel(jobs, args.parallel)
        run([sys.executable, os.path.join(TOOLS, "eval_map_fps.py"), *models, *trust, *shlex.split(args.eval_args),
             "--output", os.path.join(args.output, "report")])
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = os.path.join(args.output, "report", "results.md")
    with open(table) as f:
        print(f.read())
    if args.seeds > 1:
        table = write_seed_summary(os.path.join(args.output, "report"))
        with open(table) as f:
            print(f.read())
    print(f"sweep done: each run in {os.path.abspath(args.output)}/<label>/, the table above in {os.path.abspath(table)}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

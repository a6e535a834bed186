#!/usr/bin/env python
"""Measure what pruning while training costs: the PGP hook's own time as a share of training time.

The hook's time is everything it does: per-iteration score accumulation and mask upkeep, and the
pruning steps themselves (scoring, allocation, surgery, cost accounting). Training time is the
wall time of ``trainer.train()`` with evaluation switched off. Several runs, median reported.

Example::

    python tools/benchmark_hook_overhead.py --config synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml \\
        --runs 3 SOLVER.MAX_ITER 100 PRUNING.SCHEDULE.END 75 PRUNING.SCHEDULE.INTERVAL 15
"""
import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)

import torch  # noqa: E402

from pgp_det.config import load_config  # noqa: E402
from pgp_det.data import check_dataset_available, register_custom_datasets  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.pruning.settings import check_pruning_config  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, run_tool  # noqa: E402


def build_cfg(args, output_dir):
    path = args.config_file or os.path.join(ROOT, "configs", args.config)
    cfg = load_config(path, list(args.opts) + ["DATASETS.TEST", "()", "OUTPUT_DIR", output_dir,
                                               "SOLVER.CHECKPOINT_PERIOD", "1000000"])
    if not cfg.PRUNING.ENABLED:
        raise UserInputError("PRUNING.ENABLED is False in this config: nothing to measure")
    cfg.MODEL.DEVICE = "cuda" if cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available() else "cpu"
    check_pruning_config(cfg)
    register_custom_datasets(cfg)
    for name in cfg.DATASETS.TRAIN:
        check_dataset_available(name)
    return cfg


def one_run(args) -> dict:
    from pgp_det.engine import Trainer
    from pgp_det.pruning.hook import PGPHook

    with tempfile.TemporaryDirectory() as output_dir:
        cfg = build_cfg(args, output_dir)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        hook = next(h for h in trainer._hooks if isinstance(h, PGPHook))
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
        steps = sum(entry["seconds"] for entry in hook.log)
    return {
        "train_seconds": total,
        "hook_seconds": hook.hook_seconds,
        "step_seconds": steps,
        "per_iteration_ms": 1000 * (hook.hook_seconds - steps) / cfg.SOLVER.MAX_ITER,
        "overhead_percent": 100 * hook.hook_seconds / total,
        "iterations": cfg.SOLVER.MAX_ITER,
        "pruning_steps": len(hook.log),
    }


def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml", metavar="NAME.yaml")
    parser.add_argument("--config-file", default="", metavar="PATH")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default="", metavar="PATH", help="also write the figures here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return run_tool(parser, argv, run)


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    if args.runs < 1:
        raise UserInputError("--runs must be >= 1")
    runs = []
    for index in range(args.runs):
        runs.append(one_run(args))
        print(f"run {index + 1}/{args.runs}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in runs[-1].items()), flush=True)
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    summary.update(runs=args.runs, threads=torch.get_num_threads(), device="cpu" if not torch.cuda.is_available()
                   else torch.cuda.get_device_name())
    print(f"median over {args.runs} runs: hook {summary['hook_seconds']:.2f} s of {summary['train_seconds']:.1f} s "
          f"training = {summary['overhead_percent']:.2f}% ({summary['per_iteration_ms']:.2f} ms per iteration, "
          f"{summary['step_seconds']:.2f} s in {summary['pruning_steps']:.0f} pruning steps)")
    if args.json:
        from pgp_det.utils.io import atomic_write_json

        atomic_write_json({"median": summary, "runs": runs, "command": sys.argv}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

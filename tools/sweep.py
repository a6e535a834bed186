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
        --variant psfp="PRUNING.CRITERION.NAME l2 PRUNING.SCHEDULE.NAME psfp PRUNING.SOFT.REMOVE_RATIO 0.0" \\
        --variant oneshot="PRUNING.CRITERION.NAME l1 PRUNING.SCHEDULE.START 0 PRUNING.SCHEDULE.INTERVAL 200 PRUNING.SCHEDULE.END 200" \\
        --output output/methods
    # one-shot pruning of trained weights at several ratios, no training
    python tools/sweep.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --oneshot \\
        --ratios 0.3,0.5,0.7 MODEL.WEIGHTS output/synth_R_18_FPN/model_final.pth --output output/oneshot

Runs whose ``model_final.pth`` (or ``model_pruned.pth``) exists are reused with ``--reuse``, so
an interrupted sweep continues where it stopped. Trailing ``KEY VALUE`` pairs apply to every run.
Bad input ends with one ``error:`` line and exit code 2.
"""
import argparse
import os
import shlex
import sys
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)
from pgp_det.engine.sweep import check_runs, plan_runs, run, run_parallel, write_seed_summary  # noqa: E402
from pgp_det.engine.preflight import existing_run_files  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, add_trust_argument, run_tool  # noqa: E402

TOOLS = os.path.join(ROOT, "tools")


def config_argument(args) -> List[str]:
    if bool(args.config) == bool(args.config_file):
        raise UserInputError("give exactly one of --config NAME.yaml (from configs/) or --config-file PATH")
    return ["--config", args.config] if args.config else ["--config-file", args.config_file]


def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", metavar="NAME.yaml", help="config file inside configs/")
    parser.add_argument("--config-file", default="", metavar="PATH")
    parser.add_argument("--ratios", default="", help="channel ratios, e.g. 0.3,0.5,0.7 (PRUNING.TARGET.KIND channels)")
    parser.add_argument("--flops-reductions", default="", help="FLOPs reductions, e.g. 0.3,0.5 (PRUNING.TARGET.KIND flops)")
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
    return run_tool(parser, argv, run_sweep)


def run_sweep(args) -> int:
    config = config_argument(args)
    runs = plan_runs(args)
    try:
        eval_args = shlex.split(args.eval_args)
    except ValueError as e:
        raise UserInputError(f"--eval-args '{args.eval_args}': {e}") from None
    check_runs(args, runs, os.path.join(ROOT, "configs"), eval_args)
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
    run([sys.executable, os.path.join(TOOLS, "eval_map_fps.py"), *models, *trust, *eval_args,
         "--output", os.path.join(args.output, "report")])
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

#!/usr/bin/env python
"""Merge several latency tables of one model, profiled at the same settings on the same device,
into one steadier table.

Example::

    for i in 1 2 3; do
        python tools/profile_latency.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --device cpu \\
            --weights model_final.pth --input-size 224x224 --threads 2 --output r18_cpu_224_$i.json
    done
    python tools/merge_latency_tables.py r18_cpu_224_1.json r18_cpu_224_2.json r18_cpu_224_3.json \\
        --output r18_cpu_224.json

On a noisy device two profiles disagree on what pruning each group saves, and a ``knapsack``
allocation follows those differences. The merged table (``pgp_det.latency.merge_tables``)
takes the median of every layer timing and of the fixed rest over the profiles, and fits the rest
that shrinks with the channels again to all their calibration copies together. Tables that differ
in architecture, input size, proposal counts, device, threads, precision or test-time settings are
refused.

Bad input ends with one ``error:`` line on stderr, exit code 2, and nothing written.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)

from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.latency.merge import merge_table_files  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, run_tool  # noqa: E402


def argument_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", metavar="TABLE.json", help="tables of tools/profile_latency.py (two or more)")
    parser.add_argument("--output", required=True, metavar="MERGED.json", help="the merged table to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing MERGED.json")
    return parser


def check_args(args) -> None:
    """Reject bad arguments before any table is read (the tables themselves: merge_table_files)."""
    if os.path.isdir(args.output):
        raise UserInputError(f"--output '{args.output}' is a folder: give the table's file name, e.g. merged.json")
    if os.path.abspath(args.output) in {os.path.abspath(t) for t in args.tables}:
        raise UserInputError(f"--output '{args.output}' is one of the tables to merge: choose another file")
    if os.path.exists(args.output) and not args.overwrite:
        raise UserInputError(f"'{args.output}' already exists: pass --overwrite to replace it, or choose another --output")


def run(args) -> int:
    check_args(args)
    tables, merged = merge_table_files(args.tables, args.output)
    for table in tables:
        print(f"{table.source}: unpruned model {table.predict():.3f} ms predicted, rest shrinking with the channels "
              f"{table.activation_ms:.3f} ms element-wise, layer overhead {table.layer_overhead:.3f}")
    print(f"merged {len(tables)} tables of {merged.describe()}: unpruned model {merged.predict():.3f} ms predicted at "
          f"{merged.reference_proposals} proposals, rest shrinking with the channels {merged.activation_ms:.3f} ms "
          f"element-wise, layer overhead {merged.layer_overhead:.3f}")
    print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    return run_tool(argument_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train or evaluate a Faster R-CNN with pgp_det, following detectron2's ``tools/train_net.py``.

Examples::

    python tools/train_net.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml
    python tools/train_net.py --config-file configs/faster_rcnn_R_50_FPN_voc.yaml --num-gpus 8
    python tools/train_net.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml --eval-only \\
        MODEL.WEIGHTS output/synth_r18/model_final.pth
    python tools/train_net.py --config-file configs/faster_rcnn_R_50_FPN_voc.yaml \\
        --register-voc mine_train datasets/mine train "cat,dog" \\
        --register-voc mine_test datasets/mine test "cat,dog" \\
        DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_test",)' MODEL.ROI_HEADS.NUM_CLASSES 2

Every check (config, datasets and their class count, weights, OUTPUT_DIR) runs before anything
is written; bad input ends with one ``error:`` line on stderr and exit code 2. OUTPUT_DIR is
locked while the run uses it, and a new training refuses a folder that holds another run (pass
``--resume`` to continue that one); ``--eval-only`` pointed at a folder that holds a training run
writes to its ``eval/`` subfolder instead, so the run's config.yaml and results.json stay its
own. Weights files that pickle Python objects are refused unless
``--trust-weights`` is given (loading them runs code they hold).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)

import torch.distributed  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from pgp_det.checkpoint import PrunedCheckpointer  # noqa: E402
from pgp_det.config import resolve_config_path as find_config  # noqa: E402
from pgp_det.data import add_dataset_arguments, register_custom_datasets  # noqa: E402
from pgp_det.engine import Trainer  # noqa: E402
from pgp_det.engine.preflight import build_run_config, check_training_run, existing_run_files  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, add_trust_argument, run_tool  # noqa: E402
from pgp_det.utils.io import atomic_write_json  # noqa: E402
from pgp_det.utils.output_dir import claim_output_dir  # noqa: E402

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_path(args) -> str:
    """``--config NAME`` is looked up in ``configs/``; ``--config-file PATH`` is taken as is."""
    return find_config(args.config, args.config_file, CONFIGS_DIR)


def build_config(args):
    """The frozen config of this run (no side effects beyond reading files)."""
    return build_run_config(args.config, args.config_file, CONFIGS_DIR, args.opts, args.register_voc, args.register_coco)


def main(args):
    cfg = build_config(args)
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers; pgp_det's (pruning steps) too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pgp_det")
    register_custom_datasets(cfg)  # each process has its own DatasetCatalog

    if args.eval_only:
        model = Trainer.build_model(cfg)
        # strict: evaluating a checkpoint that does not cover the model exactly would score random weights
        PrunedCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=True, trusted=args.trust_weights).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg, trusted_weights=args.trust_weights)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if comm.is_main_process():
        # eval-only runs write no metrics.json, so both modes leave their final numbers here
        atomic_write_json(results, os.path.join(cfg.OUTPUT_DIR, "results.json"))
        print(f"results written to {os.path.abspath(cfg.OUTPUT_DIR)} (results.json, log.txt, metrics.json, inference/)")
    if comm.get_world_size() > 1:
        # a process group left to interpreter exit can abort a worker (SIGABRT) after a good run
        comm.synchronize()
        torch.distributed.destroy_process_group()
    return results


def argument_parser():
    parser = OneLineArgumentParser(parents=[default_argument_parser()], add_help=False, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="NAME.yaml", default="", help="config file inside configs/")
    add_dataset_arguments(parser)
    add_trust_argument(parser)
    return parser


def run(args) -> int:
    cfg = build_config(args)
    if args.eval_only and existing_run_files(cfg.OUTPUT_DIR):
        # detectron2 would rewrite the training run's config.yaml (and pgp_det its results.json)
        evaluation_dir = os.path.join(cfg.OUTPUT_DIR, "eval")
        print(f"OUTPUT_DIR '{cfg.OUTPUT_DIR}' holds a training run: this evaluation writes to '{evaluation_dir}' "
              "and leaves the run's files as they are", file=sys.stderr)
        args.opts = list(args.opts) + ["OUTPUT_DIR", evaluation_dir]  # the workers rebuild the config from args
        cfg = build_config(args)
    with claim_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR") as output:
        # every check before anything is written; the folder stays locked for the whole run
        check_training_run(cfg, eval_only=args.eval_only, resume=args.resume, trusted=args.trust_weights)
        output.start_writing()
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    return 0


def cli(argv=None) -> int:
    return run_tool(argument_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(cli())

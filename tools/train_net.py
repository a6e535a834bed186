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

Bad input (a missing config, dataset or weights file, an unknown key) ends with one line on
stderr naming the problem and exit code 2.
"""
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from pgp_det.checkpoint import PrunedCheckpointer  # noqa: E402
from pgp_det.config import check_pruning_config, load_config  # noqa: E402
from pgp_det.data import add_dataset_arguments, check_dataset_available, register_custom_datasets  # noqa: E402
from pgp_det.engine import Trainer  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.utils.io import atomic_write_json  # noqa: E402
from pgp_det.utils.weights import check_weights_available  # noqa: E402

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_path(args) -> str:
    """``--config NAME`` is looked up in ``configs/``; ``--config-file PATH`` is taken as is."""
    if args.config and args.config_file:
        raise UserInputError("give either --config or --config-file, not both")
    if args.config:
        candidates = [args.config, os.path.join(CONFIGS_DIR, args.config)]
        for path in candidates:
            if os.path.isfile(path):
                return path
        raise UserInputError(f"config '{args.config}' not found in {CONFIGS_DIR}: list them with `ls -R configs`")
    if not args.config_file:
        raise UserInputError("no config given: pass --config NAME.yaml (from configs/) or --config-file PATH")
    if not os.path.isfile(args.config_file):
        raise UserInputError(f"config file '{args.config_file}' does not exist")
    return args.config_file


def build_config(args):
    """The frozen config of this run (no side effects beyond reading files)."""
    cfg = load_config(resolve_config_path(args), args.opts, args.register_voc, args.register_coco)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("pgp_det").warning("CUDA is not available: running on CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def preflight(cfg, args) -> None:
    """Checks that turn late tracebacks into one clear line, run before any process starts."""
    check_pruning_config(cfg)
    register_custom_datasets(cfg)
    names = list(cfg.DATASETS.TEST) if args.eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    for name in names:
        check_dataset_available(name)
    if cfg.MODEL.WEIGHTS and not args.resume:
        check_weights_available(cfg.MODEL.WEIGHTS)


def main(args):
    cfg = build_config(args)
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers; pgp_det's (pruning steps) too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pgp_det")
    register_custom_datasets(cfg)  # each process has its own DatasetCatalog

    if args.eval_only:
        model = Trainer.build_model(cfg)
        # strict: evaluating a checkpoint that does not cover the model exactly would score random weights
        PrunedCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if comm.is_main_process():
        # eval-only runs write no metrics.json, so both modes leave their final numbers here
        atomic_write_json(results, os.path.join(cfg.OUTPUT_DIR, "results.json"))
        print(f"results written to {os.path.abspath(cfg.OUTPUT_DIR)} (results.json, log.txt, metrics.json, inference/)")
    return results


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument("--config", metavar="NAME.yaml", default="", help="config file inside configs/")
    add_dataset_arguments(parser)
    return parser


def cli(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        preflight(build_config(args), args)
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""Checks a training or evaluation run makes before it writes anything.

``tools/train_net.py`` claims ``OUTPUT_DIR`` (:func:`pgp_det.utils.output_dir.claim_output_dir`:
a folder in use by another run is refused at once), then calls :func:`check_training_run` in
the launching process, before any worker starts: the folder holds no other run, the pruning
config, the datasets and their class count, the weights (read without running code, and fitted
to the model as the run will load them). Only when all pass is anything written.
"""
import logging
import os
from typing import List

from detectron2.modeling import build_model

import torch

from ..checkpoint import PrunedCheckpointer
from ..config import load_config, resolve_config_path
from ..data import check_dataset_available, check_num_classes, register_custom_datasets, validate_dataset
from ..data.custom import is_custom_dataset
from ..data.domains import check_domain_adaptation_config
from ..errors import UserInputError
from ..pruning.cost import CostModel
from ..pruning.dependency import derive_channel_groups
from ..pruning.groups import removable_channels
from ..pruning.settings import check_pruning_config
from ..pruning.target import build_target, cost_input_size
from ..utils.weights import check_weights_available

__all__ = [
    "build_run_config",
    "RUN_FILES", "check_training_run", "check_weights_fit", "cpu_model", "existing_run_files", "weights_to_load",
]

logger = logging.getLogger(__name__)

# files whose presence means OUTPUT_DIR already holds a training run
RUN_FILES = ("last_checkpoint", "model_final.pth", "metrics.json")


def build_run_config(config: str, config_file: str, configs_dir: str, opts=(), register_voc=(), register_coco=()):
    """The frozen config of a tool's run: ``--config NAME`` (looked up in ``configs_dir``) or
    ``--config-file PATH``, the ``KEY VALUE`` overrides and dataset registrations applied, and
    ``MODEL.DEVICE cuda`` falling back to the CPU (with a warning) where CUDA is not available.

    Raises:
        UserInputError: the config cannot be found or read, or an override is invalid.
    """
    cfg = load_config(resolve_config_path(config, config_file, configs_dir), opts, register_voc, register_coco)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("pgp_det").warning("CUDA is not available: running on CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def existing_run_files(output_dir: str) -> List[str]:
    """The :data:`RUN_FILES` present in ``output_dir``."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]


def weights_to_load(cfg, resume: bool) -> str:
    """The file a run will load, as detectron2's ``resume_or_load`` picks it, checked to exist.

    With ``resume`` and ``OUTPUT_DIR/last_checkpoint`` present: the checkpoint it names.
    Otherwise ``MODEL.WEIGHTS`` (``""``: train from scratch).

    Raises:
        UserInputError: ``last_checkpoint`` is empty or names a missing file; ``MODEL.WEIGHTS``
            is missing or cannot be fetched.
    """
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if resume and os.path.exists(last):
        try:
            with open(last) as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserInputError(f"--resume: cannot read '{last}' ({e}); delete it to start from MODEL.WEIGHTS") from None
        if not name:
            raise UserInputError(
                f"--resume: '{last}' is empty; write the checkpoint's file name into it, or delete it to start from "
                "MODEL.WEIGHTS")
        path = os.path.join(cfg.OUTPUT_DIR, name)
        if not os.path.isfile(path):
            raise UserInputError(
                f"--resume: '{last}' names '{name}', which does not exist in {cfg.OUTPUT_DIR}; restore that file, "
                "or delete last_checkpoint to start from MODEL.WEIGHTS")
        return path
    if cfg.MODEL.WEIGHTS:
        return check_weights_available(cfg.MODEL.WEIGHTS)
    return ""


def cpu_model(cfg):
    """``cfg``'s model built on the CPU at the config's widths (for checks; the run builds its own)."""
    cpu = cfg.clone()
    cpu.defrost()
    cpu.MODEL.DEVICE = "cpu"
    return build_model(cpu)


def check_weights_fit(model, path: str, strict: bool, trusted: bool = False) -> None:
    """Read ``path`` safely and load it into ``model`` (:func:`cpu_model`), as the run will; a
    pruned checkpoint shrinks ``model``.

    Raises:
        UserInputError: the file is not a safe checkpoint, or does not fit the model (see
            :class:`~pgp_det.checkpoint.PrunedCheckpointer`).
    """
    if path:
        PrunedCheckpointer(model, strict=strict, trusted=trusted).load(path)


def _check_model_for_pruning(cfg, model=None) -> None:
    """Refuse a FLOPs or latency target the scopes and floor cannot reach (the hook would, once
    training has started) and, with a latency target, a latency table made for another
    architecture; then warn when nothing would be pruned. ``model``: built from the config, at its
    original widths (default: :func:`cpu_model`)."""
    p = cfg.PRUNING
    model = model if model is not None else cpu_model(cfg)
    groups = derive_channel_groups(model, allow_frozen=p.ALLOW_FROZEN)
    # a target no pruning reaches is refused first (one line), whatever would be warned below
    if any(g.prunable and g.scope in set(p.SCOPES) for g in groups.values()):
        height, width = cost_input_size(cfg)
        build_target(cfg, groups, cost_model=lambda: CostModel(model, height, width))  # the hook logs the warnings
    if removable_channels(groups, p.SCOPES, p.ROUNDING.MIN_CHANNELS) == 0:
        logger.warning(
            "PRUNING.ROUNDING.MIN_CHANNELS %d is at least the width of every prunable channel group in PRUNING.SCOPES %s: "
            "nothing will be pruned; lower PRUNING.ROUNDING.MIN_CHANNELS or widen PRUNING.SCOPES", p.ROUNDING.MIN_CHANNELS, tuple(p.SCOPES))


def check_training_run(cfg, *, eval_only: bool, resume: bool, trusted: bool = False) -> str:
    """Every check of a ``train_net`` run, in the launching process; writes nothing.

    Returns:
        the weights file the run will load (``""``: none).

    Raises:
        UserInputError: the first problem found, in one line naming it and the fix.
    """
    if not eval_only and not resume:
        found = existing_run_files(cfg.OUTPUT_DIR)
        if found:
            raise UserInputError(
                f"OUTPUT_DIR '{cfg.OUTPUT_DIR}' already holds a training run ({', '.join(found)}): pass --resume to "
                "continue it, or choose another OUTPUT_DIR (a new run there would mix its files with the old run's)")
    check_pruning_config(cfg)
    check_domain_adaptation_config(cfg)
    register_custom_datasets(cfg)
    names = list(cfg.DATASETS.TEST) if eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if cfg.DOMAIN_ADAPTATION.ENABLED and not eval_only:
        names += [name for name in cfg.DOMAIN_ADAPTATION.TARGET_DATASETS if name not in names]
    for name in names:
        check_dataset_available(name)
        if is_custom_dataset(name):
            # a user's annotation files are parsed and checked now (again by the workers later), so
            # a bad annotation fails before anything is written rather than once training starts
            validate_dataset(name)
    check_num_classes(cfg, names)
    path = weights_to_load(cfg, resume)
    try:
        model = cpu_model(cfg)  # one model for every check below
    except ValueError as e:  # a model the config cannot build (a domain classifier on a missing feature)
        raise UserInputError(f"cannot build the model: {e}") from None
    if cfg.PRUNING.ENABLED and not eval_only:
        _check_model_for_pruning(cfg, model)  # before loading: a pruned checkpoint shrinks the model
    # evaluation needs the whole detector; training may start from a partial (backbone) checkpoint
    check_weights_fit(model, path, strict=eval_only, trusted=trusted)
    return path

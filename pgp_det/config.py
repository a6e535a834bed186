"""Config keys pgp_det adds to detectron2's ``get_cfg()``, and loading a config file safely.

A leaf: it imports nothing of pgp_det but :mod:`pgp_det.errors`, and importing it registers no
dataset. The ``PRUNING`` keys are validated by :func:`pgp_det.pruning.settings.check_pruning_config`.
"""
import os
import re

import yaml

from detectron2.config import CfgNode as CN

from .errors import UserInputError

__all__ = ["add_pgp_config", "add_dataset_config", "add_domain_adaptation_config", "add_pruning_config", "get_pgp_cfg",
           "load_config",
           "resolve_config_path"]


def add_dataset_config(cfg: CN) -> CN:
    """Add ``DATASETS.CUSTOM_VOC`` and ``DATASETS.CUSTOM_COCO`` (both empty lists) to ``cfg``.

    ``CUSTOM_VOC`` entries are ``[name, dirname, split, classes]`` (classes: a list, a
    comma-separated string or a text file with one name per line); ``CUSTOM_COCO`` entries are
    ``[name, json_file, image_root]``. :func:`pgp_det.data.register_custom_datasets` registers them.
    """
    cfg.DATASETS.CUSTOM_VOC = []
    cfg.DATASETS.CUSTOM_COCO = []
    return cfg


def add_pruning_config(cfg: CN) -> CN:
    """Add the ``PRUNING`` section (pruning while training; read by :class:`pgp_det.engine.PGPHook`).

    Keys (defaults in brackets):
        ENABLED [False]: prune while training.
        TARGET ["ratio"]: ``"ratio"``: prune ``RATIO`` of every pruned group's channels;
            ``"flops"``: every step's allocation meets the schedule's share of a
            ``FLOPS_REDUCTION`` cut of the unpruned model's FLOPs at ``COST_INPUT_SIZE``
            (predicted; within a fraction of a point, never less), reached at the last step;
            ``"latency"``: the same with the latency ``LATENCY_TABLE`` predicts, down to
            ``TARGET_LATENCY_MS`` (or ``1000 / TARGET_FPS``) at the last step.
        RATIO [0.5]: final fraction of channels pruned per group, in [0, 1).
        FLOPS_REDUCTION [0.5]: final fraction of FLOPs removed, in (0, 1), for ``TARGET "flops"``.
        COST_INPUT_SIZE [(800, 1333)]: (height, width) at which FLOPs are counted; with
            ``TARGET "latency"`` it must be the latency table's input size.
        LATENCY_TABLE [""]: for ``TARGET "latency"``: a table made by ``tools/profile_latency.py``
            on the device the model will run on (``pgp_det.latency.LatencyTable``).
        TARGET_LATENCY_MS [0.0], TARGET_FPS [0.0]: for ``TARGET "latency"``, exactly one > 0:
            the final predicted batch-1 latency in ms, or a frame rate (``1000 / TARGET_FPS`` ms).
            The latency is predicted at ``MODEL.RPN.POST_NMS_TOPK_TEST`` proposals, so fewer
            proposals leave more channels.
        LATENCY_DEVICE [""]: ``"cpu"`` or ``"cuda"``: the kind of device the model will run on;
            a table measured on another kind is refused. ``""`` accepts the table's.
        SCOPES: which parts are pruned, among ``backbone``, ``fpn``, ``rpn``, ``roi_heads``.
        SCOPE_RATIOS [()]: per-scope overrides of ``RATIO`` as ``(("roi_heads", 0.3), ...)``.
        CRITERION ["pgp"]: channel score, by name in ``CRITERION_REGISTRY``: ``pgp`` (L1 norm of
            the gradient summed signed since the last step), ``pgp_pass`` (the same over an extra
            pass of ``EXTRA_PASS_BATCHES`` batches), ``rpgp`` (summed gradient L1 norms), ``l1``,
            ``l2``, ``taylor``, ``bn_gamma``, ``frs`` (see ``pgp_det.pruning.criteria``).
        EXTRA_PASS_BATCHES [16]: batches of the extra pass before each step, for the criteria
            that need one (``pgp_pass``, ``frs``).
        SCHEDULE ["pgp_exponential"]: pruned fraction over steps, by name in
            ``SCHEDULE_REGISTRY``: ``pgp_exponential`` (the paper's ``exp(-lambda k)``),
            ``pgp_exponential_shifted`` (the authors' code: ``exp(-lambda (k + 1))``), ``psfp``,
            ``linear``, ``cubic``.
        ALLOCATION ["uniform"]: how the step's budget is shared among groups, by name in
            ``ALLOCATION_REGISTRY``: ``uniform``, ``global`` (one normalised ranking),
            ``knapsack`` (the most value, ``KNAPSACK_VALUE``, within the budget, greedy by value
            per unit of cost: HALP-style with ``TARGET "latency"``), ``adaptive`` (PSAP-style,
            from the live channels' weight sparsity).
        KNAPSACK_VALUE ["taylor"]: what a channel is worth to the ``knapsack`` allocation, on one
            scale for every group (``pgp_det.pruning.loss_change``): ``"taylor"``, the first-order
            training-loss change of removing it (filter, bias and norm zeroed), averaged over the
            iterations since the last step; ``"taylor_squared"``, the mean squared per-iteration
            change (Molchanov et al. 2019, HALP); ``"scores"``, the criterion's scores put on one
            scale by its normalisation (one-shot pruning, which has no gradients, always uses
            these).
        PROTECT_QUANTILE [0.0]: when > 0, channels whose recent gradient (L1 with a half-life of
            a quarter of the pruning interval, an accumulator of its own whatever ``CRITERION``)
            is above this quantile of their group are not pruned at that step (PSAP-style
            protection); 0 disables it.
        UNIT ["iter"]: unit of START, END and INTERVAL: ``"iter"`` or ``"epoch"`` (converted with
            the training set's size and ``SOLVER.IMS_PER_BATCH``).
        START [0], END [-1], INTERVAL [-1]: pruning steps happen at START + k * INTERVAL and at
            END, the last step, where the target is reached exactly. END -1: 3/4 of
            ``SOLVER.MAX_ITER``; INTERVAL -1: (END - START) / 10.
        REMOVE_RATIO [0.5]: share of each step's weak channels removed physically; the rest is
            zeroed and may recover. 1.0: hard pruning only; 0.0: soft only (SFP/PSFP). At the last
            step every weak channel is removed.
        SOFT_MODE ["pgp"]: how the weak channels that are not removed are zeroed (soft pruning;
            see ``pgp_det.pruning.surgery``). ``"pgp"``: zero the filter weights (conv/linear rows
            computing the channel) and their optimizer state (momentum), keep the bias and the
            norm's scale, shift and statistics, so the channel keeps receiving gradient and may
            grow back (the PGP paper's text); ``"sfp"``: the same with the optimizer state kept
            (SFP/PSFP); ``"zero_path"``: zero filter, bias, norm scale, shift and statistics and
            the momentum of all of them, and hold them at zero until the next step removes the
            channel (the PGP authors' public code: behind a zero norm scale or a ReLU the filter
            gets no gradient anyway; the hold also covers norm-free layers, FPN's). A removed
            channel's constant output (its shift after the activation) is folded into its
            consumers (exact for linear and 1x1-conv consumers, see ``pgp_det.pruning.fold``).
        KEEP_ZEROED [False]: hold zeroed channels' filter weights at zero until the next step
            (masked after every iteration, in ``SOFT_MODE``; their bias and norm are kept)
            instead of letting them recover.
        CHANNEL_MULTIPLE [8]: kept channel counts are rounded to this multiple (speed on GPUs).
        MIN_CHANNELS [8]: no group keeps fewer channels.
        ALLOW_FROZEN [False]: also prune groups that touch frozen layers (``FREEZE_AT``).
    """
    cfg.PRUNING = CN()
    cfg.PRUNING.ENABLED = False
    cfg.PRUNING.TARGET = "ratio"
    cfg.PRUNING.RATIO = 0.5
    cfg.PRUNING.FLOPS_REDUCTION = 0.5
    cfg.PRUNING.COST_INPUT_SIZE = (800, 1333)
    cfg.PRUNING.LATENCY_TABLE = ""
    cfg.PRUNING.TARGET_LATENCY_MS = 0.0
    cfg.PRUNING.TARGET_FPS = 0.0
    cfg.PRUNING.LATENCY_DEVICE = ""
    cfg.PRUNING.SCOPES = ("backbone", "fpn", "rpn", "roi_heads")
    cfg.PRUNING.SCOPE_RATIOS = ()
    cfg.PRUNING.CRITERION = "pgp"
    cfg.PRUNING.EXTRA_PASS_BATCHES = 16
    cfg.PRUNING.SCHEDULE = "pgp_exponential"
    cfg.PRUNING.ALLOCATION = "uniform"
    cfg.PRUNING.KNAPSACK_VALUE = "taylor"
    cfg.PRUNING.PROTECT_QUANTILE = 0.0
    cfg.PRUNING.UNIT = "iter"
    cfg.PRUNING.START = 0
    cfg.PRUNING.END = -1
    cfg.PRUNING.INTERVAL = -1
    cfg.PRUNING.REMOVE_RATIO = 0.5
    cfg.PRUNING.SOFT_MODE = "pgp"
    cfg.PRUNING.KEEP_ZEROED = False
    cfg.PRUNING.CHANNEL_MULTIPLE = 8
    cfg.PRUNING.MIN_CHANNELS = 8
    cfg.PRUNING.ALLOW_FROZEN = False
    return cfg


def add_domain_adaptation_config(cfg: CN) -> CN:
    """Add the ``DOMAIN_ADAPTATION`` section (read by :class:`pgp_det.modeling.DomainAdaptiveRCNN`
    and :mod:`pgp_det.data.domains`): training on labelled source images (``DATASETS.TRAIN``) and
    unlabelled target images at once.

    Keys (defaults in brackets):
        ENABLED [False]: adapt; needs ``MODEL.META_ARCHITECTURE "DomainAdaptiveRCNN"``.
        TARGET_DATASETS [()]: the target domain's training datasets; their labels are dropped
            before anything reads them.
        TARGET_IMS_PER_BATCH [0]: target images per batch; 0: ``SOLVER.IMS_PER_BATCH`` (as many
            as source images).
        IMAGE_IN_FEATURES [()]: backbone outputs the image-level classifier reads (``()``: all).
        HIDDEN_DIM [256]: hidden width of both domain classifiers.
        INSTANCE_ROIS_PER_IMAGE [64]: proposals per image the instance-level classifier reads.
        REVERSAL_WEIGHT [1.0]: lambda of the gradient reversal layers.
        IMAGE_WEIGHT [1.0], INSTANCE_WEIGHT [1.0], CONSISTENCY_WEIGHT [1.0]: loss weights.
    """
    cfg.DOMAIN_ADAPTATION = CN()
    cfg.DOMAIN_ADAPTATION.ENABLED = False
    cfg.DOMAIN_ADAPTATION.TARGET_DATASETS = ()
    cfg.DOMAIN_ADAPTATION.TARGET_IMS_PER_BATCH = 0
    cfg.DOMAIN_ADAPTATION.IMAGE_IN_FEATURES = ()
    cfg.DOMAIN_ADAPTATION.HIDDEN_DIM = 256
    cfg.DOMAIN_ADAPTATION.INSTANCE_ROIS_PER_IMAGE = 64
    cfg.DOMAIN_ADAPTATION.REVERSAL_WEIGHT = 1.0
    cfg.DOMAIN_ADAPTATION.IMAGE_WEIGHT = 1.0
    cfg.DOMAIN_ADAPTATION.INSTANCE_WEIGHT = 1.0
    cfg.DOMAIN_ADAPTATION.CONSISTENCY_WEIGHT = 1.0
    return cfg


def add_pgp_config(cfg: CN) -> CN:
    """Add pgp_det's keys to a detectron2 config in place (and return it).

    Keys:
        DATASETS.CUSTOM_VOC / DATASETS.CUSTOM_COCO: user datasets registered by name at start-up
            (see ``datasets/README.md``).
        PRUNING: pruning while training, see :func:`add_pruning_config`.
        DOMAIN_ADAPTATION: training on a labelled and an unlabelled domain, see
            :func:`add_domain_adaptation_config`.
    """
    add_dataset_config(cfg)
    add_pruning_config(cfg)
    add_domain_adaptation_config(cfg)
    return cfg


def get_pgp_cfg() -> CN:
    """detectron2's default config with pgp_det's keys added."""
    from detectron2.config import get_cfg

    return add_pgp_config(get_cfg())


def resolve_config_path(config: str, config_file: str, configs_dir: str) -> str:
    """The config file a tool's ``--config NAME`` (looked up as given, then in ``configs_dir``) or
    ``--config-file PATH`` (taken as is) names; exactly one of the two must be given.

    Raises:
        UserInputError: both or neither given, or the file does not exist.
    """
    if config and config_file:
        raise UserInputError("give either --config or --config-file, not both")
    if config:
        for path in (config, os.path.join(configs_dir, config)):
            if os.path.isfile(path):
                return path
        raise UserInputError(f"config '{config}' not found in {configs_dir}: list them with `ls -R configs`")
    if not config_file:
        raise UserInputError("no config given: pass --config NAME.yaml (from configs/) or --config-file PATH")
    if not os.path.isfile(config_file):
        raise UserInputError(f"config file '{config_file}' does not exist")
    return config_file


def load_config(path: str, opts=(), register_voc=(), register_coco=(), label: str = "") -> CN:
    """pgp_det's config from the file ``path`` with ``KEY VALUE`` overrides ``opts`` and the
    user datasets of ``--register-voc`` / ``--register-coco`` appended; not frozen.

    Raises:
        UserInputError: the file is missing, the file or an override is invalid, or a test-time
            setting is one no detector runs with (an RPN keeping no proposal, no detection kept, a
            negative test size).
    """
    where = f"{label}: " if label else ""
    if not os.path.isfile(path):
        raise UserInputError(f"{where}config file '{path}' does not exist")
    cfg = get_pgp_cfg()
    try:
        # detectron2 falls back to yaml.unsafe_load, which runs code a crafted file names: never
        cfg.merge_from_file(path, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        raise UserInputError(
            f"{where}config {path} was refused: it uses a YAML tag ({_first_line(e.problem)}) that could run code; "
            "configs may hold plain values only") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or _first_line(e)
        raise UserInputError(f"{where}config {path} is not valid YAML: {problem}{at}; fix the file") from None
    except (KeyError, ValueError, AssertionError, TypeError, OSError) as e:
        raise UserInputError(f"{where}bad config {path}: {_first_line(e)}{_number_hint(e)}") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise UserInputError(f"{where}bad override in {list(opts)}: {_first_line(e)}{_number_hint(e)}") from None
    _check_test_time_settings(cfg, where)
    cfg.DATASETS.CUSTOM_VOC.extend([list(entry) for entry in register_voc or ()])
    cfg.DATASETS.CUSTOM_COCO.extend([list(entry) for entry in register_coco or ()])
    return cfg


def _check_test_time_settings(cfg: CN, where: str) -> None:
    """Refuse test-time settings no detector runs with: an RPN that keeps no box before or after
    its NMS (nothing would be detected, and a latency per proposal count has no count), no
    detection kept per image, and a negative test size (``INPUT.MIN_SIZE_TEST`` 0 is detectron2's
    "images at their own size")."""
    for key in ("PRE_NMS_TOPK_TEST", "POST_NMS_TOPK_TEST"):
        value = cfg.MODEL.RPN.get(key)
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"{where}MODEL.RPN.{key} {value!r} keeps no proposal, so nothing would be detected: "
                                 f"use a whole number >= 1")
    kept = cfg.TEST.DETECTIONS_PER_IMAGE
    if kept == 0:  # detectron2 keeps every detection below 0
        raise UserInputError(f"{where}TEST.DETECTIONS_PER_IMAGE 0 keeps no detection: use a whole number >= 1, or -1 to "
                             f"keep them all")
    size = cfg.INPUT.MIN_SIZE_TEST
    if not isinstance(size, int) or size < 0:
        raise UserInputError(f"{where}INPUT.MIN_SIZE_TEST {size!r} is not a size: use the shorter side in pixels, or 0 "
                             f"to test images at their own size")


def _number_hint(error) -> str:
    """The fix for a whole number given to a key that holds a float (yacs does not convert it)."""
    found = re.search(r"\(<class 'float'> vs\. <class 'int'>\) with values \(\S+ vs\. (-?\d+)\) for config key: (\S+)",
                      str(error))
    return f"; {found.group(2)} holds a float: write {found.group(1)}.0" if found else ""


def _first_line(error) -> str:
    lines = str(error).strip().splitlines()
    return " ".join(lines[:1]) or type(error).__name__

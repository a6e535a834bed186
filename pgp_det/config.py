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
           "load_config", "RENAMED_PRUNING_KEYS", "resolve_config_path"]


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
        SCOPES [all]: which parts are pruned, among ``backbone``, ``fpn``, ``rpn``, ``roi_heads``.
        ALLOW_FROZEN [False]: also prune groups that touch frozen layers (``FREEZE_AT``).
        TARGET: what the last step reaches (:mod:`pgp_det.pruning.target`).
            KIND ["channels"]: ``"channels"`` (``TARGET.CHANNELS``), ``"flops"``
                (``TARGET.FLOPS``) or ``"latency"`` (``TARGET.LATENCY``). Every step's allocation
                meets the schedule's share of the target, predicted (within a fraction of a point,
                never less), and the last step reaches the target itself.
            CHANNELS.RATIO [0.5]: final fraction of channels pruned per group, in [0, 1).
            CHANNELS.SCOPE_RATIOS [()]: per-scope overrides of ``RATIO`` as
                ``(("roi_heads", 0.3), ...)``.
            FLOPS.REDUCTION [0.5]: final fraction of FLOPs removed, in (0, 1).
            FLOPS.INPUT_SIZE [(800, 1333)]: (height, width) at which FLOPs are counted (the FLOPs
                target, and the FLOPs every kind reports; a latency target counts them at its
                table's input size).
            LATENCY.TABLE [""]: a table made by ``tools/profile_latency.py`` on the device the
                model will run on; its input size is the one the target is met at.
            LATENCY.MS [0.0], LATENCY.FPS [0.0]: exactly one > 0: the final predicted batch-1
                latency in ms, or a frame rate (``1000 / FPS`` ms). The latency is predicted at
                ``MODEL.RPN.POST_NMS_TOPK_TEST`` proposals, so fewer proposals leave more channels.
            LATENCY.DEVICE [""]: ``"cpu"`` or ``"cuda"``: the kind of device the model will run
                on; a table measured on another kind is refused. ``""`` accepts the table's.
        CRITERION: how channels are scored.
            NAME ["pgp"]: by name in ``CRITERION_REGISTRY``: ``pgp`` (L1 norm of the gradient
                summed signed since the last step), ``pgp_pass`` (the same over an extra pass),
                ``rpgp`` (summed gradient L1 norms), ``l1``, ``l2``, ``taylor``, ``bn_gamma``,
                ``frs`` (see ``pgp_det.pruning.criteria``).
            EXTRA_PASS_BATCHES [16]: batches of the extra pass before each step, for the
                criteria that need one (``pgp_pass``, ``frs``).
        SCHEDULE: when steps happen and how much each prunes.
            NAME ["pgp_exponential"]: pruned fraction over steps, by name in
                ``SCHEDULE_REGISTRY``: ``pgp_exponential`` (the paper's ``exp(-lambda k)``),
                ``pgp_exponential_shifted`` (the authors' code: ``exp(-lambda (k + 1))``),
                ``psfp``, ``linear``, ``cubic``.
            UNIT ["iter"]: unit of START, END and INTERVAL: ``"iter"`` or ``"epoch"`` (converted
                with the training set's size and ``SOLVER.IMS_PER_BATCH``).
            START [0], END [-1], INTERVAL [-1]: steps happen at START + k * INTERVAL and at END,
                the last step, where the target is reached exactly. END -1: 3/4 of
                ``SOLVER.MAX_ITER``; INTERVAL -1: (END - START) / 10.
        ALLOCATION: how a step's budget is shared among groups.
            NAME ["uniform"]: by name in ``ALLOCATION_REGISTRY``: ``uniform``, ``global`` (one
                normalised ranking), ``knapsack`` (the most value, ``KNAPSACK_VALUE``, within the
                budget, greedy by value per unit of cost: HALP-style with a latency target),
                ``adaptive`` (PSAP-style, from the live channels' weight sparsity).
            KNAPSACK_VALUE ["taylor"]: what a channel is worth to ``knapsack``, on one scale for
                every group (``pgp_det.pruning.loss_change``): ``"taylor"``, the first-order
                training-loss change of removing it (filter, bias and norm zeroed), averaged over
                the iterations since the last step; ``"taylor_squared"``, the mean squared
                per-iteration change (Molchanov et al. 2019, HALP); ``"scores"``, the criterion's
                scores put on one scale by its normalisation (one-shot pruning, which has no
                gradients, always uses these).
            KNAPSACK_OBJECTIVE ["sum"]: how a group's kept values add up: ``"sum"`` (removing
                channels loses their values) or ``"log_share"`` (``V log(V / kept)``: the same for
                small cuts, without bound as a group loses most of its value; see
                ``pgp_det.pruning.knapsack``).
            PROTECT_QUANTILE [0.0]: when > 0, channels whose recent gradient (L1 with a
                half-life of a quarter of the pruning interval) is above this quantile of their
                group are not pruned at that step (PSAP-style protection); 0 disables it.
        SOFT: what happens to a step's weak channels that are not removed.
            REMOVE_RATIO [0.5]: share of each step's weak channels removed physically; the rest
                is zeroed and may recover. 1.0: hard pruning only; 0.0: soft only (SFP/PSFP).
                At the last step every weak channel is removed.
            MODE ["pgp"]: how they are zeroed (see ``pgp_det.pruning.surgery``). ``"pgp"``: zero
                the filter weights and their optimizer state (momentum), keep the bias and the
                norm's scale, shift and statistics, so the channel keeps receiving gradient and
                may grow back (the PGP paper's text); ``"sfp"``: the same with the optimizer
                state kept (SFP/PSFP); ``"zero_path"``: zero filter, bias, norm scale, shift and
                statistics and the momentum of all of them, and hold them at zero until the next
                step removes the channel (the PGP authors' public code). A removed channel's
                constant output is folded into its consumers (``pgp_det.pruning.fold``).
            KEEP_ZEROED [False]: hold zeroed channels' filter weights at zero until the next
                step instead of letting them recover.
        ROUNDING: which kept channel counts are allowed.
            MULTIPLE [8]: kept channel counts are rounded to this multiple (speed on GPUs).
            MIN_CHANNELS [8]: no group keeps fewer channels.

    A config that still uses a key of the earlier flat vocabulary (``PRUNING.RATIO``, ...) is
    refused at load time with the new key's name (:data:`RENAMED_PRUNING_KEYS`).
    """
    cfg.PRUNING = CN()
    p = cfg.PRUNING
    p.ENABLED = False
    p.SCOPES = ("backbone", "fpn", "rpn", "roi_heads")
    p.ALLOW_FROZEN = False
    p.TARGET = CN()
    p.TARGET.KIND = "channels"
    p.TARGET.CHANNELS = CN()
    p.TARGET.CHANNELS.RATIO = 0.5
    p.TARGET.CHANNELS.SCOPE_RATIOS = ()
    p.TARGET.FLOPS = CN()
    p.TARGET.FLOPS.REDUCTION = 0.5
    p.TARGET.FLOPS.INPUT_SIZE = (800, 1333)
    p.TARGET.LATENCY = CN()
    p.TARGET.LATENCY.TABLE = ""
    p.TARGET.LATENCY.MS = 0.0
    p.TARGET.LATENCY.FPS = 0.0
    p.TARGET.LATENCY.DEVICE = ""
    p.CRITERION = CN()
    p.CRITERION.NAME = "pgp"
    p.CRITERION.EXTRA_PASS_BATCHES = 16
    p.SCHEDULE = CN()
    p.SCHEDULE.NAME = "pgp_exponential"
    p.SCHEDULE.UNIT = "iter"
    p.SCHEDULE.START = 0
    p.SCHEDULE.END = -1
    p.SCHEDULE.INTERVAL = -1
    p.ALLOCATION = CN()
    p.ALLOCATION.NAME = "uniform"
    p.ALLOCATION.KNAPSACK_VALUE = "taylor"
    p.ALLOCATION.KNAPSACK_OBJECTIVE = "sum"
    p.ALLOCATION.PROTECT_QUANTILE = 0.0
    p.SOFT = CN()
    p.SOFT.REMOVE_RATIO = 0.5
    p.SOFT.MODE = "pgp"
    p.SOFT.KEEP_ZEROED = False
    p.ROUNDING = CN()
    p.ROUNDING.MULTIPLE = 8
    p.ROUNDING.MIN_CHANNELS = 8
    return cfg


# the flat PRUNING keys of earlier versions and the keys that replaced them
RENAMED_PRUNING_KEYS = {
    "PRUNING." + old: "PRUNING." + new for old, new in (
        ("TARGET", "TARGET.KIND"),
        ("RATIO", "TARGET.CHANNELS.RATIO"),
        ("SCOPE_RATIOS", "TARGET.CHANNELS.SCOPE_RATIOS"),
        ("FLOPS_REDUCTION", "TARGET.FLOPS.REDUCTION"),
        ("COST_INPUT_SIZE", "TARGET.FLOPS.INPUT_SIZE"),
        ("LATENCY_TABLE", "TARGET.LATENCY.TABLE"),
        ("TARGET_LATENCY_MS", "TARGET.LATENCY.MS"),
        ("TARGET_FPS", "TARGET.LATENCY.FPS"),
        ("LATENCY_DEVICE", "TARGET.LATENCY.DEVICE"),
        ("CRITERION", "CRITERION.NAME"),
        ("EXTRA_PASS_BATCHES", "CRITERION.EXTRA_PASS_BATCHES"),
        ("SCHEDULE", "SCHEDULE.NAME"),
        ("UNIT", "SCHEDULE.UNIT"),
        ("START", "SCHEDULE.START"),
        ("END", "SCHEDULE.END"),
        ("INTERVAL", "SCHEDULE.INTERVAL"),
        ("ALLOCATION", "ALLOCATION.NAME"),
        ("KNAPSACK_VALUE", "ALLOCATION.KNAPSACK_VALUE"),
        ("PROTECT_QUANTILE", "ALLOCATION.PROTECT_QUANTILE"),
        ("REMOVE_RATIO", "SOFT.REMOVE_RATIO"),
        ("SOFT_MODE", "SOFT.MODE"),
        ("KEEP_ZEROED", "SOFT.KEEP_ZEROED"),
        ("CHANNEL_MULTIPLE", "ROUNDING.MULTIPLE"),
        ("MIN_CHANNELS", "ROUNDING.MIN_CHANNELS"),
    )
}


def _renamed_key_hint(error) -> str:
    """The one-line fix for an error yacs raised on a key of the earlier flat ``PRUNING``
    vocabulary (an unknown key, or a value where a group of keys now is), else ""."""
    found = re.search(r"(?:config key|key): (PRUNING\.[A-Z_]+)(?![A-Z_.])", str(error))
    if not found or found.group(1) not in RENAMED_PRUNING_KEYS:
        return ""
    old, new = found.group(1), RENAMED_PRUNING_KEYS[found.group(1)]
    extra = " (its value 'ratio' is now 'channels')" if old == "PRUNING.TARGET" else ""
    return f"{old} was renamed {new}{extra}: use the new key (see pgp_det.config.add_pruning_config)"


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
        REVERSAL_RAMP [0.0]: 0: lambda is REVERSAL_WEIGHT throughout; g > 0: it rises from 0 to
            REVERSAL_WEIGHT as ``REVERSAL_WEIGHT * (2 / (1 + exp(-g * p)) - 1)`` with ``p`` the share
            of ``SOLVER.MAX_ITER`` done (Ganin and Lempitsky's schedule, g = 10), so that features
            form before they are pushed to be domain-invariant.
        IMAGE_WEIGHT [1.0], INSTANCE_WEIGHT [1.0], CONSISTENCY_WEIGHT [1.0]: loss weights.
        CONSISTENCY_GRADIENT ["reversed"]: what the consistency term gives the features: its
            gradient times -lambda (``"reversed"``, as the two classifiers' losses) or times +lambda
            (``"scaled"``: the features are pulled towards image- and instance-level predictions that
            agree, as the public PyTorch port of DA Faster R-CNN does); the classifiers descend it
            either way.
    """
    cfg.DOMAIN_ADAPTATION = CN()
    cfg.DOMAIN_ADAPTATION.ENABLED = False
    cfg.DOMAIN_ADAPTATION.TARGET_DATASETS = ()
    cfg.DOMAIN_ADAPTATION.TARGET_IMS_PER_BATCH = 0
    cfg.DOMAIN_ADAPTATION.IMAGE_IN_FEATURES = ()
    cfg.DOMAIN_ADAPTATION.HIDDEN_DIM = 256
    cfg.DOMAIN_ADAPTATION.INSTANCE_ROIS_PER_IMAGE = 64
    cfg.DOMAIN_ADAPTATION.REVERSAL_WEIGHT = 1.0
    cfg.DOMAIN_ADAPTATION.REVERSAL_RAMP = 0.0
    cfg.DOMAIN_ADAPTATION.IMAGE_WEIGHT = 1.0
    cfg.DOMAIN_ADAPTATION.INSTANCE_WEIGHT = 1.0
    cfg.DOMAIN_ADAPTATION.CONSISTENCY_WEIGHT = 1.0
    cfg.DOMAIN_ADAPTATION.CONSISTENCY_GRADIENT = "reversed"
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
        renamed = _renamed_key_hint(e)
        if renamed:
            raise UserInputError(f"{where}config {path}: {renamed}") from None
        raise UserInputError(f"{where}bad config {path}: {_first_line(e)}{_number_hint(e)}") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        renamed = _renamed_key_hint(e)
        if renamed:
            raise UserInputError(f"{where}override {renamed}") from None
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

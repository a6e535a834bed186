"""Training batches for domain adaptation: labelled source images and unlabelled target images.

Each batch is detectron2's usual list of input dicts: ``SOLVER.IMS_PER_BATCH`` source images
(``DATASETS.TRAIN``, mapped as any training set, ``"domain"`` 0) followed by
``DOMAIN_ADAPTATION.TARGET_IMS_PER_BATCH`` target images (``DOMAIN_ADAPTATION.TARGET_DATASETS``,
``"domain"`` 1). The target datasets' labels are dropped from their dataset dicts before the
mapper sees them: the mapper never builds ``instances`` for a target image, whatever its files
hold.
"""
from typing import Dict, Iterator, List

from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.data.samplers import TrainingSampler

from ..errors import UserInputError

__all__ = ["CONSISTENCY_GRADIENTS", "SOURCE", "TARGET", "build_domain_adaptive_train_loader",
           "check_domain_adaptation_config", "unlabelled_dicts"]

SOURCE, TARGET = 0, 1  # the "domain" key of an input dict
# what the features get from the consistency term (DOMAIN_ADAPTATION.CONSISTENCY_GRADIENT)
CONSISTENCY_GRADIENTS = ("reversed", "scaled")

_LABEL_KEYS = ("annotations", "sem_seg_file_name", "pan_seg_file_name", "segments_info")


def unlabelled_dicts(names) -> List[Dict]:
    """The dataset dicts of ``names``, each without its labels (annotations, segmentation files).

    Raises:
        UserInputError: a dataset holds no image.
    """
    dicts = []
    for name in names:
        images = [{k: v for k, v in d.items() if k not in _LABEL_KEYS} for d in DatasetCatalog.get(name)]
        if not images:
            raise UserInputError(f"DOMAIN_ADAPTATION.TARGET_DATASETS: dataset '{name}' holds no image; "
                                 "point it at the target domain's training images")
        dicts += images
    return dicts


def check_domain_adaptation_config(cfg) -> None:
    """One line naming the problem: adaptation without target datasets, or with a
    meta-architecture other than ``DomainAdaptiveRCNN`` (or the reverse).

    Raises:
        UserInputError
    """
    da = cfg.DOMAIN_ADAPTATION
    arch = cfg.MODEL.META_ARCHITECTURE
    if not da.ENABLED:
        if arch == "DomainAdaptiveRCNN":
            raise UserInputError("MODEL.META_ARCHITECTURE DomainAdaptiveRCNN needs DOMAIN_ADAPTATION.ENABLED True and "
                                 "DOMAIN_ADAPTATION.TARGET_DATASETS; or use GeneralizedRCNN")
        return
    if arch != "DomainAdaptiveRCNN":
        raise UserInputError(f"DOMAIN_ADAPTATION.ENABLED needs MODEL.META_ARCHITECTURE DomainAdaptiveRCNN, not {arch} "
                             "(it wraps GeneralizedRCNN with the domain classifiers)")
    if not da.TARGET_DATASETS:
        raise UserInputError("DOMAIN_ADAPTATION.TARGET_DATASETS is empty: name the target domain's training "
                             "datasets (their labels are not used)")
    if da.TARGET_IMS_PER_BATCH < 0:
        raise UserInputError(f"DOMAIN_ADAPTATION.TARGET_IMS_PER_BATCH {da.TARGET_IMS_PER_BATCH}: use a number of "
                             "images >= 1, or 0 for as many as SOLVER.IMS_PER_BATCH")
    for key in ("REVERSAL_WEIGHT", "IMAGE_WEIGHT", "INSTANCE_WEIGHT", "CONSISTENCY_WEIGHT"):
        if not da.get(key) >= 0:
            raise UserInputError(f"DOMAIN_ADAPTATION.{key} {da.get(key)}: use a weight >= 0")
    if da.CONSISTENCY_GRADIENT not in CONSISTENCY_GRADIENTS:
        raise UserInputError(f"DOMAIN_ADAPTATION.CONSISTENCY_GRADIENT {da.CONSISTENCY_GRADIENT!r}: use \"reversed\" (the "
                             "features get the consistency gradient reversed) or \"scaled\" (they descend it)")
    if not da.REVERSAL_RAMP >= 0:
        raise UserInputError(f"DOMAIN_ADAPTATION.REVERSAL_RAMP {da.REVERSAL_RAMP}: use 0 (a constant weight) or a "
                             "steepness > 0 (10 in Ganin and Lempitsky's schedule)")
    if da.HIDDEN_DIM < 1 or da.INSTANCE_ROIS_PER_IMAGE < 1:
        raise UserInputError("DOMAIN_ADAPTATION.HIDDEN_DIM and INSTANCE_ROIS_PER_IMAGE must be >= 1")


class _Paired:
    """Iterates over ``source + target`` batches, each dict tagged with its domain."""

    def __init__(self, source, target):
        self.source, self.target = source, target

    def __iter__(self) -> Iterator[List[Dict]]:
        for source, target in zip(self.source, self.target):
            yield [dict(d, domain=SOURCE) for d in source] + [dict(d, domain=TARGET) for d in target]


def build_domain_adaptive_train_loader(cfg):
    """The training loader of an adapting run (see the module docstring)."""
    source = build_detection_train_loader(cfg)
    target_dicts = unlabelled_dicts(cfg.DOMAIN_ADAPTATION.TARGET_DATASETS)
    target = build_detection_train_loader(
        dataset=target_dicts, mapper=DatasetMapper(cfg, is_train=True),
        sampler=TrainingSampler(len(target_dicts), seed=None if cfg.SEED < 0 else cfg.SEED + 1),
        total_batch_size=cfg.DOMAIN_ADAPTATION.TARGET_IMS_PER_BATCH or cfg.SOLVER.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    return _Paired(source, target)

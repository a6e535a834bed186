"""Datasets: the synthetic shapes set, the domain-adaptation benchmarks, user datasets in
VOC/COCO layout, availability checks.

Importing this package registers the synthetic datasets (``synth_voc_*``, ``synth_coco_*``,
``synth_fog_voc_*``; their files are generated on first use) and the adaptation benchmarks
(``cityscapes_8cls_*``, ``foggy_cityscapes_8cls_*``, ``sim10k_car_train``, ``cityscapes_car_*``;
their files are placed under the datasets root by hand, see ``datasets/README.md``).
"""
from .adaptation import ADAPTATION_DATASETS, CITYSCAPES_CLASSES, register_adaptation_datasets
from .builtin import SYNTHETIC_DATASETS, check_dataset_available, check_num_classes, datasets_root, register_synthetic_datasets
from .custom import (
    DatasetFormatError,
    DatasetNotFoundError,
    add_dataset_arguments,
    load_voc_layout,
    parse_class_names,
    register_coco_layout,
    register_custom_datasets,
    register_voc_layout,
    set_voc_metadata,
    validate_dataset,
)
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from .synthetic import generate_synthetic_dataset

register_synthetic_datasets()
register_adaptation_datasets()

__all__ = [
    "ADAPTATION_DATASETS",
    "CITYSCAPES_CLASSES",
    "SYNTHETIC_CLASS_NAMES",
    "SYNTHETIC_DATASETS",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "add_dataset_arguments",
    "check_dataset_available",
    "check_num_classes",
    "datasets_root",
    "generate_synthetic_dataset",
    "load_voc_layout",
    "parse_class_names",
    "register_adaptation_datasets",
    "register_coco_layout",
    "register_custom_datasets",
    "register_synthetic_datasets",
    "register_voc_layout",
    "set_voc_metadata",
    "validate_dataset",
]

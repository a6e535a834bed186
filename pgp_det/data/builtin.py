"""Fixed registrations of the synthetic set, and the pre-training check that a dataset is usable.

Names registered by :func:`register_synthetic_datasets` (the same images and objects twice):

- ``synth_voc_train``, ``synth_voc_test``: VOC layout, evaluated with PASCAL VOC AP.
- ``synth_coco_train``, ``synth_coco_test``: COCO layout, evaluated with COCO AP.
- ``synth_fog_voc_train``, ``synth_fog_voc_test``: the fog domain (another camera: haze, colour
  cast, blur, noise, other backgrounds; same classes), VOC layout, in ``<root>_fog`` with seed
  ``seed + 1``: the target domain of domain adaptation (its train split is read without labels
  there, see :mod:`pgp_det.data.domains`).
- ``synth_voc_test_large``: 1200 test images of the same generator and seed (VOC layout, in
  ``<root>_test_large``; the images that are left empty differ from ``synth_voc_test``'s, so its
  first 150 are not that split). Eight times the images: the part of two models' AP50
  difference that comes from which test images were drawn shrinks by about sqrt(8); compare
  methods seed by seed here (docs/experiments/2026-12-07-pgp-seeds.md).
- ``synth_fog_voc_test_large``: the same for the fog domain: 1200 test images of its generator
  and seed, in ``<root>_fog_test_large``.

The set lives in ``<datasets root>/synthetic`` (datasets root: ``$DETECTRON2_DATASETS``, else
``datasets`` relative to the working directory, as for detectron2's builtin datasets). Registering
is cheap; the files are generated when a dataset is first loaded or checked with
:func:`check_dataset_available`, which ``tools/train_net.py`` calls before anything else.
"""
import os
from typing import Dict, NamedTuple, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets import load_coco_json

from .custom import (
    DatasetFormatError,
    DatasetNotFoundError,
    check_custom_dataset_files,
    is_custom_dataset,
    load_voc_layout,
    set_voc_metadata,
)
from .synthetic import CLASS_NAMES, generate_synthetic_dataset

__all__ = [
    "SYNTHETIC_DATASETS", "datasets_root", "register_synthetic_datasets", "check_dataset_available", "check_num_classes",
]

# images of the large test splits (synth_voc_test_large, synth_fog_voc_test_large)
LARGE_TEST_IMAGES = 1200

# dataset name -> (layout, split, the set it is a split of: "source", "fog", "large" or "fog_large")
SYNTHETIC_DATASETS = {
    "synth_voc_train": ("voc", "train", "source"),
    "synth_voc_test": ("voc", "test", "source"),
    "synth_coco_train": ("coco", "train", "source"),
    "synth_coco_test": ("coco", "test", "source"),
    "synth_fog_voc_train": ("voc", "train", "fog"),
    "synth_fog_voc_test": ("voc", "test", "fog"),
    "synth_voc_test_large": ("voc", "test", "large"),
    "synth_fog_voc_test_large": ("voc", "test", "fog_large"),
}


class _SyntheticSource(NamedTuple):
    """Where a synthetic dataset lives and the generator arguments that make it."""

    root: str
    seed: int
    num_train: int
    num_test: int
    domain: str = "source"

    def ensure_generated(self) -> None:
        generate_synthetic_dataset(self.root, self.seed, self.num_train, self.num_test, self.domain)


# dataset name -> the synthetic set it reads
_SYNTHETIC_SOURCES: Dict[str, _SyntheticSource] = {}

_README_HINT = "see datasets/README.md"


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` or ``datasets``: where detectron2's builtin datasets are looked for."""
    return os.getenv("DETECTRON2_DATASETS", "datasets")


class _SyntheticCocoMetadata(Metadata):
    """Metadata whose ``json_file`` exists once read.

    COCOEvaluator opens ``json_file`` when it is constructed, possibly before the dataset was ever
    loaded; generating the set on that access keeps importing and registering cheap.
    """

    @property
    def json_file(self) -> str:
        source = _SYNTHETIC_SOURCES[self.name]
        source.ensure_generated()
        return os.path.join(source.root, "annotations", f"instances_{self.split}.json")


def register_synthetic_datasets(
    root: Optional[str] = None, seed: int = 0, num_train: int = 600, num_test: int = 150
) -> None:
    """Register the synthetic datasets (see the module docstring).

    Args:
        root: the synthetic set's directory; default ``<datasets root>/synthetic`` (the fog
            domain's: ``<root>_fog``; the large test splits': ``<root>_test_large`` and
            ``<root>_fog_test_large``).
        seed, num_train, num_test: passed to :func:`generate_synthetic_dataset`.

    Calling again with the same arguments does nothing; other arguments replace the registrations.
    """
    root = root if root is not None else os.path.join(datasets_root(), "synthetic")
    base = root.rstrip("/\\")
    sources = {"source": _SyntheticSource(root, seed, num_train, num_test),
               "fog": _SyntheticSource(base + "_fog", seed + 1, num_train, num_test, "fog"),
               "large": _SyntheticSource(base + "_test_large", seed, 0, LARGE_TEST_IMAGES),
               "fog_large": _SyntheticSource(base + "_fog_test_large", seed + 1, 0, LARGE_TEST_IMAGES, "fog")}
    for name, (layout, split, set_name) in SYNTHETIC_DATASETS.items():
        source = sources[set_name]
        if _SYNTHETIC_SOURCES.get(name) == source and name in DatasetCatalog.list():
            continue
        unregister(name)
        _SYNTHETIC_SOURCES[name] = source
        if layout == "voc":
            DatasetCatalog.register(name, lambda source=source, split=split: _load_synthetic_voc(source, split))
            set_voc_metadata(name, source.root, split, CLASS_NAMES)
        else:
            DatasetCatalog.register(
                name, lambda source=source, split=split, name=name: _load_synthetic_coco(source, split, name))
            metadata = MetadataCatalog[name] = _SyntheticCocoMetadata(name=name)
            metadata.set(
                evaluator_type="coco", split=split,
                image_root=os.path.join(source.root, "JPEGImages"), thing_classes=list(CLASS_NAMES),
                # the generator numbers categories 1..6 in CLASS_NAMES order
                thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(CLASS_NAMES))},
            )


def unregister(name: str) -> None:
    """Remove ``name``'s loader and metadata, so that it can be registered again with others
    (detectron2's metadata refuses new values for keys it already holds)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _load_synthetic_voc(source: _SyntheticSource, split: str):
    source.ensure_generated()
    return load_voc_layout(source.root, split, CLASS_NAMES)


def _load_synthetic_coco(source: _SyntheticSource, split: str, name: str):
    source.ensure_generated()
    json_file = os.path.join(source.root, "annotations", f"instances_{split}.json")
    return load_coco_json(json_file, os.path.join(source.root, "JPEGImages"), name)


def check_dataset_available(name: str) -> None:
    """Make sure dataset ``name`` can be loaded, so a missing dataset fails now in one line.

    Synthetic datasets are generated if needed; custom ones must have their files in place;
    detectron2's builtin ones (``voc_*``, ``coco_*``, ...) and the adaptation benchmarks
    (:mod:`pgp_det.data.adaptation`) must be present under the datasets root, at the paths their
    registration records. A registration's metadata key ``files_description`` says what to
    place there ("Foggy Cityscapes in VOC layout").

    Raises:
        DatasetNotFoundError: the name is not registered, or its files are missing.
    """
    if name in _SYNTHETIC_SOURCES:
        _SYNTHETIC_SOURCES[name].ensure_generated()
        return
    if is_custom_dataset(name):
        check_custom_dataset_files(name)
        return
    if name not in DatasetCatalog.list():
        raise DatasetNotFoundError(
            f"dataset '{name}' is not registered: register a dataset of your own with "
            "--register-voc NAME DIR SPLIT CLASSES or --register-coco NAME JSON IMAGE_DIR "
            f"(config keys DATASETS.CUSTOM_VOC / DATASETS.CUSTOM_COCO; {_README_HINT})")

    metadata = MetadataCatalog.get(name)
    dirname, split = metadata.get("dirname"), metadata.get("split")
    json_file, image_root = metadata.get("json_file"), metadata.get("image_root")
    if dirname is not None and split is not None:  # VOC layout
        expected = [os.path.join(dirname, "ImageSets", "Main", split + ".txt"),
                    os.path.join(dirname, "Annotations"), os.path.join(dirname, "JPEGImages")]
        year = metadata.get("year")
        what = f"PASCAL VOC {year}" if name.startswith("voc_") and year else "the dataset"
        place = f"place {metadata.get('files_description', what)} under {dirname}"
    elif json_file is not None and image_root is not None:  # COCO layout
        expected = [json_file, image_root]
        what = "COCO" if name.startswith("coco_") else "the dataset"
        place = f"place {what} under {os.path.dirname(os.path.normpath(image_root))}"
    else:
        return  # registered with files this check does not know about
    for path in expected:
        if not os.path.exists(path):
            raise DatasetNotFoundError(
                f"dataset '{name}' not found: expected {path} ({place} or set DETECTRON2_DATASETS; {_README_HINT})")


def check_num_classes(cfg, dataset_names) -> None:
    """Raise unless every dataset in ``dataset_names`` has ``MODEL.ROI_HEADS.NUM_CLASSES`` classes.

    A detector trained or evaluated on a dataset with another class count either crashes deep in
    training or scores the wrong classes; this says so before anything runs. Datasets whose
    metadata lists no ``thing_classes`` are not checked.

    Raises:
        DatasetFormatError: the first dataset whose class count differs.
    """
    expected = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != expected:
            shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
            raise DatasetFormatError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {expected} but dataset '{name}' has {len(classes)} classes "
                f"({shown}): set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}, or use a dataset with {expected} classes"
            )

"""Fixed registrations of the domain-adaptation benchmarks, each converted to PASCAL VOC layout.

Two benchmarks of the domain-adaptive detection literature, with the layout its PyTorch code
bases use: every set converted to PASCAL VOC folders (``Annotations/<id>.xml``,
``ImageSets/Main/<split>.txt``, ``JPEGImages/<id>.jpg`` or ``.png``) under the datasets root
(``$DETECTRON2_DATASETS``, else ``datasets``; see ``datasets/README.md`` for the trees):

- Cityscapes -> Foggy Cityscapes, 8 classes (:data:`CITYSCAPES_CLASSES`), from
  ``<root>/cityscapes_voc`` and ``<root>/foggy_cityscapes_voc``: ``cityscapes_8cls_train``,
  ``cityscapes_8cls_val``, ``foggy_cityscapes_8cls_train``, ``foggy_cityscapes_8cls_val``. An
  object of another class is an error (the conversion keeps these 8 classes only).
- Sim10k -> Cityscapes, car only: ``sim10k_car_train`` (``<root>/sim10k_voc``, split
  ``trainval``: all 10,000 images) and ``cityscapes_car_train``, ``cityscapes_car_val`` (the
  same Cityscapes conversion). Objects of other classes (Sim10k's ``motorbike`` and ``person``,
  Cityscapes' 7 other classes) are skipped, as the benchmark ignores them.

Registering reads no file. :func:`pgp_det.data.check_dataset_available` (run by
``tools/train_net.py`` before anything else) checks the folders and split file, and stops with
one line naming the first missing path; the loader checks every annotation as it reads it.
Evaluation is PASCAL VOC box AP (:func:`pgp_det.data.set_voc_metadata`), as for any VOC set.
"""
import os
from typing import Dict, NamedTuple, Optional, Tuple

from detectron2.data import DatasetCatalog

from .builtin import datasets_root, unregister
from .custom import load_voc_layout, set_voc_metadata

__all__ = ["ADAPTATION_DATASETS", "CITYSCAPES_CLASSES", "AdaptationDataset", "register_adaptation_datasets"]

# The 8 Cityscapes classes with instance labels, in the order of the class ids.
CITYSCAPES_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


class AdaptationDataset(NamedTuple):
    """Where one benchmark dataset lives under the datasets root, and what its loader keeps."""

    folder: str  # VOC-layout folder, relative to the datasets root
    split: str  # ImageSets/Main/<split>.txt
    class_names: Tuple[str, ...]
    other_classes: str  # objects of other classes: "error" or "ignore" (see load_voc_layout)
    files_description: str  # what to place in the folder, for the one-line missing-files error


_CITYSCAPES = "Cityscapes in VOC layout"
_FOGGY_CITYSCAPES = "Foggy Cityscapes in VOC layout"
_SIM10K = "Sim10k in VOC layout"

ADAPTATION_DATASETS: Dict[str, AdaptationDataset] = {
    "cityscapes_8cls_train": AdaptationDataset("cityscapes_voc", "train", CITYSCAPES_CLASSES, "error", _CITYSCAPES),
    "cityscapes_8cls_val": AdaptationDataset("cityscapes_voc", "val", CITYSCAPES_CLASSES, "error", _CITYSCAPES),
    "foggy_cityscapes_8cls_train": AdaptationDataset(
        "foggy_cityscapes_voc", "train", CITYSCAPES_CLASSES, "error", _FOGGY_CITYSCAPES),
    "foggy_cityscapes_8cls_val": AdaptationDataset(
        "foggy_cityscapes_voc", "val", CITYSCAPES_CLASSES, "error", _FOGGY_CITYSCAPES),
    "sim10k_car_train": AdaptationDataset("sim10k_voc", "trainval", ("car",), "ignore", _SIM10K),
    "cityscapes_car_train": AdaptationDataset("cityscapes_voc", "train", ("car",), "ignore", _CITYSCAPES),
    "cityscapes_car_val": AdaptationDataset("cityscapes_voc", "val", ("car",), "ignore", _CITYSCAPES),
}

# dataset name -> the folder it was registered with
_REGISTERED_DIRS: Dict[str, str] = {}


def register_adaptation_datasets(root: Optional[str] = None) -> None:
    """Register :data:`ADAPTATION_DATASETS` (see the module docstring); reads no file.

    Args:
        root: the datasets root the folders are in; default :func:`pgp_det.data.datasets_root`,
            read now (so set ``DETECTRON2_DATASETS`` before calling, as before importing).

    Calling again with the same root does nothing; another root replaces the registrations.
    """
    root = root if root is not None else datasets_root()
    for name, dataset in ADAPTATION_DATASETS.items():
        dirname = os.path.join(root, dataset.folder)
        if _REGISTERED_DIRS.get(name) == dirname and name in DatasetCatalog.list():
            continue
        unregister(name)
        _REGISTERED_DIRS[name] = dirname
        DatasetCatalog.register(
            name, lambda dirname=dirname, dataset=dataset: load_voc_layout(
                dirname, dataset.split, dataset.class_names, other_classes=dataset.other_classes))
        set_voc_metadata(name, dirname, dataset.split, dataset.class_names,
                         files_description=dataset.files_description)

"""Register user datasets in PASCAL VOC or COCO layout, checking their files as they load.

Every problem found in a dataset raises an error with one line naming the file and what is wrong
with it; malformed objects are never dropped silently.
"""
import json
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Sequence, Tuple, Union

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from ..errors import UserInputError

__all__ = [
    "DatasetNotFoundError",
    "DatasetFormatError",
    "register_voc_layout",
    "register_coco_layout",
    "register_custom_datasets",
    "load_voc_layout",
    "set_voc_metadata",
    "validate_dataset",
    "check_custom_dataset_files",
    "is_custom_dataset",
    "parse_class_names",
]

# Annotation tools round box corners differently (0-based VOC exports, float COCO boxes that end a
# fraction past the border); boxes may overhang the image by this many pixels before they count
# as wrong. detectron2 clips boxes to the image when it builds training targets.
BORDER_TOLERANCE = 1.0

# What a VOC-layout loader does with an object whose class is not in its class list: refuse it
# (a user's class list that misses a class is a mistake), or skip it (a benchmark that keeps a
# subset of a dataset's classes, such as the car-only Sim10k -> Cityscapes one).
OTHER_CLASSES_POLICIES = ("error", "ignore")

# Image extensions looked for in JPEGImages/, in this order: VOC's own images are JPEG, while
# conversions of other datasets to the layout often keep their PNGs (Cityscapes, Foggy Cityscapes).
VOC_IMAGE_EXTENSIONS = (".jpg", ".png")

# name -> ("voc", dirname, split, class names) or ("coco", json_file, image_root)
_CUSTOM_DATASETS: Dict[str, tuple] = {}


class DatasetNotFoundError(UserInputError, FileNotFoundError):
    """A dataset's name is not registered, or its files are not where its registration says."""


class DatasetFormatError(UserInputError, ValueError):
    """A dataset's files exist but do not hold what their layout requires, or its registration clashes."""


def add_dataset_arguments(parser) -> None:
    """Add ``--register-voc NAME DIR SPLIT CLASSES`` and ``--register-coco NAME JSON IMAGE_DIR``
    (repeatable) to an ``argparse`` parser; pass them on to :func:`pgp_det.config.load_config`."""
    parser.add_argument("--register-voc", nargs=4, action="append", default=[],
                        metavar=("NAME", "DIR", "SPLIT", "CLASSES"),
                        help="register a VOC-layout dataset; CLASSES: comma-separated names or a file")
    parser.add_argument("--register-coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-layout dataset (instances JSON + image folder)")


def register_custom_datasets(cfg: CfgNode) -> None:
    """Register every dataset listed in ``cfg.DATASETS.CUSTOM_VOC`` and ``cfg.DATASETS.CUSTOM_COCO``
    (keys added by :func:`pgp_det.config.add_dataset_config`).

    Safe to call repeatedly with the same config (each process of a multi-process run calls it).
    """
    for entry in cfg.DATASETS.get("CUSTOM_VOC", []):
        if len(entry) != 4:
            raise DatasetFormatError(
                f"DATASETS.CUSTOM_VOC entry {list(entry)} should be [name, dirname, split, classes]")
        register_voc_layout(*entry)
    for entry in cfg.DATASETS.get("CUSTOM_COCO", []):
        if len(entry) != 3:
            raise DatasetFormatError(
                f"DATASETS.CUSTOM_COCO entry {list(entry)} should be [name, json_file, image_root]")
        register_coco_layout(*entry)


def parse_class_names(class_names: Union[str, Sequence[str]]) -> List[str]:
    """Class names from a list, a comma-separated string, or a text file with one name per line."""
    if isinstance(class_names, str):
        if os.path.isfile(class_names):
            with open(class_names) as f:
                names = [line.strip() for line in f]
            source = class_names
        elif class_names.endswith(".txt") or os.sep in class_names:
            raise DatasetNotFoundError(f"class list file '{class_names}' not found")
        else:
            names = class_names.split(",")
            source = f"'{class_names}'"
    else:
        names, source = [str(n) for n in class_names], str(list(class_names))
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise DatasetFormatError(f"class list {source} names no class")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetFormatError(f"class list {source} names {', '.join(duplicates)} more than once")
    return names


def register_voc_layout(name: str, dirname: str, split: str, class_names: Union[str, Sequence[str]]) -> None:
    """Register a dataset in PASCAL VOC layout (``Annotations/``, ``ImageSets/Main/``, ``JPEGImages/``).

    Args:
        name: dataset name to use in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        dirname: directory holding the three VOC folders.
        split: image set: ``ImageSets/Main/<split>.txt`` lists the image ids.
        class_names: a list, a comma-separated string, or a file with one class per line; the order
            gives the class ids.
    """
    names = parse_class_names(class_names)
    _claim_name(name, ("voc", dirname, split, tuple(names)))
    DatasetCatalog.register(name, lambda: load_voc_layout(dirname, split, names))
    set_voc_metadata(name, dirname, split, names)


def set_voc_metadata(name: str, dirname: str, split: str, class_names: Sequence[str], **extra):
    """Set the metadata every VOC-layout dataset carries and return it: PASCAL VOC box AP
    (:class:`pgp_det.evaluation.VOCDetectionEvaluator` reads the ground truth again from
    ``dirname``'s ``Annotations/`` and ``ImageSets/Main/<split>.txt``, keeping only objects of
    ``class_names``), and the folder and split that :func:`pgp_det.data.check_dataset_available`
    looks for. ``extra``: more metadata keys."""
    # year 2007: the VOC07 11-point AP50 is the headline number, as for the VOC07 test set
    return MetadataCatalog.get(name).set(
        evaluator_type="pascal_voc", dirname=dirname, split=split, year=2007, thing_classes=list(class_names), **extra)


def register_coco_layout(name: str, json_file: str, image_root: str) -> None:
    """Register a dataset in COCO layout: an instances JSON file and the folder of its images.

    ``thing_classes`` come from the JSON's categories, read now when the file exists (else when
    the dataset loads). Category ids may be any integers; they map to contiguous ids in id order.
    """
    _claim_name(name, ("coco", json_file, image_root))
    DatasetCatalog.register(name, lambda: _load_coco_layout(json_file, image_root, name))
    metadata = MetadataCatalog.get(name).set(evaluator_type="coco", json_file=json_file, image_root=image_root)
    if os.path.isfile(json_file):
        categories = sorted(_read_coco_json(json_file)["categories"], key=lambda c: c["id"])
        metadata.set(
            thing_classes=[c["name"] for c in categories],
            thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
        )


def is_custom_dataset(name: str) -> bool:
    """Whether ``name`` was registered by :func:`register_voc_layout` or :func:`register_coco_layout`."""
    return name in _CUSTOM_DATASETS


def check_custom_dataset_files(name: str) -> None:
    """Raise :class:`DatasetNotFoundError` if a custom dataset's directories or index files are missing."""
    kind, *args = _CUSTOM_DATASETS[name]
    if kind == "voc":
        dirname, split, _ = args
        required = [os.path.join(dirname, "ImageSets", "Main", split + ".txt"),
                    os.path.join(dirname, "Annotations"), os.path.join(dirname, "JPEGImages")]
        hint = "a VOC-layout dataset needs Annotations/, ImageSets/Main/<split>.txt and JPEGImages/"
    else:
        required = list(args)
        hint = "a COCO-layout dataset needs its instances JSON file and image folder"
    for path in required:
        if not os.path.exists(path):
            raise DatasetNotFoundError(f"dataset '{name}' not found: expected {path} ({hint}; see datasets/README.md)")


def validate_dataset(name: str) -> int:
    """Load a registered dataset, so that every problem in its files raises now; returns its image count."""
    if name not in DatasetCatalog.list():
        raise DatasetNotFoundError(f"dataset '{name}' is not registered")
    return len(DatasetCatalog.get(name))


def _claim_name(name: str, args: tuple) -> None:
    """Make registering ``name`` again with the same arguments a no-op, and with others an error."""
    if name in _CUSTOM_DATASETS:
        if _CUSTOM_DATASETS[name] == args:
            DatasetCatalog.remove(name)  # re-registered below with the same loader and metadata
            return
        raise DatasetFormatError(
            f"dataset '{name}' is already registered as {_describe(_CUSTOM_DATASETS[name])}; "
            f"cannot register it again as {_describe(args)}: choose another name")
    if name in DatasetCatalog.list():
        raise DatasetFormatError(f"dataset name '{name}' is taken by a builtin dataset: choose another name")
    _CUSTOM_DATASETS[name] = args


def _describe(args: tuple) -> str:
    if args[0] == "voc":
        return f"VOC layout {args[1]} split {args[2]} classes {','.join(args[3])}"
    return f"COCO layout {args[1]} images {args[2]}"


# ----------------------------------------------------------------------------------------------
# VOC layout


def load_voc_layout(dirname: str, split: str, class_names: Sequence[str], other_classes: str = "error") -> List[dict]:
    """Read a VOC-layout dataset into detectron2's dataset dicts, checking every file.

    Boxes in VOC XML are 1-based inclusive pixel indices; they are returned as absolute XYXY
    coordinates with the whole image spanning [0, W] x [0, H] (xmin - 1, ymin - 1, xmax, ymax),
    the same convention as detectron2's own VOC loader. Images are ``JPEGImages/<id>.jpg``, else
    ``JPEGImages/<id>.png``.

    Args:
        dirname: directory holding ``Annotations/``, ``ImageSets/Main/`` and ``JPEGImages/``.
        split: ``ImageSets/Main/<split>.txt`` lists the image ids.
        class_names: the classes kept; their order gives the category ids.
        other_classes: an object whose class is not in ``class_names``: ``"error"`` raises,
            ``"ignore"`` skips it unread (its box is not checked); the image is kept either way.

    Returns:
        one dict per image: ``file_name``, ``image_id`` (the file id), ``height``, ``width``,
        ``annotations`` (``category_id``, ``bbox``, ``bbox_mode``).

    Raises:
        DatasetFormatError: missing split file, annotation or image; bad XML; unknown class; bad box.
    """
    if other_classes not in OTHER_CLASSES_POLICIES:
        raise ValueError(f"other_classes={other_classes!r}: use one of {', '.join(OTHER_CLASSES_POLICIES)}")
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not os.path.isfile(split_file):
        raise DatasetFormatError(f"{split_file}: split file not found (the VOC layout lists image ids there)")
    with open(split_file) as f:
        file_ids = [line.split()[0] for line in f if line.strip()]
    if not file_ids:
        raise DatasetFormatError(f"{split_file}: lists no image ids")

    class_ids = {n: i for i, n in enumerate(class_names)}
    ignore_other_classes = other_classes == "ignore"
    dataset = []
    for file_id in file_ids:
        annotation_file = os.path.join(dirname, "Annotations", file_id + ".xml")
        if not os.path.isfile(annotation_file):
            raise DatasetFormatError(f"{annotation_file}: annotation file not found (image id listed in {split_file})")
        image_file = _find_voc_image(dirname, file_id, split_file)
        width, height, objects = _parse_voc_xml(annotation_file, class_ids, ignore_other_classes)
        dataset.append({
            "file_name": image_file, "image_id": file_id, "height": height, "width": width,
            "annotations": [
                {"category_id": class_ids[cls], "bbox": box, "bbox_mode": BoxMode.XYXY_ABS} for cls, box in objects
            ],
        })
    return dataset


def _find_voc_image(dirname: str, file_id: str, split_file: str) -> str:
    """The image file of ``file_id`` in ``dirname/JPEGImages`` (see :data:`VOC_IMAGE_EXTENSIONS`)."""
    candidates = [os.path.join(dirname, "JPEGImages", file_id + ext) for ext in VOC_IMAGE_EXTENSIONS]
    for image_file in candidates:
        if os.path.isfile(image_file):
            return image_file
    others = ", ".join(os.path.basename(c) for c in candidates[1:])
    raise DatasetFormatError(f"{candidates[0]}: image file not found, nor {others} (image id listed in {split_file})")


def _parse_voc_xml(
    path: str, class_ids: Dict[str, int], ignore_other_classes: bool = False
) -> Tuple[int, int, List[Tuple[str, List[float]]]]:
    """(width, height, [(class name, [x0, y0, x1, y1])]) of one VOC annotation file, checked.

    Objects of classes not in ``class_ids`` raise, or are skipped with ``ignore_other_classes``."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DatasetFormatError(f"{path}: not valid XML ({e})") from None
    width = _xml_number(path, root, "size/width", "the image size", int)
    height = _xml_number(path, root, "size/height", "the image size", int)
    if width <= 0 or height <= 0:
        raise DatasetFormatError(f"{path}: image size {width}x{height} is not positive")

    objects = []
    for k, obj in enumerate(root.findall("object"), start=1):
        name_node = obj.find("name")
        cls = (name_node.text or "").strip() if name_node is not None else ""
        if not cls:
            raise DatasetFormatError(f"{path}: object {k} has no <name>")
        if cls not in class_ids:
            if ignore_other_classes:
                continue
            raise DatasetFormatError(f"{path}: object {k} has class '{cls}', which is not among the dataset's "
                                     f"classes ({','.join(class_ids)})")
        xmin, ymin, xmax, ymax = (_xml_number(path, obj, "bndbox/" + key, f"object {k}", float)
                                  for key in ("xmin", "ymin", "xmax", "ymax"))
        # 1-based inclusive pixel indices -> a box in continuous coordinates
        box = [xmin - 1.0, ymin - 1.0, xmax, ymax]
        where = f"object {k} box ({_fmt(xmin)},{_fmt(ymin)})-({_fmt(xmax)},{_fmt(ymax)})"
        _check_box(path, where, box, width, height)
        objects.append((cls, box))
    return width, height, objects


def _xml_number(path: str, node: ET.Element, key: str, what: str, kind: type):
    """The number in child ``key`` ("a/b") of ``node``, converted with ``kind``."""
    child = node.find(key)
    text = child.text.strip() if child is not None and child.text else ""
    tag = "<" + key.replace("/", "><") + ">"
    if not text:
        raise DatasetFormatError(f"{path}: {what} has no {tag}")
    try:
        return kind(float(text))
    except ValueError:
        raise DatasetFormatError(f"{path}: {what} has {tag} '{text}', not a number") from None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _check_box(path: str, where: str, box: Sequence[float], width: int, height: int) -> None:
    """Raise unless XYXY ``box`` has positive size and lies in the width x height image."""
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise DatasetFormatError(f"{path}: {where} has no positive width and height")
    tol = BORDER_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise DatasetFormatError(f"{path}: {where} lies outside the {width}x{height} image")


# ----------------------------------------------------------------------------------------------
# COCO layout


def _read_coco_json(json_file: str) -> dict:
    """The parsed JSON file, with the keys of an instances file checked."""
    if not os.path.isfile(json_file):
        raise DatasetFormatError(f"{json_file}: annotation file not found")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{json_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{json_file}: holds a {type(data).__name__}, not a COCO instances object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetFormatError(f"{json_file}: has no '{key}' list (a COCO instances file needs images, "
                                     "annotations and categories)")
    if not data["categories"]:
        raise DatasetFormatError(f"{json_file}: 'categories' is empty")
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise DatasetFormatError(f"{json_file}: category {k} needs an integer 'id' and a string 'name'")
    _refuse_duplicates(json_file, "category id", [c["id"] for c in data["categories"]])
    _refuse_duplicates(json_file, "category name", [c["name"] for c in data["categories"]])
    return data


def _refuse_duplicates(json_file: str, what: str, values: Sequence) -> None:
    """Raise on the first value listed twice (pycocotools keeps one of them and drops the rest)."""
    seen = set()
    for value in values:
        if value in seen:
            raise DatasetFormatError(f"{json_file}: {what} {value!r} is listed more than once; {what}s must be unique")
        seen.add(value)


def _check_coco(json_file: str, image_root: str, data: dict) -> None:
    """Raise :class:`DatasetFormatError` on the first bad image or annotation of a parsed COCO file."""
    images = {}
    for k, image in enumerate(data["images"]):
        try:
            image_id, file_name = image["id"], image["file_name"]
            width, height = int(image["width"]), int(image["height"])
        except (KeyError, TypeError, ValueError):
            raise DatasetFormatError(f"{json_file}: image {k} needs 'id', 'file_name', 'width' and 'height'") from None
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise DatasetFormatError(f"{json_file}: image {k} has id {image_id!r}; ids are integers or strings")
        if width <= 0 or height <= 0:
            raise DatasetFormatError(f"{json_file}: image {image_id} size {width}x{height} is not positive")
        image_file = os.path.join(image_root, file_name)
        if not os.path.isfile(image_file):
            raise DatasetFormatError(f"{image_file}: image file not found (listed in {json_file})")
        images[image_id] = (width, height)

    _refuse_duplicates(json_file, "image id", [image["id"] for image in data["images"]])
    _refuse_duplicates(json_file, "annotation id",
                       [ann["id"] for ann in data["annotations"] if isinstance(ann, dict) and "id" in ann])
    category_ids = {c["id"] for c in data["categories"]}
    for k, ann in enumerate(data["annotations"]):
        ann_id = ann.get("id", k) if isinstance(ann, dict) else k
        where = f"annotation {ann_id}"
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann or "bbox" not in ann:
            raise DatasetFormatError(f"{json_file}: {where} needs 'image_id', 'category_id' and 'bbox'")
        if ann["image_id"] not in images:
            raise DatasetFormatError(f"{json_file}: {where} refers to image {ann['image_id']}, which is not listed")
        if ann["category_id"] not in category_ids:
            raise DatasetFormatError(
                f"{json_file}: {where} has category_id {ann['category_id']}, not one of the categories "
                f"{sorted(category_ids)}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetFormatError(f"{json_file}: {where} bbox {bbox} is not [x, y, width, height]")
        x, y, w, h = bbox
        width, height = images[ann["image_id"]]
        box_text = f"{where} bbox [{_fmt(x)},{_fmt(y)},{_fmt(w)},{_fmt(h)}] (image {ann['image_id']})"
        _check_box(json_file, box_text, [x, y, x + w, y + h], width, height)


def _load_coco_layout(json_file: str, image_root: str, name: str) -> List[dict]:
    data = _read_coco_json(json_file)
    _check_coco(json_file, image_root, data)
    del data  # detectron2 re-reads the file through pycocotools
    return load_coco_json(json_file, image_root, name)

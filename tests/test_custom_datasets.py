"""User datasets in VOC and COCO layout: registration from config keys, loading, one-line errors."""
import itertools
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from pgp_det.config import add_dataset_config
from pgp_det.data import (
    DatasetFormatError,
    DatasetNotFoundError,
    check_dataset_available,
    register_coco_layout,
    register_custom_datasets,
    register_voc_layout,
    validate_dataset,
)
from pgp_det.errors import UserInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog"]
IMAGE_SIZE = (64, 48)  # width, height
_names = itertools.count()


def unique_name(prefix):
    """Dataset names are global to the process: every test registers fresh ones."""
    return f"{prefix}_{next(_names)}"


def write_image(path, width=IMAGE_SIZE[0], height=IMAGE_SIZE[1]):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.full((height, width, 3), 127, dtype=np.uint8))


def voc_xml(objects, width=IMAGE_SIZE[0], height=IMAGE_SIZE[1]):
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in objects)
    return (f"<annotation><filename>x.jpg</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{body}</annotation>")


def make_voc(root, annotations=None):
    """A VOC-layout dataset with images 0001..0003 in split 'train'; returns its directory."""
    annotations = annotations or {
        "0001": voc_xml([("cat", (1, 1, 20, 30)), ("dog", (10, 5, 64, 48))]),  # the second touches the border
        "0002": voc_xml([]),
        "0003": voc_xml([("dog", (5, 6, 7, 8))]),
    }
    os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "ImageSets", "Main"), exist_ok=True)
    for file_id, xml in annotations.items():
        write_image(os.path.join(root, "JPEGImages", file_id + ".jpg"))
        with open(os.path.join(root, "Annotations", file_id + ".xml"), "w") as f:
            f.write(xml)
    with open(os.path.join(root, "ImageSets", "Main", "train.txt"), "w") as f:
        f.write("".join(i + "\n" for i in annotations))
    return str(root)


def coco_data():
    return {
        "images": [{"id": 7, "file_name": "a.jpg", "width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1]},
                   {"id": 9, "file_name": "b.jpg", "width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1]}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [0, 0, 20, 30], "area": 600, "iscrowd": 0},
                        {"id": 2, "image_id": 7, "category_id": 5, "bbox": [10, 4, 54, 44], "area": 9, "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}],
    }


def make_coco(root, data=None):
    """A COCO-layout dataset (images a.jpg, b.jpg); returns (json_file, image_root)."""
    image_root = os.path.join(root, "images")
    for name in ("a.jpg", "b.jpg"):
        write_image(os.path.join(image_root, name))
    json_file = os.path.join(root, "instances.json")
    with open(json_file, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data or coco_data()))
    return json_file, image_root


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    assert isinstance(excinfo.value, UserInputError)
    for fragment in fragments:
        assert fragment in message, message


def test_voc_and_coco_register_from_config_keys_and_load(tmp_path):
    voc_dir = make_voc(tmp_path / "voc")
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("cat\ndog\n")
    json_file, image_root = make_coco(str(tmp_path / "coco"))
    voc_name, voc_file_name, coco_name = unique_name("my_voc"), unique_name("my_voc_file"), unique_name("my_coco")

    cfg = get_cfg()
    add_dataset_config(cfg)
    assert cfg.DATASETS.CUSTOM_VOC == [] and cfg.DATASETS.CUSTOM_COCO == []
    cfg.merge_from_list([
        "DATASETS.CUSTOM_VOC", str([[voc_name, voc_dir, "train", "cat,dog"],
                                    [voc_file_name, voc_dir, "train", str(classes_file)]]),
        "DATASETS.CUSTOM_COCO", str([[coco_name, json_file, image_root]]),
    ])
    register_custom_datasets(cfg)
    register_custom_datasets(cfg)  # every training process registers again

    voc = DatasetCatalog.get(voc_name)
    assert [d["image_id"] for d in voc] == ["0001", "0002", "0003"]
    assert [(a["category_id"], a["bbox"]) for a in voc[0]["annotations"]] == [(0, [0.0, 0.0, 20.0, 30.0]),
                                                                             (1, [9.0, 4.0, 64.0, 48.0])]
    assert (voc[0]["width"], voc[0]["height"]) == IMAGE_SIZE and voc[1]["annotations"] == []
    assert DatasetCatalog.get(voc_file_name) == voc
    meta = MetadataCatalog.get(voc_name)
    assert (meta.evaluator_type, meta.dirname, meta.split, meta.year, meta.thing_classes) == (
        "pascal_voc", voc_dir, "train", 2007, CLASSES)

    coco = DatasetCatalog.get(coco_name)
    assert [d["image_id"] for d in coco] == [7, 9]
    assert [a["category_id"] for a in coco[0]["annotations"]] == [0, 1]
    meta = MetadataCatalog.get(coco_name)
    assert (meta.evaluator_type, meta.json_file, meta.image_root, meta.thing_classes) == (
        "coco", json_file, image_root, CLASSES)

    for name in (voc_name, voc_file_name, coco_name):
        check_dataset_available(name)
    assert validate_dataset(coco_name) == 2


def test_registering_a_name_again_with_other_files_fails(tmp_path):
    voc_dir = make_voc(tmp_path / "voc")
    name = unique_name("clash")
    register_voc_layout(name, voc_dir, "train", CLASSES)
    register_voc_layout(name, voc_dir, "train", "cat, dog")  # the same registration
    with pytest.raises(DatasetFormatError) as excinfo:
        register_voc_layout(name, voc_dir, "val", CLASSES)
    assert_one_line_error(excinfo, f"'{name}' is already registered")
    with pytest.raises(DatasetFormatError) as excinfo:
        register_voc_layout("voc_2007_train", voc_dir, "train", CLASSES)
    assert_one_line_error(excinfo, "'voc_2007_train' is taken by a builtin dataset")


def test_bad_class_lists_are_rejected(tmp_path):
    voc_dir = make_voc(tmp_path / "voc")
    with pytest.raises(DatasetNotFoundError) as excinfo:
        register_voc_layout(unique_name("x"), voc_dir, "train", str(tmp_path / "missing.txt"))
    assert_one_line_error(excinfo, "missing.txt")
    with pytest.raises(DatasetFormatError) as excinfo:
        register_voc_layout(unique_name("x"), voc_dir, "train", "cat,dog,cat")
    assert_one_line_error(excinfo, "cat more than once")


def remove(path):
    os.remove(path)


@pytest.mark.parametrize("problem, broken_file, expected", [
    ("bad_xml", "Annotations/0001.xml", "not valid XML"),
    ("box_outside", "Annotations/0001.xml", "object 2 box (10,5)-(300,40) lies outside the 64x48 image"),
    ("empty_box", "Annotations/0003.xml", "object 1 box (9,6)-(7,8) has no positive width and height"),
    ("unknown_class", "Annotations/0003.xml", "object 1 has class 'horse'"),
    ("bad_number", "Annotations/0003.xml", "object 1 has <bndbox><xmax> 'wide', not a number"),
    ("no_size", "Annotations/0002.xml", "has no <size><width>"),
    ("missing_image", "JPEGImages/0002.jpg", "image file not found"),
    ("missing_annotation", "Annotations/0002.xml", "annotation file not found"),
    ("missing_split", "ImageSets/Main/train.txt", "split file not found"),
])
def test_malformed_voc_is_reported_with_its_file(tmp_path, problem, broken_file, expected):
    voc_dir = make_voc(tmp_path / "voc")
    path = os.path.join(voc_dir, broken_file)
    if problem.startswith("missing"):
        os.remove(path)
    else:
        content = {
            "bad_xml": "<annotation><size>",
            "box_outside": voc_xml([("cat", (1, 1, 2, 2)), ("dog", (10, 5, 300, 40))]),
            "empty_box": voc_xml([("dog", (9, 6, 7, 8))]),
            "unknown_class": voc_xml([("horse", (1, 1, 5, 5))]),
            "bad_number": voc_xml([("dog", (1, 1, "wide", 5))]),
            "no_size": "<annotation><object><name>cat</name></object></annotation>",
        }[problem]
        with open(path, "w") as f:
            f.write(content)
    name = unique_name("bad_voc")
    register_voc_layout(name, voc_dir, "train", CLASSES)
    with pytest.raises(DatasetFormatError) as excinfo:
        validate_dataset(name)
    assert_one_line_error(excinfo, path, expected)


def _without(key):
    data = coco_data()
    del data[key]
    return data


def _with_annotation(**changes):
    data = coco_data()
    data["annotations"][1].update(changes)
    return data


@pytest.mark.parametrize("data, expected", [
    ("{not json", "not valid JSON"),
    (_without("annotations"), "has no 'annotations' list"),
    (_with_annotation(bbox=[10, 4, 60, 44]), "annotation 2 bbox [10,4,60,44] (image 7) lies outside the 64x48 image"),
    (_with_annotation(bbox=[10, 4, 0, 44]), "has no positive width and height"),
    (_with_annotation(category_id=4), "annotation 2 has category_id 4, not one of the categories [3, 5]"),
    (_with_annotation(image_id=8), "annotation 2 refers to image 8, which is not listed"),
])
def test_malformed_coco_is_reported_with_its_file(tmp_path, data, expected):
    json_file, image_root = make_coco(str(tmp_path), data=data)
    name = unique_name("bad_coco")
    with pytest.raises(DatasetFormatError) as excinfo:
        register_coco_layout(name, json_file, image_root)  # categories are read at registration
        validate_dataset(name)
    assert_one_line_error(excinfo, json_file, expected)


def test_coco_image_listed_but_missing(tmp_path):
    json_file, image_root = make_coco(str(tmp_path))
    os.remove(os.path.join(image_root, "b.jpg"))
    name = unique_name("coco_missing_image")
    register_coco_layout(name, json_file, image_root)
    with pytest.raises(DatasetFormatError) as excinfo:
        validate_dataset(name)
    assert_one_line_error(excinfo, os.path.join(image_root, "b.jpg"), "image file not found", json_file)


def test_missing_custom_files_and_unregistered_names(tmp_path):
    name = unique_name("absent_voc")
    register_voc_layout(name, str(tmp_path / "nowhere"), "trainval", CLASSES)
    with pytest.raises(DatasetNotFoundError) as excinfo:
        check_dataset_available(name)
    assert_one_line_error(excinfo, f"dataset '{name}' not found", os.path.join("nowhere", "ImageSets", "Main",
                                                                                "trainval.txt"))
    with pytest.raises(DatasetNotFoundError) as excinfo:
        check_dataset_available("no_such_dataset")
    assert_one_line_error(excinfo, "'no_such_dataset' is not registered", "--register-voc", "--register-coco")


def test_missing_builtin_voc_names_its_files(tmp_path):
    # detectron2 reads DETECTRON2_DATASETS when its builtin datasets register, at import
    script = ("from pgp_det.data import check_dataset_available, DatasetNotFoundError\n"
              "for name in ('voc_2007_test', 'coco_2017_val'):\n"
              "    try:\n"
              "        check_dataset_available(name)\n"
              "    except DatasetNotFoundError as e:\n"
              "        print(e)\n")
    datasets = str(tmp_path / "empty_datasets")
    os.makedirs(datasets)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                          env={**os.environ, "DETECTRON2_DATASETS": datasets, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    voc_line, coco_line = proc.stdout.strip().splitlines()
    voc_dir = os.path.join(datasets, "VOC2007")
    assert voc_line == (f"dataset 'voc_2007_test' not found: expected {voc_dir}/ImageSets/Main/test.txt "
                        f"(place PASCAL VOC 2007 under {voc_dir} or set DETECTRON2_DATASETS; see datasets/README.md)")
    assert coco_line.startswith(f"dataset 'coco_2017_val' not found: expected "
                                f"{datasets}/coco/annotations/instances_val2017.json (place COCO under {datasets}/coco")

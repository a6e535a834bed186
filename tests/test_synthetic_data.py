"""The synthetic shapes set: deterministic, cached, well-formed, varied, same objects in both layouts."""
import contextlib
import io
import json
import multiprocessing
import os
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from pgp_det.data import SYNTHETIC_CLASS_NAMES, generate_synthetic_dataset, register_synthetic_datasets
from pgp_det.data.synthetic import COMPLETE_MARKER

NUM_TRAIN, NUM_TEST = 40, 10


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic") / "shapes")
    generate_synthetic_dataset(root, seed=0, num_train=NUM_TRAIN, num_test=NUM_TEST)
    return root


def read_tree(root):
    """relative path -> bytes of every file under root."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def mtimes(root):
    return {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in read_tree(root)}


def split_ids(root, split):
    with open(os.path.join(root, "ImageSets", "Main", split + ".txt")) as f:
        return f.read().split()


def voc_objects(root, file_id):
    tree = ET.parse(os.path.join(root, "Annotations", file_id + ".xml")).getroot()
    size = (int(tree.find("size/width").text), int(tree.find("size/height").text), int(tree.find("size/depth").text))
    objects = []
    for obj in tree.findall("object"):
        box = [int(obj.find("bndbox/" + k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
        objects.append({
            "name": obj.find("name").text, "box": box, "pose": obj.find("pose").text,
            "truncated": int(obj.find("truncated").text), "difficult": int(obj.find("difficult").text),
        })
    return tree.find("filename").text, size, objects


def test_same_seed_gives_identical_files(small_set, tmp_path):
    again = str(tmp_path / "again")
    generate_synthetic_dataset(again, seed=0, num_train=NUM_TRAIN, num_test=NUM_TEST)
    assert read_tree(again) == read_tree(small_set)

    other = str(tmp_path / "other_seed")
    generate_synthetic_dataset(other, seed=1, num_train=NUM_TRAIN, num_test=NUM_TEST)
    original, changed = read_tree(small_set), read_tree(other)
    assert original.keys() == changed.keys()
    assert original["JPEGImages/000000.jpg"] != changed["JPEGImages/000000.jpg"]


def test_complete_set_is_reused_and_incomplete_one_regenerated(tmp_path):
    root = str(tmp_path / "shapes")
    generate_synthetic_dataset(root, num_train=6, num_test=2)
    before = mtimes(root)
    generate_synthetic_dataset(root, num_train=6, num_test=2)
    assert mtimes(root) == before

    os.remove(os.path.join(root, COMPLETE_MARKER))  # as if writing had stopped half way
    os.remove(os.path.join(root, "JPEGImages", "000003.jpg"))
    generate_synthetic_dataset(root, num_train=6, num_test=2)
    assert os.path.isfile(os.path.join(root, COMPLETE_MARKER))
    assert os.path.isfile(os.path.join(root, "JPEGImages", "000003.jpg"))

    # other arguments make another set; no staging directories are left beside it
    generate_synthetic_dataset(root, num_train=4, num_test=2)
    assert len(split_ids(root, "train")) == 4
    assert sorted(os.listdir(tmp_path)) == [".shapes.lock", "shapes"]


def _generate_in_child(root):
    generate_synthetic_dataset(root, seed=3, num_train=12, num_test=4)


def test_concurrent_first_use_writes_one_complete_set(tmp_path):
    root = str(tmp_path / "shared")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_generate_in_child, args=(root,)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    reference = str(tmp_path / "reference")
    generate_synthetic_dataset(reference, seed=3, num_train=12, num_test=4)
    assert read_tree(root) == read_tree(reference)


def test_voc_files_are_well_formed(small_set):
    train, test = split_ids(small_set, "train"), split_ids(small_set, "test")
    assert (len(train), len(test)) == (NUM_TRAIN, NUM_TEST)
    assert not set(train) & set(test)
    with open(os.path.join(small_set, "classes.txt")) as f:
        assert tuple(f.read().split()) == SYNTHETIC_CLASS_NAMES
    for file_id in train + test:
        filename, (width, height, depth), objects = voc_objects(small_set, file_id)
        image = cv2.imread(os.path.join(small_set, "JPEGImages", filename))
        assert image.shape == (height, width, depth)
        assert 224 <= width <= 288 and 224 <= height <= 288
        assert len(objects) <= 6
        for obj in objects:
            xmin, ymin, xmax, ymax = obj["box"]
            assert 1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height
            assert obj["name"] in SYNTHETIC_CLASS_NAMES and obj["pose"] == "Unspecified"


def test_objects_are_varied(small_set):
    objects, num_empty = [], 0
    for file_id in split_ids(small_set, "train"):
        _, _, image_objects = voc_objects(small_set, file_id)
        objects += image_objects
        num_empty += not image_objects
    sides = np.array([max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) + 1 for o in objects])
    assert num_empty >= 1
    assert {o["name"] for o in objects} == set(SYNTHETIC_CLASS_NAMES)
    assert (sides <= 16).any() and (sides >= 70).any()
    assert any(o["truncated"] for o in objects) and not all(o["truncated"] for o in objects)
    assert any(o["difficult"] for o in objects) and not all(o["difficult"] for o in objects)
    touching_border = [o for o in objects if o["box"][0] == 1 or o["box"][1] == 1]
    assert touching_border and all(o["truncated"] for o in touching_border if o["box"][0] == 1)


def test_coco_json_matches_voc_boxes(small_set):
    from pycocotools.coco import COCO

    for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        json_file = os.path.join(small_set, "annotations", f"instances_{split}.json")
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(json_file)
        assert len(coco.getImgIds()) == count
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2, 3, 4, 5, 6]
        for image in coco.loadImgs(coco.getImgIds()):
            file_id = os.path.splitext(image["file_name"])[0]
            _, (width, height, _), objects = voc_objects(small_set, file_id)
            assert (image["width"], image["height"]) == (width, height)
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            from_coco = [(SYNTHETIC_CLASS_NAMES[a["category_id"] - 1], a["bbox"]) for a in annotations]
            # VOC (xmin, xmax) are 1-based inclusive pixels; COCO x is 0-based and w counts pixels
            from_voc = [(o["name"], [o["box"][0] - 1, o["box"][1] - 1, o["box"][2] - o["box"][0] + 1,
                                     o["box"][3] - o["box"][1] + 1]) for o in objects]
            assert from_coco == from_voc
            assert all(0 < a["area"] <= a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0 for a in annotations)


@pytest.fixture
def small_registrations(small_set):
    register_synthetic_datasets(small_set, seed=0, num_train=NUM_TRAIN, num_test=NUM_TEST)
    yield small_set
    register_synthetic_datasets()  # back to the default registrations other tests expect


def test_voc_and_coco_registrations_load_the_same_objects(small_registrations):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        voc = DatasetCatalog.get(f"synth_voc_{split}")
        coco = DatasetCatalog.get(f"synth_coco_{split}")
        assert len(voc) == len(coco) == count
        for v, c in zip(voc, coco):
            assert (v["file_name"], v["height"], v["width"]) == (c["file_name"], c["height"], c["width"])
            voc_boxes = [(a["category_id"], a["bbox"]) for a in v["annotations"]]
            coco_boxes = [(a["category_id"], BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS))
                          for a in c["annotations"]]
            assert voc_boxes == [(k, [float(x) for x in box]) for k, box in coco_boxes]
        assert MetadataCatalog.get(f"synth_voc_{split}").thing_classes == list(SYNTHETIC_CLASS_NAMES)
        assert MetadataCatalog.get(f"synth_coco_{split}").thing_classes == list(SYNTHETIC_CLASS_NAMES)


def test_coco_metadata_json_file_generates_the_set(tmp_path):
    from detectron2.data import MetadataCatalog

    root = str(tmp_path / "lazy")
    register_synthetic_datasets(root, num_train=4, num_test=2)
    try:
        assert not os.path.exists(root)  # registering writes nothing
        json_file = MetadataCatalog.get("synth_coco_test").json_file
        with open(json_file) as f:
            assert len(json.load(f)["images"]) == 2
    finally:
        register_synthetic_datasets()


def test_default_set_has_its_documented_splits(tmp_path):
    root = str(tmp_path / "default")
    generate_synthetic_dataset(root)
    assert (len(split_ids(root, "train")), len(split_ids(root, "test"))) == (600, 150)


def test_fog_large_test_split_draws_more_test_images_of_the_fog_camera(tmp_path):
    from detectron2.data import DatasetCatalog

    from pgp_det.data.builtin import LARGE_TEST_IMAGES

    root = str(tmp_path / "set")
    register_synthetic_datasets(root, num_train=4, num_test=3)
    try:
        large = DatasetCatalog.get("synth_fog_voc_test_large")
        assert not os.path.exists(root) and not os.path.exists(root + "_fog")  # a set of its own
        assert len(large) == LARGE_TEST_IMAGES
        assert all(r["file_name"].startswith(root + "_fog_test_large") for r in large)
        small = DatasetCatalog.get("synth_fog_voc_test")
        compared = 0
        for s, l in zip(small, large):  # the fog camera's generator and seed: its images, not the source's
            if l["annotations"]:
                with open(s["file_name"], "rb") as a, open(l["file_name"], "rb") as b:
                    assert a.read() == b.read()
                compared += 1
        assert compared >= 2
    finally:
        register_synthetic_datasets()


def test_large_test_split_draws_more_test_images_of_the_same_generator(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from pgp_det.data.builtin import LARGE_TEST_IMAGES

    root = str(tmp_path / "set")
    register_synthetic_datasets(root, num_train=4, num_test=3)
    try:
        large = DatasetCatalog.get("synth_voc_test_large")
        assert not os.path.exists(root)  # the large split is a set of its own
        assert len(large) == LARGE_TEST_IMAGES == 1200
        assert MetadataCatalog.get("synth_voc_test_large").thing_classes == list(SYNTHETIC_CLASS_NAMES)
        assert sum(not r["annotations"] for r in large) == round(0.03 * LARGE_TEST_IMAGES)
        small = DatasetCatalog.get("synth_voc_test")
        compared = 0
        for s, l in zip(small, large):  # a test image drawn in both and left with its objects in both
            if l["annotations"]:
                with open(s["file_name"], "rb") as a, open(l["file_name"], "rb") as b:
                    assert a.read() == b.read()
                assert [a["bbox"] for a in s["annotations"]] == [a["bbox"] for a in l["annotations"]]
                compared += 1
        assert compared >= 2
    finally:
        register_synthetic_datasets()

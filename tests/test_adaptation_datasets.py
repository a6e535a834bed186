"""The domain-adaptation benchmarks (Cityscapes -> Foggy Cityscapes, Sim10k -> Cityscapes) read
from tiny VOC-layout folders under DETECTRON2_DATASETS: classes and class subsets, PNG images,
one-line errors for missing files, their configs, their evaluation, and a user's own
source/target pair registered on the command line."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image

from pgp_det.config import load_config
from pgp_det.data import (
    ADAPTATION_DATASETS,
    CITYSCAPES_CLASSES,
    DatasetFormatError,
    DatasetNotFoundError,
    check_dataset_available,
    check_num_classes,
    load_voc_layout,
    register_adaptation_datasets,
)
from pgp_det.data.domains import TARGET, build_domain_adaptive_train_loader
from pgp_det.engine.preflight import check_training_run
from pgp_det.evaluation.build import build_evaluator
from pgp_det.errors import UserInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
IMAGE_SIZE = 32  # px, both sides
CITYSCAPES_TRAIN_IMAGES = 2975  # the real set's size, which the configs' schedules are made for
_names = itertools.count()

# image id -> [(class, (xmin, ymin, xmax, ymax) in VOC's 1-based inclusive pixels)]
CITYSCAPES_OBJECTS = {
    "frankfurt_0": [("person", (2, 3, 9, 30)), ("car", (10, 12, 31, 28)), ("bicycle", (1, 1, 8, 8))],
    "frankfurt_1": [("rider", (4, 4, 12, 20)), ("car", (20, 2, 32, 12))],
    "frankfurt_2": [],
}
SIM10K_OBJECTS = {
    "3384645": [("car", (1, 5, 16, 20)), ("motorbike", (18, 18, 24, 30)), ("person", (25, 2, 30, 20))],
    "3384646": [("person", (3, 3, 9, 25))],
}


def voc_xml(objects):
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for name, (x0, y0, x1, y1) in objects)
    return (f"<annotation><size><width>{IMAGE_SIZE}</width><height>{IMAGE_SIZE}</height><depth>3</depth></size>"
            f"{body}</annotation>")


def write_voc(folder, splits, extension=".jpg"):
    """A VOC-layout folder: ``splits`` maps a split to {image id: objects}; images are grey squares."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for split, images in splits.items():
        for image_id, objects in images.items():
            pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 40 + 20 * len(objects), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, "JPEGImages", image_id + extension))
            with open(os.path.join(folder, "Annotations", image_id + ".xml"), "w") as f:
                f.write(voc_xml(objects))
        with open(os.path.join(folder, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("".join(image_id + "\n" for image_id in images))
    return str(folder)


@pytest.fixture
def datasets_dir(tmp_path, monkeypatch):
    """An empty datasets root the benchmarks are registered under; the default ones afterwards."""
    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    register_adaptation_datasets()
    yield root
    monkeypatch.undo()
    register_adaptation_datasets()


@pytest.fixture
def benchmarks(datasets_dir):
    """The three sets in the literature's VOC conversions: Cityscapes and Foggy Cityscapes as PNG,
    Sim10k as JPEG."""
    val = {"munster_0": [("car", (3, 3, 20, 20)), ("truck", (1, 20, 30, 32))]}
    write_voc(datasets_dir / "cityscapes_voc", {"train": CITYSCAPES_OBJECTS, "val": val}, ".png")
    write_voc(datasets_dir / "foggy_cityscapes_voc", {"train": CITYSCAPES_OBJECTS, "val": val}, ".png")
    write_voc(datasets_dir / "sim10k_voc", {"trainval": SIM10K_OBJECTS}, ".jpg")
    return datasets_dir


def boxes_of(dicts):
    """{image id: [(category id, XYXY box)]} of dataset dicts."""
    return {d["image_id"]: [(a["category_id"], a["bbox"]) for a in d["annotations"]] for d in dicts}


def xyxy(box):
    """A VOC box (1-based inclusive) in detectron2's continuous XYXY coordinates."""
    return [box[0] - 1.0, box[1] - 1.0, float(box[2]), float(box[3])]


# -- registration and loading ---------------------------------------------------------------------


def test_registering_reads_no_file_and_follows_the_datasets_root(datasets_dir, tmp_path):
    # the root is empty, yet every name is registered there, from DETECTRON2_DATASETS
    for name, dataset in ADAPTATION_DATASETS.items():
        assert name in DatasetCatalog.list()
        metadata = MetadataCatalog.get(name)
        assert metadata.dirname == os.path.join(str(datasets_dir), dataset.folder)
        assert (metadata.split, metadata.evaluator_type) == (dataset.split, "pascal_voc")
    assert MetadataCatalog.get("sim10k_car_train").split == "trainval"
    assert MetadataCatalog.get("cityscapes_car_val").dirname == MetadataCatalog.get("cityscapes_8cls_val").dirname
    nowhere = tmp_path / "nowhere"
    register_adaptation_datasets(str(nowhere))  # another root replaces the registrations
    assert MetadataCatalog.get("sim10k_car_train").dirname == os.path.join(str(nowhere), "sim10k_voc")
    assert not nowhere.exists() and not os.listdir(datasets_dir)


def test_eight_class_sets_load_every_object_with_its_class_id(benchmarks):
    assert CITYSCAPES_CLASSES == ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
    for name in ("cityscapes_8cls_train", "foggy_cityscapes_8cls_train"):
        assert MetadataCatalog.get(name).thing_classes == list(CITYSCAPES_CLASSES)
        dicts = DatasetCatalog.get(name)
        expected = {image_id: [(CITYSCAPES_CLASSES.index(cls), xyxy(box)) for cls, box in objects]
                    for image_id, objects in CITYSCAPES_OBJECTS.items()}
        assert boxes_of(dicts) == expected
        assert all(d["file_name"].endswith(".png") and os.path.isfile(d["file_name"]) for d in dicts)
        assert all((d["width"], d["height"]) == (IMAGE_SIZE, IMAGE_SIZE) for d in dicts)
    val = DatasetCatalog.get("foggy_cityscapes_8cls_val")
    assert boxes_of(val) == {"munster_0": [(2, xyxy((3, 3, 20, 20))), (3, xyxy((1, 20, 30, 32)))]}
    assert val[0]["file_name"] == os.path.join(str(benchmarks), "foggy_cityscapes_voc", "JPEGImages", "munster_0.png")


def test_car_sets_keep_only_cars_as_class_zero(benchmarks):
    for name in ("sim10k_car_train", "cityscapes_car_train", "cityscapes_car_val"):
        assert MetadataCatalog.get(name).thing_classes == ["car"]
    sim10k = DatasetCatalog.get("sim10k_car_train")
    # the image with only a person stays, without objects: it is a true negative for cars
    assert boxes_of(sim10k) == {"3384645": [(0, xyxy((1, 5, 16, 20)))], "3384646": []}
    assert all(d["file_name"].endswith(".jpg") for d in sim10k)
    cityscapes = DatasetCatalog.get("cityscapes_car_train")
    assert boxes_of(cityscapes) == {"frankfurt_0": [(0, xyxy((10, 12, 31, 28)))],
                                    "frankfurt_1": [(0, xyxy((20, 2, 32, 12)))], "frankfurt_2": []}
    assert boxes_of(DatasetCatalog.get("cityscapes_car_val")) == {"munster_0": [(0, xyxy((3, 3, 20, 20)))]}


def test_eight_class_loader_refuses_an_unknown_class_the_car_loader_skips_it(benchmarks):
    annotation = os.path.join(str(benchmarks), "cityscapes_voc", "Annotations", "frankfurt_1.xml")
    with open(annotation, "w") as f:
        # an unknown class, with a box no loader would accept: skipping it must not read it
        f.write(voc_xml([("car", (2, 2, 9, 9)), ("tram", (30, 30, 5, 5))]))
    with pytest.raises(DatasetFormatError) as error:
        DatasetCatalog.get("cityscapes_8cls_train")
    message = str(error.value)
    assert "\n" not in message and message.startswith(annotation) and "object 2 has class 'tram'" in message
    assert boxes_of(DatasetCatalog.get("cityscapes_car_train"))["frankfurt_1"] == [(0, xyxy((2, 2, 9, 9)))]
    # the option is explicit, and its default is the refusing one that user datasets keep
    cityscapes = os.path.join(str(benchmarks), "cityscapes_voc")
    with pytest.raises(DatasetFormatError):
        load_voc_layout(cityscapes, "train", ["car"])
    with pytest.raises(ValueError, match="other_classes='skip'"):
        load_voc_layout(cityscapes, "train", ["car"], other_classes="skip")


def test_png_image_is_found_and_a_missing_image_is_named(benchmarks):
    images = os.path.join(str(benchmarks), "foggy_cityscapes_voc", "JPEGImages")
    assert not os.path.exists(os.path.join(images, "frankfurt_0.jpg"))
    found = {d["image_id"]: d["file_name"] for d in DatasetCatalog.get("foggy_cityscapes_8cls_train")}
    assert found["frankfurt_0"] == os.path.join(images, "frankfurt_0.png")
    # a JPEG is preferred when both exist
    Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(os.path.join(images, "frankfurt_1.jpg"))
    found = {d["image_id"]: d["file_name"] for d in DatasetCatalog.get("foggy_cityscapes_8cls_train")}
    assert found["frankfurt_1"] == os.path.join(images, "frankfurt_1.jpg")
    os.remove(os.path.join(images, "frankfurt_2.png"))
    with pytest.raises(DatasetFormatError) as error:
        DatasetCatalog.get("foggy_cityscapes_8cls_train")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(os.path.join(images, "frankfurt_2.jpg") + ": image file not found, nor frankfurt_2.png")


@pytest.mark.parametrize("name", sorted(ADAPTATION_DATASETS))
def test_a_missing_folder_is_one_line_naming_the_path_and_the_fix(datasets_dir, name):
    dataset = ADAPTATION_DATASETS[name]
    folder = os.path.join(str(datasets_dir), dataset.folder)
    split_file = os.path.join(folder, "ImageSets", "Main", dataset.split + ".txt")
    with pytest.raises(DatasetNotFoundError) as error:
        check_dataset_available(name)
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, UserInputError)
    assert f"dataset '{name}' not found: expected {split_file} " in message
    assert f"place {dataset.files_description} under {folder} or set DETECTRON2_DATASETS" in message
    assert "datasets/README.md" in message
    # the split file alone is not enough: the next missing folder is named
    os.makedirs(os.path.dirname(split_file))
    open(split_file, "w").close()
    with pytest.raises(DatasetNotFoundError, match=f"expected {os.path.join(folder, 'Annotations')} "):
        check_dataset_available(name)


def test_the_sets_in_place_pass_the_check(benchmarks):
    for name in ADAPTATION_DATASETS:
        check_dataset_available(name)


# -- configs and evaluation ------------------------------------------------------------------------


@pytest.mark.parametrize("config, source, target, tests", [
    ("da_faster_rcnn_R_50_FPN_cityscapes_foggy.yaml", "cityscapes_8cls_train", "foggy_cityscapes_8cls_train",
     ("foggy_cityscapes_8cls_val", "cityscapes_8cls_val")),
    ("da_faster_rcnn_R_50_FPN_sim10k_cityscapes.yaml", "sim10k_car_train", "cityscapes_car_train",
     ("cityscapes_car_val",)),
])
def test_benchmark_configs_adapt_between_the_registered_sets(config, source, target, tests):
    for pruned in (False, True):
        name = config.replace("da_faster", "da_pgp_faster") if pruned else config
        cfg = load_config(os.path.join(CONFIGS, name))
        assert (cfg.MODEL.META_ARCHITECTURE, cfg.DOMAIN_ADAPTATION.ENABLED) == ("DomainAdaptiveRCNN", True)
        assert (tuple(cfg.DATASETS.TRAIN), tuple(cfg.DOMAIN_ADAPTATION.TARGET_DATASETS)) == ((source,), (target,))
        assert tuple(cfg.DATASETS.TEST) == tests
        assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST, cfg.MODEL.RESNETS.DEPTH) == ((600,), 600, 50)
        check_num_classes(cfg, [source, target, *tests])  # NUM_CLASSES agrees with every set's classes
        assert cfg.PRUNING.ENABLED == pruned
        if pruned:
            p = cfg.PRUNING
            assert (p.TARGET.KIND, p.TARGET.FLOPS.REDUCTION, p.CRITERION.NAME) == ("flops", 0.5, "pgp")
            last_step = p.SCHEDULE.END if p.SCHEDULE.UNIT == "iter" else \
                p.SCHEDULE.END * CITYSCAPES_TRAIN_IMAGES / cfg.SOLVER.IMS_PER_BATCH
            assert last_step < cfg.SOLVER.STEPS[0] < cfg.SOLVER.MAX_ITER  # pruned before the rate drops


def test_car_evaluation_scores_cars_only(benchmarks):
    """Detections equal to the val cars score AP50 100, although the files also hold a truck."""
    cfg = load_config(os.path.join(CONFIGS, "da_faster_rcnn_R_50_FPN_sim10k_cityscapes.yaml"))
    evaluator = build_evaluator(cfg, "cityscapes_car_val")
    evaluator.reset()
    for d in DatasetCatalog.get("cityscapes_car_val"):
        instances = Instances((d["height"], d["width"]))
        instances.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32))
        instances.scores = torch.ones(len(d["annotations"]))
        instances.pred_classes = torch.zeros(len(d["annotations"]), dtype=torch.int64)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    result = evaluator.evaluate()["bbox"]
    assert result["AP50"] == pytest.approx(100.0) and list(k for k in result if k.startswith("AP50-")) == ["AP50-car"]


def test_train_net_without_the_data_exits_2_in_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "datasets"
    empty.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "DETECTRON2_DATASETS": str(empty), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
         "--config-file", os.path.join(CONFIGS, "da_faster_rcnn_R_50_FPN_cityscapes_foggy.yaml"),
         "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu"],  # cpu: no notice that CUDA is missing
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    split_file = os.path.join(str(empty), "cityscapes_voc", "ImageSets", "Main", "train.txt")
    assert lines[0].startswith(f"error: dataset 'cityscapes_8cls_train' not found: expected {split_file} "), lines[0]
    assert not out.exists() and not os.listdir(empty)


# -- a user's own pair on the command line ------------------------------------------------------------


def test_custom_target_registered_with_register_voc_trains_without_its_labels(tmp_path):
    """``--register-voc`` for source and target plus ``DOMAIN_ADAPTATION.TARGET_DATASETS``: the
    start-up checks pass, and every batch holds the target's images without their labels."""
    day, night = f"day_train_{next(_names)}", f"night_train_{next(_names)}"
    objects = {"d0": [("car", (2, 2, 20, 20))], "d1": [("person", (5, 1, 12, 30)), ("car", (14, 14, 32, 32))]}
    day_dir = write_voc(tmp_path / "day", {"train": objects})
    night_dir = write_voc(tmp_path / "night", {"train": {"n0": [("car", (1, 1, 9, 9))], "n1": []}}, ".png")
    cfg = load_config(
        os.path.join(CONFIGS, "synthetic", "da_faster_rcnn_R_18_FPN_synth_fog.yaml"),
        ["DATASETS.TRAIN", f"('{day}',)", "DATASETS.TEST", f"('{night}',)",
         "DOMAIN_ADAPTATION.TARGET_DATASETS", f"('{night}',)", "MODEL.ROI_HEADS.NUM_CLASSES", "2",
         "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)",
         "OUTPUT_DIR", str(tmp_path / "out")],
        register_voc=[[day, day_dir, "train", "car,person"], [night, night_dir, "train", "car,person"]])
    cfg.freeze()
    check_training_run(cfg, eval_only=False, resume=False)  # registers both, checks files and classes
    assert not (tmp_path / "out").exists()
    batch = next(iter(build_domain_adaptive_train_loader(cfg)))
    target = [d for d in batch if d["domain"] == TARGET]
    source = [d for d in batch if d["domain"] != TARGET]
    assert len(target) == len(source) == 2
    assert all(d["file_name"].startswith(night_dir) and d["file_name"].endswith(".png") for d in target)
    assert all("instances" not in d and "annotations" not in d for d in target)
    assert all(d["file_name"].startswith(day_dir) and len(d["instances"]) > 0 for d in source)

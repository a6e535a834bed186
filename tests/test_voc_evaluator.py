"""VOC AP: hand-checked curves, difficult objects, and agreement with detectron2's evaluator."""
import os

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, Instances

from pgp_det.evaluation import VOCDetectionEvaluator, average_precision, match_detections


def test_average_precision_by_hand():
    recall = np.array([0.5, 1.0])
    precision = np.array([1.0, 0.5])
    # area: 0.5 of recall at precision 1, then 0.5 at precision 0.5
    assert average_precision(recall, precision, use_11_point=False) == pytest.approx(0.75)
    # 11-point: recall 0..0.5 (6 points) at 1.0, 0.6..1.0 (5 points) at 0.5
    assert average_precision(recall, precision, use_11_point=True) == pytest.approx((6 + 2.5) / 11)


def test_match_difficult_and_duplicates():
    gt = {"a": (np.array([[0, 0, 9, 9], [20, 20, 29, 29]], float), np.array([False, True]))}
    dets = [
        ("a", 0.9, np.array([0, 0, 9, 9], float)),  # true positive
        ("a", 0.8, np.array([0, 0, 9, 9], float)),  # duplicate: false positive
        ("a", 0.7, np.array([20, 20, 29, 29], float)),  # on a difficult object: ignored
        ("b", 0.6, np.array([0, 0, 9, 9], float)),  # image without objects: false positive
    ]
    tp, fp, npos = match_detections(dets, gt, iou_thresholds=(0.5,))
    assert npos == 1
    np.testing.assert_array_equal(tp[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(fp[0], [0, 1, 0, 1])


def _write_voc(root, images):
    os.makedirs(os.path.join(root, "Annotations"))
    os.makedirs(os.path.join(root, "ImageSets", "Main"))
    for image_id, objects in images.items():
        xml_objects = "".join(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for name, b, difficult in objects
        )
        with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
            f.write(f"<annotation><filename>{image_id}.jpg</filename><size><width>100</width>"
                    f"<height>100</height><depth>3</depth></size>{xml_objects}</annotation>")
    with open(os.path.join(root, "ImageSets", "Main", "test.txt"), "w") as f:
        f.write("\n".join(images) + "\n")


def _instances(boxes, scores, classes):
    inst = Instances((100, 100))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return {"instances": inst}


@pytest.mark.parametrize("year", [2007, 2012])
def test_agrees_with_detectron2_voc_evaluator(tmp_path, year):
    rng = np.random.default_rng(year)
    classes = ["cat", "dog"]
    images, outputs = {}, {}
    for i in range(12):
        objects, boxes, scores, labels = [], [], [], []
        for _ in range(rng.integers(0, 4)):
            x, y = rng.integers(1, 60, size=2)
            w, h = rng.integers(10, 35, size=2)
            cls = int(rng.integers(0, 2))
            objects.append((classes[cls], (x, y, x + w, y + h), bool(rng.random() < 0.15)))
            # a detection near the object (0-based coords, as detectron2 predicts them), sometimes wrong
            jitter = rng.integers(-4, 5, size=4)
            boxes.append([x - 1 + jitter[0], y - 1 + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            scores.append(float(rng.random()))
            labels.append(cls if rng.random() < 0.8 else 1 - cls)
        for _ in range(rng.integers(0, 3)):  # background false positives
            x, y = rng.integers(0, 70, size=2)
            boxes.append([x, y, x + 20, y + 20])
            scores.append(float(rng.random()))
            labels.append(int(rng.integers(0, 2)))
        images[f"{i:04d}"] = objects
        outputs[f"{i:04d}"] = _instances(boxes, scores, labels)
    root = str(tmp_path / "voc")
    _write_voc(root, images)
    name = f"_test_voc_agree_{year}"
    MetadataCatalog.get(name).set(dirname=root, split="test", year=year, thing_classes=classes)

    ours, theirs = VOCDetectionEvaluator(name), PascalVOCDetectionEvaluator(name)
    for evaluator in (ours, theirs):
        evaluator.reset()
        for image_id, out in outputs.items():
            evaluator.process([{"image_id": image_id}], [out])
    mine, reference = ours.evaluate()["bbox"], theirs.evaluate()["bbox"]
    # detectron2 rounds scores to 3 decimals; both rank our distinct random scores the same way
    key = "AP50" if year == 2007 else "AP50_area"
    assert mine[key] == pytest.approx(reference["AP50"], abs=1e-6)
    assert 0 < mine["AP"] < mine["AP50_area"] <= 100
    assert set(mine) >= {"AP", "AP50", "AP50_area", "AP75", "AP50-cat", "AP50-dog"}


def test_perfect_detections_score_100(tmp_path):
    root = str(tmp_path / "voc")
    _write_voc(root, {"0": [("cat", (11, 21, 40, 60), False)], "1": [("cat", (5, 5, 30, 30), True)]})
    name = "_test_voc_perfect"
    MetadataCatalog.get(name).set(dirname=root, split="test", year=2007, thing_classes=["cat"])
    evaluator = VOCDetectionEvaluator(name)
    evaluator.reset()
    evaluator.process([{"image_id": "0"}], [_instances([[10, 20, 40, 60]], [0.9], [0])])
    result = evaluator.evaluate()["bbox"]
    assert result["AP50"] == pytest.approx(100)
    assert result["AP"] == pytest.approx(100)

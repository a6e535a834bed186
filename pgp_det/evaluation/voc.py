"""PASCAL VOC box AP computed in memory from a dataset's VOC annotation files."""
import logging
import os
import xml.etree.ElementTree as ET
from collections import OrderedDict, defaultdict
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["VOCDetectionEvaluator", "average_precision", "match_detections"]

IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))


def average_precision(recall: np.ndarray, precision: np.ndarray, use_11_point: bool) -> float:
    """AP from a precision/recall curve ordered by decreasing score.

    Args:
        recall, precision: float arrays of shape (D,), one entry per detection.
        use_11_point: VOC2007 metric (mean of the interpolated precision at recall 0, 0.1, ..., 1)
            when True, otherwise the area under the monotone precision envelope (VOC2010+).
    Returns:
        AP in [0, 1].
    """
    if use_11_point:
        points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    r = np.concatenate(([0.0], recall, [1.0]))
    p = np.concatenate(([0.0], precision, [0.0]))
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope: best precision at any higher recall
    steps = np.where(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _iou_voc(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) against gts (G, 4), VOC's inclusive-pixel convention (+1 on sizes)."""
    iw = np.minimum(box[2], gts[:, 2]) - np.maximum(box[0], gts[:, 0]) + 1.0
    ih = np.minimum(box[3], gts[:, 3]) - np.maximum(box[1], gts[:, 1]) + 1.0
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    gt_areas = (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0)
    return inter / (area + gt_areas - inter)


def match_detections(
    detections: List[Tuple[str, float, np.ndarray]],
    ground_truth: Dict[str, Tuple[np.ndarray, np.ndarray]],
    iou_thresholds=IOU_THRESHOLDS,
) -> Tuple[np.ndarray, np.ndarray, int]:
    """Greedy VOC matching of one class's detections, at several IoU thresholds at once.

    Args:
        detections: (image_id, score, box (4,) xyxy in VOC 1-based pixels).
        ground_truth: image_id -> (boxes (G, 4), difficult (G,) bool).
        iou_thresholds: T thresholds; a detection matches when IoU > threshold.
    Returns:
        tp, fp: float arrays (T, D) over detections sorted by decreasing score (a detection
        matched to a difficult object counts as neither), and the number of non-difficult objects.
    """
    num_positive = int(sum((~difficult).sum() for _, difficult in ground_truth.values()))
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    tp = np.zeros((len(thresholds), len(order)))
    fp = np.zeros((len(thresholds), len(order)))
    taken = {img: np.zeros((len(thresholds), len(gt[0])), dtype=bool) for img, gt in ground_truth.items()}
    for rank, det_index in enumerate(order):
        image_id, _, box = detections[det_index]
        gt_boxes, difficult = ground_truth.get(image_id, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(gt_boxes) == 0:
            fp[:, rank] = 1
            continue
        ious = _iou_voc(box, gt_boxes)
        best = int(np.argmax(ious))
        for t, threshold in enumerate(thresholds):
            if ious[best] <= threshold:
                fp[t, rank] = 1
            elif difficult[best]:
                continue
            elif not taken[image_id][t, best]:
                tp[t, rank] = 1
                taken[image_id][t, best] = True
            else:
                fp[t, rank] = 1
    return tp, fp, num_positive


def read_voc_annotation(path: str) -> List[Tuple[str, np.ndarray, bool]]:
    """Objects of one VOC XML file: (class name, box (4,) xyxy 1-based pixels, difficult)."""
    objects = []
    for obj in ET.parse(path).findall("object"):
        bndbox = obj.find("bndbox")
        box = np.array([float(bndbox.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        difficult = obj.find("difficult")
        objects.append((obj.find("name").text.strip(), box, difficult is not None and int(difficult.text) == 1))
    return objects


class VOCDetectionEvaluator(DatasetEvaluator):
    """PASCAL VOC box AP of a dataset in VOC layout (metadata ``dirname``, ``split``, ``thing_classes``).

    Reports, in percent: ``AP50`` (VOC2007 11-point metric, the VOC07 test convention),
    ``AP50_area`` (all-point area, VOC2010+), ``AP75`` and ``AP`` (area AP averaged over IoU
    0.50:0.05:0.95), and ``AP50-<class>`` per class. Difficult objects neither count as positives
    nor penalise detections matching them. Must be called on all ranks (it gathers predictions).
    """

    def __init__(self, dataset_name: str):
        meta = MetadataCatalog.get(dataset_name)
        self._dataset_name = dataset_name
        self._class_names = list(meta.thing_classes)
        self._annotation_dir = os.path.join(meta.dirname, "Annotations")
        self._image_set_file = os.path.join(meta.dirname, "ImageSets", "Main", meta.split + ".txt")
        self._logger = logging.getLogger(__name__)

    def reset(self):
        self._detections = defaultdict(list)  # class index -> [(image_id, score, box)]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            instances = out["instances"].to(torch.device("cpu"))
            boxes = instances.pred_boxes.tensor.numpy().astype(np.float64)
            boxes[:, :2] += 1  # detectron2's VOC loader subtracts 1 from xmin/ymin; undo it
            for box, score, cls in zip(boxes, instances.scores.tolist(), instances.pred_classes.tolist()):
                self._detections[cls].append((str(inp["image_id"]), score, box))

    def _load_ground_truth(self) -> Dict[int, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
        with open(self._image_set_file) as f:
            image_ids = [line.strip() for line in f if line.strip()]
        per_class = {c: {} for c in range(len(self._class_names))}
        index = {name: c for c, name in enumerate(self._class_names)}
        for image_id in image_ids:
            objects = read_voc_annotation(os.path.join(self._annotation_dir, image_id + ".xml"))
            for c in per_class:
                mine = [(box, difficult) for name, box, difficult in objects if index.get(name) == c]
                boxes = np.array([b for b, _ in mine]).reshape(-1, 4)
                per_class[c][image_id] = (boxes, np.array([d for _, d in mine], dtype=bool))
        return per_class

    def evaluate(self):
        gathered = comm.gather(self._detections, dst=0)
        if not comm.is_main_process():
            return None
        detections = defaultdict(list)
        for part in gathered:
            for cls, dets in part.items():
                detections[cls].extend(dets)
        ground_truth = self._load_ground_truth()

        ap_11 = {}
        ap_area = {}  # class -> (T,) area AP per IoU threshold
        for c, name in enumerate(self._class_names):
            tp, fp, num_positive = match_detections(detections[c], ground_truth[c])
            if num_positive == 0:
                self._logger.warning(f"{self._dataset_name}: class '{name}' has no non-difficult object; skipped")
                continue
            tp, fp = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
            recall = tp / num_positive
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            ap_11[name] = average_precision(recall[0], precision[0], use_11_point=True)
            ap_area[name] = np.array(
                [average_precision(recall[t], precision[t], use_11_point=False) for t in range(len(IOU_THRESHOLDS))]
            )
        if not ap_11:
            return OrderedDict(bbox={"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")})
        area = np.stack(list(ap_area.values()))  # (classes, T)
        result = OrderedDict(
            AP=100 * float(area.mean()),
            AP50=100 * float(np.mean(list(ap_11.values()))),
            AP50_area=100 * float(area[:, 0].mean()),
            AP75=100 * float(area[:, IOU_THRESHOLDS.index(0.75)].mean()),
        )
        for name, value in ap_11.items():
            result[f"AP50-{name}"] = 100 * value
        return OrderedDict(bbox=result)

"""Choose the evaluator a dataset calls for."""
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from .voc import VOCDetectionEvaluator


def build_evaluator(cfg, dataset_name: str, output_folder: str = None) -> DatasetEvaluator:
    """VOC-layout datasets get :class:`VOCDetectionEvaluator`, COCO-layout ones COCO AP (pycocotools).

    Raises:
        ValueError: the dataset's metadata names no evaluator this project supports.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type == "pascal_voc":
        return VOCDetectionEvaluator(dataset_name)
    if evaluator_type == "coco":
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # the fast C++ COCOeval needs detectron2's compiled extension; pycocotools' is exact too
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder, use_fast_impl=False)
    raise ValueError(
        f"dataset '{dataset_name}' has evaluator_type={evaluator_type!r}: register it in VOC or COCO "
        "layout (see datasets/README.md) so an evaluator can be chosen"
    )

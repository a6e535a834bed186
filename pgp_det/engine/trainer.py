"""A ``DefaultTrainer`` that picks evaluators from dataset metadata."""
from detectron2.engine import DefaultTrainer

from ..evaluation import build_evaluator


class Trainer(DefaultTrainer):
    """detectron2's default training loop; evaluators follow each dataset's ``evaluator_type``."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def train(self):
        """Run training; return the last evaluation's results (detectron2 returns them only when
        ``TEST.EXPECTED_RESULTS`` is set)."""
        super().train()
        return getattr(self, "_last_eval_results", None)

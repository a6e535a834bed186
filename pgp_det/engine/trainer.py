"""A ``DefaultTrainer`` that evaluates by dataset type, checkpoints pruned models, and prunes
while training when ``PRUNING.ENABLED``."""
import math
import weakref

from detectron2.engine import DefaultTrainer, HookBase

from ..checkpoint import PrunedCheckpointer
from ..data.domains import build_domain_adaptive_train_loader
from ..evaluation import build_evaluator
from ..pruning.hook import PGPHook, iterations_per_epoch
from ..utils.modules import rewrap_model, unwrap_model


class Trainer(DefaultTrainer):
    """detectron2's default training loop, plus:

    * evaluators follow each dataset's ``evaluator_type`` (VOC or COCO);
    * checkpoints record the pruned architecture and are written atomically
      (:class:`pgp_det.checkpoint.PrunedCheckpointer`), so ``--resume`` rebuilds a pruned model;
    * a :class:`pgp_det.pruning.hook.PGPHook` runs when ``cfg.PRUNING.ENABLED``, before the
      periodic checkpointer so that a checkpoint taken at a pruning iteration holds its result;
    * with ``DOMAIN_ADAPTATION.ENABLED`` each batch holds source and unlabelled target images;
    * checkpoints carry the optimizer's state (momentum), which detectron2 0.6's
      ``DefaultTrainer`` leaves out, so ``--resume`` continues as the run would have.
    """

    def __init__(self, cfg, *, trusted_weights: bool = False):
        """``trusted_weights``: allow ``MODEL.WEIGHTS`` files that pickle Python objects (runs code
        they hold; see :mod:`pgp_det.utils.safe_load`)."""
        super().__init__(cfg)
        self.checkpointer = PrunedCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trusted=trusted_weights, trainer=weakref.proxy(self)
        )
        # the periodic checkpointer was built with detectron2's checkpointer: point it at ours
        for hook in self._hooks:
            if hasattr(hook, "checkpointer"):
                hook.checkpointer = self.checkpointer

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader; with ``DOMAIN_ADAPTATION.ENABLED``, source and target images in
        each batch (:func:`pgp_det.data.domains.build_domain_adaptive_train_loader`)."""
        if cfg.DOMAIN_ADAPTATION.ENABLED:
            return build_domain_adaptive_train_loader(cfg)
        return super().build_train_loader(cfg)

    def build_hooks(self):
        hooks = super().build_hooks()
        if self.cfg.DOMAIN_ADAPTATION.ENABLED and self.cfg.DOMAIN_ADAPTATION.REVERSAL_RAMP > 0:
            hooks.insert(1, ReversalWeightRamp(self.cfg.DOMAIN_ADAPTATION.REVERSAL_WEIGHT,
                                               self.cfg.DOMAIN_ADAPTATION.REVERSAL_RAMP, self.cfg.SOLVER.MAX_ITER))
        if self.cfg.PRUNING.ENABLED:
            epoch = iterations_per_epoch(self.cfg) if self.cfg.PRUNING.SCHEDULE.UNIT == "epoch" else None
            # after LRScheduler (index 1), before PreciseBN, checkpointing and evaluation
            hooks.insert(2, PGPHook(self.cfg, epoch))
        return hooks

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.checkpointer.architecture_changed:
            # the checkpoint shrank the model inside its DDP wrapper (if any): wrap the smaller model anew
            rewrap_model(self)

    def state_dict(self):
        state = super().state_dict()
        state["_trainer"] = self._trainer.state_dict()  # the optimizer's state
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # checkpoints written before it was saved have none
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def train(self):
        """Run training; return the last evaluation's results (detectron2 returns them only when
        ``TEST.EXPECTED_RESULTS`` is set)."""
        super().train()
        return getattr(self, "_last_eval_results", None)


def reversal_weight_at(iteration: int, max_iter: int, weight: float, steepness: float) -> float:
    """``weight * (2 / (1 + exp(-steepness * p)) - 1)``, ``p = iteration / max_iter``: 0 at the
    start, close to ``weight`` at the end (Ganin and Lempitsky's schedule, steepness 10)."""
    progress = min(max(iteration / max(max_iter, 1), 0.0), 1.0)
    return weight * (2.0 / (1.0 + math.exp(-steepness * progress)) - 1.0)


class ReversalWeightRamp(HookBase):
    """Sets the domain-adaptive model's gradient reversal weight before each step
    (``DOMAIN_ADAPTATION.REVERSAL_RAMP``, :func:`reversal_weight_at`). It is a function of the
    iteration alone, so a resumed run continues the ramp where it stopped."""

    def __init__(self, weight: float, steepness: float, max_iter: int):
        self.weight, self.steepness, self.max_iter = weight, steepness, max_iter

    def before_step(self):
        weight = reversal_weight_at(self.trainer.iter, self.max_iter, self.weight, self.steepness)
        unwrap_model(self.trainer.model).reversal_weight = weight
        self.trainer.storage.put_scalar("da/reversal_weight", weight, smoothing_hint=False)

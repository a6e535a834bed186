"""Helpers on torch modules shared across pgp_det."""
from typing import Tuple

import torch
from torch import nn

__all__ = ["TensorDetector", "rewrap_model", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The detector inside (Distributed)DataParallel wrappers, or ``model`` itself. Channel-group
    records name modules relative to it."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class TensorDetector(nn.Module):
    """A detectron2 GeneralizedRCNN as ``image (3, H, W) -> (boxes, scores, classes)``: what
    :mod:`pgp_det.export` exports and what FLOPs are counted on (see :mod:`pgp_det.export`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        instances = self.model.inference([{"image": image}], do_postprocess=False)[0]
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def rewrap_model(trainer) -> nn.Module:
    """Wrap the model a detectron2 trainer trains in a new DistributedDataParallel after its
    architecture changed (hard pruning, a pruned checkpoint loaded), and point every holder of the
    old wrapper at the new one. The one place this is done.

    The old wrapper still holds the parameters the model had when it was built, so it must not
    run again. Holders updated: the training loop's model (``trainer._trainer.model`` of a
    ``DefaultTrainer``; ``trainer.model`` when it is a separate attribute), every hook that keeps
    it as ``_model`` or ``model`` (detectron2's ``PreciseBN`` keeps ``_model``), and the model of
    ``trainer.checkpointer`` and of every hook's ``checkpointer`` (the periodic checkpointer),
    which hold the unwrapped model as fvcore's checkpointers do.

    Args:
        trainer: a detectron2 ``DefaultTrainer`` (or ``SimpleTrainer``), or a weak proxy to one.

    Returns:
        the model the trainer now trains: the new wrapper, or the model as it was when it is not
        wrapped in DistributedDataParallel (nothing is changed then).
    """
    from detectron2.engine.defaults import create_ddp_model

    loop = getattr(trainer, "_trainer", trainer)
    old = loop.model
    if not isinstance(old, nn.parallel.DistributedDataParallel):
        return old
    module = unwrap_model(old)
    new = create_ddp_model(
        module, broadcast_buffers=old.broadcast_buffers, find_unused_parameters=old.find_unused_parameters
    )
    loop.model = new
    if getattr(trainer, "model", None) is old:  # an attribute of its own, not DefaultTrainer's property
        trainer.model = new
    hooks = list(getattr(trainer, "_hooks", ()))
    for hook in hooks:
        held = getattr(hook, "__dict__", {})  # attributes only: never a property such as PGPHook.model
        for name in ("_model", "model"):
            if held.get(name) is old:
                setattr(hook, name, new)
    for checkpointer in [getattr(trainer, "checkpointer", None)] + [getattr(h, "checkpointer", None) for h in hooks]:
        held = getattr(checkpointer, "model", None)
        if held is not None and unwrap_model(held) is module:
            checkpointer.model = module
    return new

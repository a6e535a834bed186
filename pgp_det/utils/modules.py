"""Helpers on torch modules shared across pgp_det."""
from torch import nn

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The detector inside (Distributed)DataParallel wrappers, or ``model`` itself. Channel-group
    records name modules relative to it."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model

"""Deploy-time folding of frozen or evaluated batch norms into the convolutions before them.

At inference a batch norm is a per-channel affine map ``y = a * x + b`` with
``a = gamma / sqrt(var + eps)`` and ``b = beta - a * mean``. Applied to a convolution's output
channel ``c`` (weight ``W[c]``, bias ``w0[c]``, or none) it is the same as the convolution with

    W'[c] = a[c] * W[c]        w0'[c] = a[c] * w0[c] + b[c]

and no norm. Runtimes (ONNX Runtime, TensorRT) do this themselves; :func:`fold_norms` does it in
PyTorch, so that speed measured in PyTorch does not pay a cost no deployment pays. Outputs stay
equal up to float rounding (the product is computed in float64, then rounded once).

What is folded: detectron2 :class:`~detectron2.layers.Conv2d` layers whose ``norm`` is a
:class:`~detectron2.layers.FrozenBatchNorm2d`, or a ``torch.nn`` batch norm in eval mode (its
running statistics are what inference uses). Group norms, and batch norms of a model in training
mode, depend on the input's statistics and stay. The model's architecture (channel widths) is
unchanged; only the norm modules are gone, so fold after pruning, for measuring or export, and
never before training or pruning.
"""
from typing import List

import torch
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

__all__ = ["fold_norms"]

_FOLDABLE = (FrozenBatchNorm2d, nn.BatchNorm2d, nn.SyncBatchNorm)


def _affine(norm: nn.Module):
    """``(a, b)`` float64 (C,) of the norm's inference-time map ``a * x + b``."""
    scale = norm.weight.detach().double() if norm.weight is not None else torch.ones_like(norm.running_var).double()
    shift = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(norm.running_mean).double()
    a = scale / torch.sqrt(norm.running_var.detach().double() + norm.eps)
    return a, shift - a * norm.running_mean.detach().double()


@torch.no_grad()
def fold_norms(model: nn.Module) -> List[str]:
    """Fold every foldable norm into the convolution it follows, in place (see the module
    docstring).

    Args:
        model: a detector (or any module) to run at inference; batch norms still in training
            mode are left as they are.

    Returns:
        the names of the convolutions whose norm was folded, in module order.
    """
    folded = []
    for name, module in model.named_modules():
        norm = getattr(module, "norm", None)
        if not isinstance(module, Conv2d) or not isinstance(norm, _FOLDABLE):
            continue
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and (norm.training or norm.running_mean is None):
            continue  # normalises with the batch's own statistics: not a fixed map
        a, b = _affine(norm)
        weight = module.weight
        weight.copy_((weight.double() * a.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype))
        bias = b if module.bias is None else a * module.bias.double() + b
        module.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
        module.norm = None
        folded.append(name)
    return folded

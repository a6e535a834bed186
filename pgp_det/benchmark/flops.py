"""FLOPs and parameter counts of a Faster R-CNN, in total and per part of the network.

FLOPs follow fvcore's convention (one fused multiply-add is one FLOP; ops without a formula
count zero), counted per module by :func:`pgp_det.utils.flops.module_flops`.
"""
from typing import Dict

import torch

from ..utils.flops import FAMILIES, family_of, module_flops

__all__ = ["FAMILIES", "family_of", "count_flops", "count_parameters"]


def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    """Number of parameters: ``{"total": n, "backbone": n, "fpn": n, "rpn": n, "roi_heads": n}``."""
    counts = {name: 0 for name in ("total",) + FAMILIES}
    for name, p in model.named_parameters():
        family = family_of(name)
        counts["total"] += p.numel()
        counts[family] = counts.get(family, 0) + p.numel()
    return counts


def count_flops(model: torch.nn.Module, height: int, width: int) -> dict:
    """GFLOPs of one inference on a (height, width) input, and parameter counts.

    The dummy input is a (3, height, width) zero image fed without resizing; the RPN keeps its
    full proposal budget (see :func:`pgp_det.utils.flops.full_proposal_budget`) so the figure depends only on the
    architecture and the input size.

    Returns:
        ``{"gflops": float, "gflops_per_family": {family: float}, "params": int,
        "params_per_family": {family: int}, "input_size": [height, width]}`` with the families of
        :data:`FAMILIES` (plus "other" where anything falls outside them).
    """
    by_module, total = module_flops(model, height, width)
    per_family = {name: 0.0 for name in FAMILIES}
    for name, flops in by_module.items():
        if "." not in name:  # top-level children hold their submodules' FLOPs
            per_family[family_of(name)] = per_family.get(family_of(name), 0.0) + flops
    if "backbone.bottom_up" in by_module:
        # "backbone" above holds bottom-up + FPN: move the bottom-up share to its own family
        per_family["fpn"] -= by_module["backbone.bottom_up"]
        per_family["backbone"] += by_module["backbone.bottom_up"]
    params = count_parameters(model)
    return {
        "gflops": total / 1e9,
        "gflops_per_family": {k: v / 1e9 for k, v in per_family.items()},
        "params": params["total"],
        "params_per_family": {k: v for k, v in params.items() if k != "total"},
        "input_size": [int(height), int(width)],
    }

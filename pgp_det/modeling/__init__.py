"""Model components registered with detectron2's registries (importing ``pgp_det.modeling`` registers them)."""
from .domain_adaptation import DomainAdaptiveRCNN
from .fold_norms import fold_norms
from .rpn import SelectThenDecodeRPN

__all__ = ["DomainAdaptiveRCNN", "SelectThenDecodeRPN", "fold_norms"]

"""Model components registered with detectron2's registries (importing ``pgp_det.modeling`` registers them)."""
from .domain_adaptation import DomainAdaptiveRCNN
from .rpn import SelectThenDecodeRPN

__all__ = ["DomainAdaptiveRCNN", "SelectThenDecodeRPN"]

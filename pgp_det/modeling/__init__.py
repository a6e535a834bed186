"""Model components registered with detectron2's registries (importing ``pgp_det.modeling`` registers them)."""
from .rpn import SelectThenDecodeRPN

__all__ = ["SelectThenDecodeRPN"]

"""pgp_det: prune detectron2's Faster R-CNN while it trains, and measure what it buys."""
__version__ = "0.1.0"

import warnings as _warnings

# detectron2 v0.6 calls torch.jit.script at import time, which recent torch releases deprecate; the
# warning is about detectron2, not the user's run, and would break the tools' one-line errors
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

import logging as _logging

# torch logs "No CUDA runtime is found" when detectron2 imports its extension helpers on a machine
# without CUDA: nothing a CPU run needs (it would also break the one-line errors)
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

# The front door, as detectron2's projects have it (``from pgp_det import add_pgp_config, PGPHook``).
# Each name is imported on first use, so that ``import pgp_det.config`` stays a leaf that loads no
# model code and registers no dataset.
_EXPORTS = {
    "add_pgp_config": "pgp_det.config",
    "PGPHook": "pgp_det.pruning.hook",
    "Trainer": "pgp_det.engine.trainer",
    "derive_channel_groups": "pgp_det.pruning.dependency",
    "ChannelGroup": "pgp_det.pruning.groups",
    "soft_prune": "pgp_det.pruning.surgery",
    "hard_prune": "pgp_det.pruning.surgery",
    "CRITERION_REGISTRY": "pgp_det.pruning.criteria",
    "SCHEDULE_REGISTRY": "pgp_det.pruning.schedules",
    "ALLOCATION_REGISTRY": "pgp_det.pruning.allocation",
    "LatencyTable": "pgp_det.latency.table",
    "load_model": "pgp_det.checkpoint",
    "PrunedCheckpointer": "pgp_det.checkpoint",
    "SelectThenDecodeRPN": "pgp_det.modeling.rpn",
    "DomainAdaptiveRCNN": "pgp_det.modeling.domain_adaptation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pgp_det' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

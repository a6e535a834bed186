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
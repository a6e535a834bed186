"""Checks on ``MODEL.WEIGHTS`` before a run starts."""
import os

from detectron2.utils.file_io import PathManager

from ..errors import UserInputError

_REMOTE_PREFIXES = ("detectron2://", "http://", "https://", "catalog://")


def check_weights_available(path: str) -> str:
    """Return a local path for ``path``, fetching remote weights once if the network allows.

    Raises:
        UserInputError: a local file is missing, or remote weights cannot be fetched.
    """
    if path.startswith(_REMOTE_PREFIXES):
        try:
            return PathManager.get_local_path(path)
        except Exception as e:  # iopath raises whatever its HTTP handler hits
            raise UserInputError(
                f"cannot fetch MODEL.WEIGHTS {path} ({type(e).__name__}): download it on a connected "
                "machine, place it locally and pass MODEL.WEIGHTS /path/to/file, or MODEL.WEIGHTS '' "
                "to train from scratch"
            ) from None
    if not os.path.isfile(path):
        raise UserInputError(f"MODEL.WEIGHTS file '{path}' does not exist")
    return path

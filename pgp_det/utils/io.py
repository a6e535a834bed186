"""Atomic file writes: a reader (or a crash) never sees half a file, and a failed write keeps the old one."""
import json
import math
import os
import tempfile
from typing import Callable

__all__ = ["TEMPORARY_SUFFIX", "atomic_write", "atomic_write_text", "atomic_write_json"]

# temporary files are named ".<target name>.<random>.pgp_det.tmp"; a process killed mid-write
# leaves one, which the next run in that folder removes (utils.output_dir.remove_stale_temporaries)
TEMPORARY_SUFFIX = ".pgp_det.tmp"


def current_umask() -> int:
    """The process's umask (reading it needs setting it; it is restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write_to_file: Callable[[str], None]) -> str:
    """Call ``write_to_file(tmp_path)`` on a temporary file beside ``path``, then move it onto ``path``.

    If ``write_to_file`` raises, ``path`` is untouched and the temporary file is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=TEMPORARY_SUFFIX)
    os.close(fd)
    try:
        write_to_file(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_json(obj, path: str) -> str:
    """Write ``obj`` as indented JSON; non-finite floats (not JSON) become ``null``."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return atomic_write_text(path, json.dumps(clean(obj), indent=2) + "\n")

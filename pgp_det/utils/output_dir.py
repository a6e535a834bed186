"""Output folders that runs cannot share by accident: checks before writing, a lock while in use.

A run (training, evaluation, pruning, export) checks its output folder before it writes anything
(:func:`check_output_dir`), then holds :class:`OutputDirLock` on it for as long as it runs: a
second run pointed at the same folder fails at once with one line naming the holder. Once the
lock is held, temporary files that killed runs left behind (:func:`remove_stale_temporaries`)
are removed: no live writer can own them any more.
"""
import json
import logging
import os
import socket
import sys
import time
from typing import List, Optional

from ..errors import UserInputError
from .io import TEMPORARY_SUFFIX

__all__ = ["LOCK_FILE", "OutputDirLock", "check_output_dir", "claim_output_dir", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".pgp_det.lock"  # inside the output folder; its content names the holder


def _nearest_existing(path: str) -> str:
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def check_output_dir(path: str, option: str = "OUTPUT_DIR") -> None:
    """Raise unless ``path`` is (or can be created as) a folder this process can write into.

    Writes nothing. ``option`` names the setting in the message (``OUTPUT_DIR``, ``--output``).

    Raises:
        UserInputError: ``path`` is empty, is a file, lies under a file, or is not writable.
    """
    if not path:
        raise UserInputError(f"{option} is empty: give a folder for the run's files")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"{option} '{path}' is a file, not a folder: choose a folder path")
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise UserInputError(f"{option} '{path}' lies under the file '{existing}': choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} '{path}': cannot write into '{existing}' (permission denied); choose another folder")


class OutputDirLock:
    """An exclusive lock on an output folder, held from :meth:`acquire` to :meth:`release`.

    The lock is an ``flock`` on ``<folder>/.pgp_det.lock``: the operating system drops it when
    the holding process dies, so a killed run never leaves the folder locked. The file records
    the holder (pid, host, command, start time) for the message other runs print, and is removed
    when the lock is released (a killed run leaves it behind, unlocked and harmless).

    As a context manager it releases the lock on exit, whatever happened inside.
    """

    def __init__(self, directory: str, option: str = "OUTPUT_DIR"):
        self.directory = directory
        self.option = option
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    @property
    def path(self) -> str:
        return os.path.join(self.directory, LOCK_FILE)

    def acquire(self) -> "OutputDirLock":
        """Create the folder if needed and lock it.

        Raises:
            UserInputError: another process holds the lock (the message names it).
        """
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs are not protected from each other
            return self
        try:
            os.makedirs(self.directory, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as e:  # e.g. under /proc, or a read-only mount os.access cannot see
            raise UserInputError(
                f"{self.option} '{self.directory}' cannot be created or written ({e.strerror or e}): choose another "
                f"{self.option}") from None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = _describe_holder(handle.read())
                handle.close()
                raise UserInputError(
                    f"{self.option} '{self.directory}' is in use by another run ({holder}): wait for it to end, "
                    f"or choose another {self.option}"
                ) from None
            # the holder before us unlinks the file as it releases: lock the file that is there now
            try:
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
            handle = open(self.path, "a+")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            try:
                os.remove(self.path)  # while still locked, so no one else holds this file
            except OSError:
                pass
            self._file.close()  # closing drops the flock
            self._file = None

    def start_writing(self) -> None:
        """Acquire the lock (creating the folder) unless held, and remove the temporary files
        killed runs left in the folder: call once every check has passed, before writing."""
        if not self.held:
            self.acquire()
        for path in remove_stale_temporaries(self.directory):
            logger.info("removed %s, left by a run that was killed while writing it", path)

    def __enter__(self) -> "OutputDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_output_dir(directory: str, option: str = "OUTPUT_DIR") -> OutputDirLock:
    """Check ``directory`` (:func:`check_output_dir`) and, if it exists, lock it now, so that a
    folder in use is refused before any slower check. Writes nothing but the lock file of an
    existing folder, which goes when the lock is released. Use::

        with claim_output_dir(path, "--output") as output:
            ...  # every other check
            output.start_writing()  # locks a folder made now; removes stale temporary files
            ...  # write

    Raises:
        UserInputError: the folder is unusable, or another run holds it.
    """
    check_output_dir(directory, option)
    lock = OutputDirLock(directory, option)
    if os.path.isdir(directory):
        lock.acquire()
    return lock


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def remove_stale_temporaries(directory: str, keep: Optional[List[str]] = None) -> List[str]:
    """Delete the temporary files :func:`pgp_det.utils.io.atomic_write` leaves when a process is
    killed mid-write, anywhere under ``directory``; returns their paths.

    Call only while holding :class:`OutputDirLock` on ``directory`` (so no live writer owns them).
    """
    removed = []
    keep = set(keep or ())
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith(".") and name.endswith(TEMPORARY_SUFFIX) and path not in keep:
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    pass  # someone else's file we may not remove: leave it
    return removed

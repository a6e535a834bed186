"""Keep the memory a CPU process frees, so that timings do not include the operating system's page
faults.

PyTorch's CPU tensors come from the C library's ``malloc``. By default glibc takes every block
above a threshold (128 KiB at first, adapting up to 32 MiB) straight from the operating system and
gives it back when it is freed (``mmap``; smaller blocks too when the heap's top is trimmed), so a
detector at a large input maps fresh pages for most of its activations at every inference and
faults each 4 KiB page in again (the synthetic R18-FPN at 800x800 on a 2-core virtual machine:
about 49,000 page faults per inference, a fifth of its time). A layer timed alone reuses the same
few blocks call after call and faults nothing, so a latency table of such layers misses that time
in a way that depends on which activations cross the threshold. :func:`keep_freed_memory` sets
glibc's ``M_MMAP_MAX`` to 0 and ``M_TRIM_THRESHOLD`` to its largest value: freed memory stays in
the process and later inferences reuse it (the first few may still grow the heap: measured, up to
nine allocations of one 12 MiB block before freed ones were reused). A deployment gets the same from the environment
before it starts (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``) or from an allocator
that caches.
"""
import ctypes
import platform
from typing import Callable, Optional

try:
    import resource
except ImportError:  # not a Unix
    resource = None

from ..errors import UserInputError

__all__ = [
    "ENVIRONMENT", "freed_memory_kept", "keep_freed_memory", "minor_page_faults",
    "page_faults_per_call",
]

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_LARGEST_INT = 2**31 - 1
ENVIRONMENT = f"MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_={_LARGEST_INT}"

_kept = False


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has run in this process."""
    return _kept


def minor_page_faults() -> Optional[int]:
    """The process's minor page faults so far (pages mapped in without reading a disk); None where
    the platform does not count them."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def page_faults_per_call(fn: Callable[[], object]) -> float:
    """Minor page faults during one ``fn()`` call after a first, uncounted one; 0 where the
    platform does not count them. It has a timer's form (``fn -> number``), so that helpers that
    time a model with a timer count its page faults with this one."""
    fn()
    before = minor_page_faults()
    fn()
    return 0.0 if before is None else float(minor_page_faults() - before)


def keep_freed_memory() -> None:
    """From now on, the process keeps the memory it frees (see the module docstring). It cannot be
    undone; calling it again does nothing.

    Raises:
        UserInputError: the C library is not glibc, or it refuses the settings.
    """
    global _kept
    if _kept:
        return
    library, _ = platform.libc_ver()
    libc = ctypes.CDLL(None) if library == "glibc" else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise UserInputError(
            f"keeping freed memory needs glibc's malloc; this platform's C library is {library or 'unknown'}: "
            f"drop --keep-freed-memory and start the process with a caching allocator instead"
        )
    for parameter, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _LARGEST_INT)):
        if libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            raise UserInputError(f"glibc refused mallopt({parameter}, {value}): drop --keep-freed-memory")
    _kept = True

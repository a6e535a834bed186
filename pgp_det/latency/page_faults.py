"""What a latency table says about the page faults it was profiled with.

On a CPU the profiler records the whole model's minor page faults per inference
(``metadata["page_faults_per_inference"]``) and whether the process kept the memory it frees
(``metadata["environment"]["freed_memory_kept"]``, :mod:`pgp_det.utils.allocator`). Layers
timed alone reuse the same few blocks and fault nothing, so a table of a model that faulted
many pages in per inference, profiled without freed memory kept, misses that time.
"""
from typing import Mapping, Optional

from ..errors import UserInputError
from ..utils.allocator import ENVIRONMENT as ALLOCATOR_ENVIRONMENT

__all__ = ["MANY_PAGE_FAULTS", "check_freed_memory_setting", "page_fault_warning", "profiled_with_freed_memory_kept"]

# page faults per inference worth a word (measured on a 2-core CPU: tens at 224x224, about 49,000
# at 800x800, a fifth of the time there)
MANY_PAGE_FAULTS = 1000


def profiled_with_freed_memory_kept(metadata: Mapping) -> bool:
    """Whether a table with this ``metadata`` was profiled with freed memory kept."""
    return bool(metadata.get("environment", {}).get("freed_memory_kept", False))


def check_freed_memory_setting(metadata: Mapping, kept_here: bool, table: str, timing: str) -> None:
    """Refuse to time a table's model in another memory setting than it was profiled in.

    Args:
        metadata: the table's metadata.
        kept_here: whether the timing about to run keeps freed memory (``--keep-freed-memory``).
        table, timing: how the message names the table and the timing ("this check would run").

    Raises:
        UserInputError: one line naming both settings and whether to pass or drop the flag.
    """
    kept = profiled_with_freed_memory_kept(metadata)
    if kept != kept_here:
        raise UserInputError(f"{table} was profiled {'with' if kept else 'without'} freed memory kept, {timing} "
                             f"{'with' if kept_here else 'without'}: {'pass' if kept else 'drop'} --keep-freed-memory")


def page_fault_warning(table, source: str) -> Optional[str]:
    """One line when ``table``'s whole model faulted many memory pages in per inference while it
    was profiled without freed memory kept (its predictions may miss by their time); else None.
    ``source``: how the table is named in the line."""
    faults = table.metadata.get("page_faults_per_inference", 0)
    if faults < MANY_PAGE_FAULTS or profiled_with_freed_memory_kept(table.metadata):
        return None
    return (f"latency table {source} was profiled while the whole model faulted {faults:.0f} memory pages in per "
            "inference, which its layer timings cannot show: its predictions may miss by that time; profile with "
            f"--keep-freed-memory and deploy with {ALLOCATOR_ENVIRONMENT}")

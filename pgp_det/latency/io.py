"""Latency tables as JSON files: :func:`table_to_dict` / :func:`table_from_dict` for the
format (:data:`~pgp_det.latency.schema.TABLE_FORMAT`, version
:data:`~pgp_det.latency.schema.TABLE_VERSION`), :func:`save_table` / :func:`load_table` for
files. Every problem with a file (missing, unreadable, not JSON, not a table, another version,
malformed) is one :class:`~pgp_det.errors.UserInputError` line naming the file and the fix.
"""
import json
from typing import Any, Mapping

from ..errors import UserInputError
from ..utils.io import atomic_write_json
from .schema import TABLE_FORMAT, TABLE_VERSION
from .table import LatencyEntry, LatencyTable

__all__ = ["entry_to_dict", "load_table", "save_table", "table_from_dict", "table_to_dict"]


def entry_to_dict(entry: LatencyEntry) -> dict:
    """One layer of a table as JSON-ready lists."""
    return {
        "name": entry.name, "kind": entry.kind, "in_group": entry.in_group, "out_group": entry.out_group,
        "in_widths": list(entry.in_widths), "out_widths": list(entry.out_widths),
        "ms": [list(row) for row in entry.ms],
        "proposal_ms": None if entry.proposal_ms is None else list(entry.proposal_ms),
        "in_steps": [list(step) for step in entry.in_steps],
        "out_steps": [list(step) for step in entry.out_steps],
    }


def table_to_dict(table: LatencyTable) -> dict:
    """The table as the JSON object :func:`table_from_dict` reads."""
    return {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "metadata": table.metadata,
        "input_size": list(table.input_size),
        "groups": table.groups,
        "proposals": {
            "reference": table.reference_proposals,
            "counts": list(table.proposal_counts),
            "fixed_ms": list(table.fixed_ms),
        },
        "entries": [entry_to_dict(e) for e in table.entries],
        "rest": {
            "activations": table.activations,
            "activation_ms": table.activation_ms,
            "layer_overhead": table.layer_overhead,
        },
    }


def table_from_dict(data: Mapping[str, Any], source: str = "") -> LatencyTable:
    """The table :func:`table_to_dict` wrote; ``source`` names it in errors and becomes its
    :attr:`~pgp_det.latency.table.LatencyTable.source`.

    Raises:
        UserInputError: not a latency table of this version, or a malformed one (one line).
    """
    where = f"latency table {source}" if source else "latency table"
    if not isinstance(data, Mapping) or data.get("format") != TABLE_FORMAT:
        raise UserInputError(f"{source or 'the file'} is not a pgp_det latency table; make one with tools/profile_latency.py")
    if data.get("version") != TABLE_VERSION:
        raise UserInputError(
            f"{where} has version {data.get('version')!r}, this pgp_det reads version {TABLE_VERSION}; "
            "make it again with tools/profile_latency.py"
        )
    try:
        proposals = data["proposals"]
        rest = data["rest"]
        entries = [
            LatencyEntry(
                name=str(e["name"]), kind=str(e["kind"]),
                in_group=None if e["in_group"] is None else str(e["in_group"]),
                out_group=None if e["out_group"] is None else str(e["out_group"]),
                in_widths=tuple(int(w) for w in e["in_widths"]),
                out_widths=tuple(int(w) for w in e["out_widths"]),
                ms=tuple(tuple(float(v) for v in row) for row in e["ms"]),
                proposal_ms=None if e.get("proposal_ms") is None else tuple(float(v) for v in e["proposal_ms"]),
                in_steps=tuple((int(w), float(ms)) for w, ms in e["in_steps"]),
                out_steps=tuple((int(w), float(ms)) for w, ms in e["out_steps"]),
            )
            for e in data["entries"]
        ]
        return LatencyTable(
            groups=dict(data["groups"]), input_size=data["input_size"], entries=entries,
            proposal_counts=proposals["counts"], fixed_ms=proposals["fixed_ms"],
            reference_proposals=proposals["reference"], metadata=data.get("metadata") or {}, source=source,
            activations=rest["activations"], activation_ms=rest["activation_ms"],
            layer_overhead=rest["layer_overhead"],
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        if isinstance(e, UserInputError):  # one of ours that is also a ValueError: already one line
            raise
        detail = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserInputError(f"{where} is malformed ({detail}); make it again with tools/profile_latency.py") from None


def save_table(table: LatencyTable, path: str) -> str:
    """Write the table as JSON, atomically; returns ``path``."""
    return atomic_write_json(table_to_dict(table), path)


def load_table(path: str) -> LatencyTable:
    """Read a table :func:`save_table` wrote.

    Raises:
        UserInputError: the file is missing, unreadable, not JSON or not a valid table (one line).
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserInputError(f"latency table '{path}' does not exist; make one with tools/profile_latency.py") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read latency table '{path}': {e}") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"latency table '{path}' is not valid JSON ({e.msg} at line {e.lineno})") from None
    return table_from_dict(data, source=path)

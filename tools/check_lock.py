#!/usr/bin/env python
"""Check that the environment holds exactly the versions a lock file pins (``make install`` runs
it after installing; ``make lock`` writes the lock from a scratch environment instead).

    python tools/check_lock.py constraints.txt

Prints one line and exits 2 when a pinned package is missing or at another version; 0 otherwise.
"""
import importlib.metadata
import sys
from typing import Dict, Optional, Tuple


def lock_differences(lock_path: str) -> Dict[str, Tuple[str, Optional[str]]]:
    """``{package: (locked version, installed version or None)}`` for every pin of ``lock_path``
    (``name==version`` lines; comments and other lines ignored) the environment does not match."""
    different = {}
    with open(lock_path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" not in line:
                continue
            name, version = (part.strip() for part in line.split("==", 1))
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                installed = None
            if installed != version:
                different[name] = (version, installed)
    return different


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("error: usage: check_lock.py LOCK_FILE", file=sys.stderr)
        return 2
    try:
        different = lock_differences(args[0])
    except OSError as e:
        print(f"error: cannot read the lock file {args[0]}: {e.strerror}", file=sys.stderr)
        return 2
    if different:
        shown = ", ".join(f"{name} {locked} (installed: {installed or 'none'})"
                          for name, (locked, installed) in sorted(different.items()))
        print(f"error: the environment differs from {args[0]}: {shown}; run `make clean-venv install`",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

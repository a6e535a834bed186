"""Argument handling the command-line tools share: one-line errors, input sizes, overrides, trust."""
import argparse
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import UserInputError
from .allocator import ENVIRONMENT as ALLOCATOR_ENVIRONMENT

__all__ = [
    "OneLineArgumentParser", "add_keep_freed_memory_argument", "add_trust_argument", "check_overrides",
    "parse_arguments", "parse_input_size",
]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``error:`` line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-weights``: the explicit opt-in to load weights files that pickle Python objects."""
    parser.add_argument(
        "--trust-weights", action="store_true",
        help="load weights files that pickle Python objects (legacy checkpoints). Loading such a file runs "
             "code it holds: use only for files from a source you trust. Without it, such files are refused.",
    )


def add_keep_freed_memory_argument(parser: argparse.ArgumentParser) -> None:
    """``--keep-freed-memory``: time with freed memory kept in the process
    (:func:`pgp_det.utils.allocator.keep_freed_memory`)."""
    parser.add_argument(
        "--keep-freed-memory", action="store_true",
        help="CPU: keep the memory the process frees (glibc malloc) so that timings leave out the page faults of "
             f"mapping activations afresh at every inference; deploy with {ALLOCATOR_ENVIRONMENT} to run as timed. "
             "Recorded with the results.",
    )


def check_overrides(parser: argparse.ArgumentParser, opts: Sequence[str]) -> List[str]:
    """Return ``opts`` (trailing ``KEY VALUE`` config overrides) after checking their form.

    argparse hands everything after the first override to ``opts``, so an option written after
    the overrides would silently become a config key; it is refused with a hint to move it.

    Raises:
        UserInputError: an option of ``parser`` among the overrides, or an odd number of items.
    """
    opts = list(opts or [])
    known = {s for action in parser._actions for s in action.option_strings}
    for item in opts:
        flag = item.split("=", 1)[0]
        if flag in known:
            raise UserInputError(
                f"option {flag} comes after the KEY VALUE config overrides, where it would be read as a config key: "
                "move it before the first override"
            )
    if len(opts) % 2:
        raise UserInputError(f"config overrides must be KEY VALUE pairs; got {len(opts)} items: {opts}")
    return opts


def parse_input_size(text: str, option: str = "--input-size", minimum: int = 32) -> Tuple[int, int]:
    """``"HxW"`` (or ``"N"`` for a square) -> ``(H, W)`` in pixels, each at least ``minimum``.

    Raises:
        UserInputError: the text is not one or two integers joined by ``x``, or one is below ``minimum``.
    """
    try:
        size = tuple(int(v) for v in str(text).lower().split("x"))
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2:
        raise UserInputError(f"{option} '{text}': expected HxW in pixels, e.g. 800x1333")
    if min(size) < minimum:
        raise UserInputError(f"{option} '{text}': height and width must each be >= {minimum} pixels")
    return size


def parse_arguments(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], check_args: Callable,
                    build_config: Callable):
    """Parse ``argv``, check the overrides (``args.opts``) and the arguments (``check_args(args)``)
    and build the config (``build_config(args)``), for tools whose ``main`` returns its exit code
    instead of exiting.

    Returns:
        ``(args, cfg, None)``, or ``(None, None, exit code)``: argparse exited (``--help``, or a
        bad argument it has already reported as one line), or a check failed (reported here as
        one ``error:`` line on stderr, exit code 2).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return None, None, e.code if isinstance(e.code, int) else 2
    try:
        check_overrides(parser, args.opts)
        check_args(args)
        return args, build_config(args), None
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, None, 2

"""What the command-line tools share: the "one line, exit 2" wrapper, argument parsing, input
sizes, ``KEY VALUE`` overrides, trust.

Every tool's ``main`` is ``return run_tool(argument_parser(), argv, run)``: ``run(args)`` does
the work and raises :class:`~pgp_det.errors.UserInputError` for bad input, which
:func:`run_tool` prints as one ``error:`` line (newlines inside the message joined) with exit
code 2.
"""
import argparse
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import UserInputError
from .allocator import ENVIRONMENT as ALLOCATOR_ENVIRONMENT

__all__ = [
    "OneLineArgumentParser", "add_keep_freed_memory_argument", "add_trust_argument", "check_overrides", "one_line",
    "parse_input_size", "report_error", "run_tool",
]


def one_line(message) -> str:
    """``message`` as one line: line breaks and runs of white space inside it become one space
    (a library's own message, e.g. the unpickler's, may span lines)."""
    return " ".join(str(message).split())


def report_error(error) -> int:
    """Print ``error`` as one ``error:`` line on stderr; return the exit code of bad input, 2."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return 2


def run_tool(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], run: Callable) -> int:
    """A tool's ``main``: parse ``argv`` with ``parser``, check its trailing ``KEY VALUE``
    overrides (``args.opts``, when the parser has them) and return ``run(args)``'s exit code
    (None: 0).

    Bad input is one line and exit code 2 wherever it is found: argparse's own errors
    (:class:`OneLineArgumentParser`), and any :class:`~pgp_det.errors.UserInputError` that
    ``run`` raises (:func:`report_error`).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument argparse has reported
        return e.code if isinstance(e.code, int) else 2
    try:
        if hasattr(args, "opts"):
            args.opts = check_overrides(parser, args.opts)
        code = run(args)
    except UserInputError as e:
        return report_error(e)
    return 0 if code is None else code


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``error:`` line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {one_line(message)} (see --help)\n")


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

"""Command-line conventions shared by every stage script (no torch import).

Bad input raises :class:`UserError` with a message that names the file, key or value and says what to do;
:func:`run_main` turns it into one ``error: ...`` line on stderr and exit code 2. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or configuration: reported as one clear line, exit code 2."""


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; map :class:`UserError` to a one-line message and exit code 2."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: outputs written so far are complete; rerun to resume", file=sys.stderr)
        return 130
    return EXIT_OK if code is None else int(code)


def setup_logging(level: str | int | None = None) -> logging.Logger:
    """One log format for all stages; level from the argument or $LOG_LEVEL (default INFO)."""
    level = level or os.environ.get("LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    return logging.getLogger("bdd-sdxl")


def warn_deprecated(old: str, new: str, note: str = "") -> None:
    """A ``warning: OLD is deprecated; use NEW`` line on stderr: a renamed flag or config key still works, and says
    what to write instead."""
    print(f"warning: {old} is deprecated; use {new}{f' ({note})' if note else ''}", file=sys.stderr)

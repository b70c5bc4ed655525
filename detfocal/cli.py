"""Shared plumbing for the command-line tools: user mistakes become one line on stderr."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

# Errors a user can cause (a bad path, a bad config key, a bad value). Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; print a user error as ``error: ...`` on one line and return 2.

    Returns:
        The process exit code: ``main``'s return value (0 for None), 2 for a user error,
        130 for Ctrl-C.
    """
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

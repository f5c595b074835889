"""User-facing errors and the command-line wrapper that turns them into one-line messages.

Every mistake a user can make (a bad flag, a missing or malformed file, an unknown model or
layer, NaN-only data) raises a ``UserError`` subclass whose message names the problem. The
CLIs (``python -m jumprelu_ext.train``, ``python -m jumprelu_ext.cache``) run through
``run_cli``: a ``UserError`` becomes ``error: <message>`` on stderr and exit status 2, with no
traceback; anything else is a bug and keeps its traceback.
"""

import sys

__all__ = ["UserError", "first_line", "run_cli"]


class UserError(ValueError):
    """A problem with the user's input; the message is one line and names it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_cli(main, argv=None) -> int:
    """Call ``main(argv)`` and return its exit status (None counts as 0); map ``UserError`` (and
    missing files) to a one-line error and status 2."""
    try:
        return main(argv) or 0
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

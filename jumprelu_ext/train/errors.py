"""User-facing errors and the command-line wrapper that turns them into one-line messages.

Every mistake a user can make (a bad flag, a missing or malformed file, an unknown model or
layer, NaN-only data) raises a ``UserError`` subclass whose message names the problem. The
CLIs (``python -m jumprelu_ext.train``, ``python -m jumprelu_ext.harvest``) run through
``run_cli``: a ``UserError`` becomes ``error: <message>`` on stderr and exit status 2, with no
traceback. So does an ``OSError`` (a read-only or full disk, a path that is a file where a folder
is needed, a permission denied, ...): the message names the path and the system's reason.
Anything else is a bug and keeps its traceback.
"""

import sys

__all__ = ["UserError", "describe_os_error", "first_line", "run_cli"]


class UserError(ValueError):
    """A problem with the user's input; the message is one line and names it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_os_error(e: OSError) -> str:
    """One line for an OS error: the path(s) it concerns and the system's reason, e.g.
    ``runs/x/eval.json: No space left on device``."""
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    reason = e.strerror or first_line(e)
    return f"{' -> '.join(paths)}: {reason}" if paths else first_line(e)


def run_cli(main, argv=None) -> int:
    """Call ``main(argv)`` and return its exit status (None counts as 0); map ``UserError`` and
    ``OSError`` to a one-line error and status 2."""
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2

"""Deprecated: ``python -m jumprelu_ext.cache`` is the earlier name of ``python -m
jumprelu_ext.harvest``. It still runs the same command, with a warning, and goes in the next
release."""

import sys

from .train.data.shard_writer import main
from .train.errors import run_cli

__all__ = ["main"]

if __name__ == "__main__":
    print(
        "warning: python -m jumprelu_ext.cache is deprecated (removed in the next release): "
        "use python -m jumprelu_ext.harvest",
        file=sys.stderr,
    )
    sys.exit(run_cli(main))

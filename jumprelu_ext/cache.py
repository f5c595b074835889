"""``python -m jumprelu_ext.cache``: harvest a model's activations into shard files
(the implementation is ``jumprelu_ext.train.data.cache``)."""

import sys

from .train.data.cache import main
from .train.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))

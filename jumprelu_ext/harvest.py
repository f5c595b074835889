"""``python -m jumprelu_ext.harvest``: harvest a model's activations over a text into safetensors
shards for ``python -m jumprelu_ext.train --activations`` (the shard writer is
``jumprelu_ext.train.data.shard_writer``)."""

import sys

from .train.data.shard_writer import main
from .train.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))

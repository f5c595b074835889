"""``python -m jumprelu_ext.train`` (and ``torchrun -m jumprelu_ext.train``)."""

import sys

from .errors import run_cli
from .loop import main

sys.exit(run_cli(main))

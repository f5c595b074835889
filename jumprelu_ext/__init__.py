"""jumprelu_ext: fused JumpReLU ops and sparse autoencoders."""

from . import reference
from ._backend import COMPILED
from .ops import jumprelu, jumprelu_l0, step
from .sae import JumpReLUSAE

__all__ = ["COMPILED", "JumpReLUSAE", "jumprelu", "jumprelu_l0", "reference", "step"]
__version__ = "0.1.0"

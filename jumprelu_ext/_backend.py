"""Loads the compiled extension, or explains once why the reference is used instead."""

import os
import warnings

import torch  # noqa: F401  (loads libtorch, which the compiled extension links against)

FORCE_REFERENCE_ENV = "JUMPRELU_EXT_FORCE_REFERENCE"


def _load_compiled() -> bool:
    if os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0"):
        return False
    try:
        from . import _C  # noqa: F401  (registers torch.ops.jumprelu_ext.*)
    except ImportError as error:
        warnings.warn(
            f"jumprelu_ext: the compiled extension could not be loaded ({error}); "
            "using the pure-PyTorch reference. Rebuild with "
            "`pip install --no-build-isolation .` to get the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


COMPILED = _load_compiled()

"""jumprelu_ext: fused JumpReLU ops and sparse autoencoders.

``import jumprelu_ext`` is light: the compiled kernels load (and register
``torch.ops.jumprelu_ext.*``) the first time an op, the SAE module or ``COMPILED`` is used, or
when ``jumprelu_ext.ops`` is imported. So tools that only read activation files, such as the
trainer's data pipeline, never load them (docs/ops.md#loading-the-kernels).
"""

import importlib

__all__ = ["COMPILED", "JumpReLUSAE", "jumprelu", "jumprelu_l0", "reference", "step"]
__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_LAZY = {
    "COMPILED": "._backend",
    "JumpReLUSAE": ".sae",
    "jumprelu": ".ops",
    "jumprelu_l0": ".ops",
    "step": ".ops",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    if name == "reference":
        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

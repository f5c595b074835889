"""Input checks shared by the public functions, the fake kernels and the reference.

The compiled kernels repeat these checks in C++ (csrc/ops.h) for direct
``torch.ops.jumprelu_ext`` calls; the messages are the same.
"""

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_inputs(
    op: str,
    pre: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float,
    ste_to_input: bool = False,
    fire_counts: torch.Tensor | None = None,
) -> None:
    if not isinstance(pre, torch.Tensor) or not isinstance(threshold, torch.Tensor):
        raise TypeError(f"{op}: pre and threshold must be tensors")
    if pre.dim() < 1:
        raise ValueError(f"{op}: pre must have shape [..., features], got a 0-d tensor")
    if pre.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: pre must be float32, float64, float16 or bfloat16, got {pre.dtype}")
    if threshold.dim() != 1:
        raise ValueError(f"{op}: threshold must be 1-D [features], got shape {list(threshold.shape)}")
    if threshold.shape[0] != pre.shape[-1]:
        raise ValueError(
            f"{op}: threshold has {threshold.shape[0]} features but pre's last dimension is {pre.shape[-1]}"
        )
    if pre.device != threshold.device:
        raise ValueError(f"{op}: pre is on {pre.device} but threshold is on {threshold.device}")
    if threshold.dtype not in (pre.dtype, torch.float32):
        raise TypeError(f"{op}: threshold must be float32 or pre's dtype ({pre.dtype}), got {threshold.dtype}")
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
        raise TypeError(f"{op}: bandwidth must be a Python number, got {type(bandwidth).__name__}")
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"{op}: bandwidth must be positive and finite, got {bandwidth}")
    if not isinstance(ste_to_input, bool):
        raise TypeError(f"{op}: ste_to_input must be a bool, got {type(ste_to_input).__name__}")
    info = torch.finfo(compute_dtype(pre))
    if not info.tiny <= bandwidth <= info.max:
        raise ValueError(
            f"{op}: bandwidth {bandwidth} is outside the range of {info.dtype}, the dtype "
            f"{pre.dtype} inputs are computed in ([{info.tiny}, {info.max}])"
        )
    if fire_counts is not None:
        check_fire_counts(op, pre, fire_counts)


def check_fire_counts(op: str, pre: torch.Tensor, fire_counts: torch.Tensor) -> None:
    """fire_counts is added to in place, so it must be the caller's own buffer: int64 [F] on pre's
    device, contiguous (a converted copy would swallow the counts)."""
    if not isinstance(fire_counts, torch.Tensor):
        raise TypeError(f"{op}: fire_counts must be a tensor or None, got {type(fire_counts).__name__}")
    if fire_counts.dtype != torch.int64:
        raise TypeError(f"{op}: fire_counts must be int64, got {fire_counts.dtype}")
    features = pre.shape[-1]
    if tuple(fire_counts.shape) != (features,):
        raise ValueError(
            f"{op}: fire_counts must have shape [{features}] (pre's features), got {list(fire_counts.shape)}"
        )
    if fire_counts.device != pre.device:
        raise ValueError(f"{op}: fire_counts is on {fire_counts.device} but pre is on {pre.device}")
    if not fire_counts.is_contiguous():
        raise ValueError(f"{op}: fire_counts must be contiguous (it is added to in place)")


def compute_dtype(pre: torch.Tensor) -> torch.dtype:
    """Arithmetic and accumulation happen in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if pre.dtype == torch.float64 else torch.float32

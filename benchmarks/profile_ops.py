"""Each op's forward and backward kernels once, at the benchmark shapes: what ncu profiles in
benchmarks/gpu_check.sh (`ncu -k regex:jumprelu python benchmarks/profile_ops.py`)."""

from __future__ import annotations

import argparse

import torch

import jumprelu_ext

SHAPES = [(4096, 16384), (4096, 65536)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    for rows, features in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            pre = torch.randn(rows, features, device=device, dtype=dtype, requires_grad=True)
            theta = torch.full((features,), 0.5, device=device, requires_grad=True)
            acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, 0.1)
            torch.autograd.backward([acts, l0], [torch.ones_like(acts), torch.ones_like(l0)])
            jumprelu_ext.jumprelu(pre, theta, 0.1).sum().backward()
            jumprelu_ext.step(pre, theta, 0.1).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()

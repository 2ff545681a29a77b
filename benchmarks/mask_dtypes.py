"""`short_conv_fused` through the public api with the same padding mask as int64 (what Hugging Face models
pass), float32 and bool: forward, the backward alone through the CUDA backend, and eager forward + backward
(gradients cleared each step), bf16, W = 4.

    PYTHONPATH=$PWD python benchmarks/mask_dtypes.py            # on an NVIDIA GPU

On CUDA the api hands int64 / int32 / bool / float32 masks to the channel-last CUDA C++ kernels as they come
(docs/BACKENDS.md), so the three rows of a shape should take the same time; before session 7 the int64 mask
cost one conversion kernel per call. Median of 5 rounds of CUDA-event timings, us per call; three x tensors
rotate so that the forward does not read from L2.
"""
from __future__ import annotations

import argparse

import torch

import causal_conv1d_mps as ccmps


def _median_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rounds = []
    for _ in range(5):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(rounds)[len(rounds) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("mask_dtypes: needs an NVIDIA GPU")
        return 1
    torch.manual_seed(0)
    for B, T, D in ((4, 8192, 4096), (8, 2048, 4096)):
        xs = [torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        weight = torch.randn(D, args.width, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(D, device="cuda", dtype=torch.bfloat16)
        padding = torch.ones(B, T, dtype=torch.int64, device="cuda")
        padding[1::2, : T // 4] = 0
        masks = {"int64": padding, "float32": padding.float(), "bool": padding.bool()}
        for name, mask in masks.items():
            turn = [0]

            def forward(mask=mask, turn=turn):
                turn[0] = (turn[0] + 1) % 3
                ccmps.short_conv_fused(xs[turn[0]], weight, bias, mask)

            print(f"fwd     B{B} T{T} D{D} {name:8s} {_median_us(forward, 50):8.1f} us", flush=True)
        from causal_conv1d_mps import _activation
        from causal_conv1d_mps.triton import backend

        dout = torch.randn_like(xs[0])
        for name, mask in masks.items():  # the backward alone, through the CUDA backend (no autograd, no api)
            def backward(mask=mask):
                backend.short_conv_fused_bwd(xs[0], weight, bias, mask, None, None, dout, None, _activation.SILU, True)

            print(f"bwd     B{B} T{T} D{D} {name:8s} {_median_us(backward, 50):8.1f} us  (backend)", flush=True)
        x = xs[0].clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        # twice round: a one-time cost (the first series of the process) shows as a difference between rounds
        for name, mask in [*masks.items(), *masks.items()]:
            def step(mask=mask):
                x.grad = w.grad = b.grad = None
                ccmps.short_conv_fused(x, w, b, mask).backward(dout)

            print(f"fwd+bwd B{B} T{T} D{D} {name:8s} {_median_us(step, 20):8.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

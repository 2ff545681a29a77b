"""Every scheme of the shipped channel-last CUDA C++ forward (`launch_btd.ForwardVariant`: channels x steps
per thread, runs without bounds checks) at each width, through the CUDA backend, in one run: what
`launch_btd.forward_variant` should pick. 2 x 16 (session 8) uses fewer registers than 2 x 32 at wide filters
(sm_90, W = 16 fused: 95 against 136) for more halo rows per output. The `btd-wide` prototype timed its
variants with an HF mask (fused) or with neither mask nor residual (plain); the width suite of bench.py times
the fused op without a mask (residual, bias, SiLU), which this sweep adds.

    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_btd_forward_sweep.py --json sweep.json   # NVIDIA GPU

Each time is the median of `triton.testing.do_bench` as % of a device copy measured in the same run; each
scheme's output is compared with the launcher's own choice (the same arithmetic: the difference must be 0).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_vs_triton import _bench, _copy_gbs  # noqa: E402

SCHEMES = ((4, 8, False), (4, 8, True), (2, 16, False), (2, 16, True), (2, 32, False), (2, 32, True))
OPS = ("fused", "fused-mask", "plain")


def _inputs(B, T, D, W, masked, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, T, D, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(D, W, device="cuda", generator=g) * W ** -0.5).to(torch.bfloat16)
    b = (torch.randn(D, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.int64, device="cuda")
        mask[1::2, : T // 4] = 0
    return x, w, b, mask


def sweep(widths, shapes, budget: float) -> list[dict]:
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import launch_btd

    copy = _copy_gbs()
    print(f"copy {copy:.0f} GB/s", flush=True)
    chosen = launch_btd.forward_variant
    rows, start = [], time.perf_counter()
    silu = _activation.SILU
    try:
        for B, T, D in shapes:
            for W in widths:
                for op in OPS:
                    if time.perf_counter() - start > budget:
                        print("budget spent: stopping", flush=True)
                        return rows
                    x, w, b, mask = _inputs(B, T, D, W, op == "fused-mask", W)
                    residual = op != "plain"
                    out = torch.empty_like(x)

                    def run():
                        assert launch_btd.conv_fwd_btd(x, w, b, mask, silu, residual, out)

                    launch_btd.forward_variant = chosen
                    launch_btd._plans.clear()
                    run()
                    reference = out.clone()
                    pick = chosen(mask is not None, W, True)
                    nbytes = 2 * x.numel() * 2 + (0 if mask is None else mask.numel() * mask.element_size())
                    for vec, steps, inside in SCHEMES:
                        variant = launch_btd.ForwardVariant(vec, steps, inside)
                        launch_btd.forward_variant = lambda has_mask, width, d_const, v=variant: v
                        launch_btd._plans.clear()
                        out.fill_(float("nan"))
                        run()
                        diff = (out.float() - reference.float()).abs().max().item()
                        ms = _bench(run)
                        pct = 100 * nbytes / (copy * 1e9) / (ms * 1e-3)
                        mark = "*" if variant == pick else " "
                        rows.append(dict(op=op, shape=f"B{B} T{T} D{D}", W=W, vec=vec, steps=steps, inside=inside,
                                         ms=ms, pct=pct, diff=diff, chosen=variant == pick))
                        print(f"{op:10s} B{B} T{T} D{D} W{W:<2d} {vec}x{steps:<2d} inside={int(inside)} {mark} "
                              f"{ms:8.4f} ms {pct:5.1f}%  diff {diff:.1e}", flush=True)
    finally:
        launch_btd.forward_variant = chosen
        launch_btd._plans.clear()
    return rows


def sweep_main(argv, description: str, widths: list[int], shapes, sweep_fn, long_help: str) -> int:
    """The command line both forward sweeps share: `--widths`, `--long` (`shapes(long)` gives the shapes),
    `--budget` and `--json`; `sweep_fn(widths, shapes, budget)` returns the rows."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--widths", type=int, nargs="+", default=widths)
    parser.add_argument("--long", action="store_true", help=long_help)
    parser.add_argument("--budget", type=float, default=100.0, help="seconds before no new case starts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{Path(sys.argv[0]).stem}: needs an NVIDIA GPU", file=sys.stderr)
        return 1
    rows = sweep_fn(args.widths, shapes(args.long), args.budget)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    return sweep_main(argv, __doc__.splitlines()[0], [4, 5, 6, 7, 8, 10, 11, 12, 14, 16],
                      lambda long: [(4, 2048, 4096)] + ([(4, 8192, 4096)] if long else []), sweep,
                      "also B4 T8192 D4096 (default B4 T2048 D4096 only)")


if __name__ == "__main__":
    raise SystemExit(main())

"""Every (vectors per thread, threads per block) layout of the shipped `(B, D, T)` CUDA C++ forward
(`launch.forward_layout`: CC_VPT x CC_FWD_THREADS) at each width, through the launcher, in one run: what
`forward_layout` should pick for wide filters on rows of a few thousand steps (bench.py's width suite is
B4 D4096 T2048).

    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_bdt_layout_sweep.py --json sweep.json   # NVIDIA GPU

Each time is the median of `triton.testing.do_bench` as % of a device copy measured in the same run (bf16,
bias, SiLU); each layout's output is compared with the launcher's own choice (the same arithmetic: the
difference must be 0). A layout a row length cannot hold (a block spanning more steps than the row) is
still timed: its idle threads are part of what is measured.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_btd_forward_sweep import sweep_main  # noqa: E402
from cuda_vs_triton import _bench, _copy_gbs  # noqa: E402

LAYOUTS = ((1, 128), (2, 64), (2, 128), (4, 64), (4, 128))


def sweep(widths, shapes, budget: float) -> list[dict]:
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import launch

    copy = _copy_gbs()
    print(f"copy {copy:.0f} GB/s", flush=True)
    chosen = launch.forward_layout
    rows, start = [], time.perf_counter()
    try:
        for B, D, T in shapes:
            for W in widths:
                if time.perf_counter() - start > budget:
                    print("budget spent: stopping", flush=True)
                    return rows
                g = torch.Generator(device="cuda").manual_seed(W)
                x = torch.randn(B, D, T, device="cuda", generator=g).to(torch.bfloat16)
                w = (torch.randn(D, W, device="cuda", generator=g) * W ** -0.5).to(torch.bfloat16)
                b = (torch.randn(D, device="cuda", generator=g) * 0.5).to(torch.bfloat16)

                def run():
                    return launch.conv_fwd_bdt(x, w, b, _activation.SILU)

                launch.forward_layout = chosen
                launch._forward_plans.clear()
                reference = run()
                pick = chosen(T, W)
                nbytes = 2 * x.numel() * 2
                for layout in LAYOUTS:
                    launch.forward_layout = lambda t, width, v=layout: v
                    launch._forward_plans.clear()
                    diff = (run().float() - reference.float()).abs().max().item()
                    ms = _bench(run)
                    pct = 100 * nbytes / (copy * 1e9) / (ms * 1e-3)
                    mark = "*" if layout == pick else " "
                    rows.append(dict(shape=f"B{B} D{D} T{T}", W=W, vectors=layout[0], threads=layout[1], ms=ms,
                                     pct=pct, diff=diff, chosen=layout == pick))
                    print(f"B{B} D{D} T{T} W{W:<2d} {layout[0]} x {layout[1]:<3d} {mark} {ms:8.4f} ms {pct:5.1f}%  "
                          f"diff {diff:.1e}", flush=True)
    finally:
        launch.forward_layout = chosen
        launch._forward_plans.clear()
    return rows


def main(argv=None) -> int:
    return sweep_main(argv, __doc__.splitlines()[0], [4, 8, 9, 12, 13, 14, 15, 16],
                      lambda long: [(4, 4096, 2048)] + ([(4, 4096, 8192)] if long else []), sweep,
                      "also B4 D4096 T8192 (default B4 D4096 T2048 only)")


if __name__ == "__main__":
    raise SystemExit(main())

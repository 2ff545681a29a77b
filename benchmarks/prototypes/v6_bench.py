"""v6 measurement script (one device call): the shipped backward (`conv_bwd_kernel`) against the run-based
backward (`kernels/conv_bwd_runs.py`) in several tilings, forward + backward and backward alone, with the
copy bandwidth of the same run. Every variant's gradients are checked against float64 and for bitwise
determinism. Prints a short table last; writes the rows to $OUT/v6_bench.json.

    PYTHONPATH=$PWD python benchmarks/prototypes/v6_bench.py [--quick] [--widths 4,3,8]

Variants are compiled first in parallel processes (Triton's disk cache then serves the timing process).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

os.environ.setdefault("CAUSAL_CONV1D_BACKEND", "triton")

import causal_conv1d_mps as ccmps  # noqa: E402
from causal_conv1d_mps.triton import _config  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
SHAPE = dict(B=8, D=4096, T=2048)
DRY = "--dry-run" in sys.argv  # the interpreter on the CPU at a small shape: checks the script, times nothing
if DRY:
    DEV, SHAPE = "cpu", dict(B=1, D=256, T=96)

# the v5 tiles of conv_bwd_kernel (R=0: not the run kernel)
OLD = {"bdt": dict(BT=128, BD=4, TILES=4, num_warps=2, R=0),
       "fused": dict(BT=32, BD=64, TILES=16, num_warps=2, R=0)}
OLD_WIDE = {"bdt": dict(BT=128, BD=4, TILES=4, num_warps=2, R=0),
            "fused": dict(BT=32, BD=32, TILES=16, num_warps=1, R=0)}


def variants(layout: str, W: int) -> list[tuple[str, dict | None]]:
    halo = triton.next_power_of_2(max(W - 1, 1))
    old = OLD[layout] if W <= 4 else OLD_WIDE[layout]
    out = [("v5", old), ("candidate", _config.bwd_runs_candidate(SHAPE["T"], SHAPE["D"], W, layout == "fused"))]
    if layout == "bdt":
        run = dict(R=8, HR=8, HF=8)
        out += [
            ("carry BT8 BD32 R8 t32 w1", dict(BT=8, BD=32, TILES=32, num_warps=1, CARRY=True, **run)),
            ("runs BT128 BD4 t4 w2", dict(BT=128, BD=4, TILES=4, num_warps=2, **run)),  # = candidate: spread
            ("runs BT128 BD4 t8 w2", dict(BT=128, BD=4, TILES=8, num_warps=2, **run)),
            ("runs BT64 BD4 t8 w1", dict(BT=64, BD=4, TILES=8, num_warps=1, **run)),
            ("runs BT256 BD4 t2 w4", dict(BT=256, BD=4, TILES=2, num_warps=4, **run)),
            ("carry BT16 BD64 R16 t16 w2", dict(BT=16, BD=64, TILES=16, num_warps=2, CARRY=True, R=16, HR=8, HF=8)),
        ]
    else:
        r = 4 if halo <= 4 else 8
        out += [
            (f"carry BT{r} BD128 v4 t32 w1", dict(BT=r, BD=128, R=r, HR=halo, HF=halo, TILES=32, CARRY=True, VEC=4,
                                                 num_warps=1)),  # W4: = candidate, a second timing
            (f"carry BT{r} BD128 v4 t64 w1", dict(BT=r, BD=128, R=r, HR=halo, HF=halo, TILES=64, CARRY=True, VEC=4,
                                                 num_warps=1)),
            (f"carry BT{r} BD256 v4 t32 w2", dict(BT=r, BD=256, R=r, HR=halo, HF=halo, TILES=32, CARRY=True, VEC=4,
                                                 num_warps=2)),
            ("carry BT8 BD128 v4 t32 w1", dict(BT=8, BD=128, R=8, HR=halo, HF=halo, TILES=32, CARRY=True, VEC=4,
                                               num_warps=1)),
            (f"carry BT{r} BD256 v8 t32 w1", dict(BT=r, BD=256, R=r, HR=halo, HF=halo, TILES=32, CARRY=True, VEC=8,
                                                 num_warps=1)),
            (f"runs BT{2 * r} BD128 R{r} v4 t16 w1", dict(BT=2 * r, BD=128, R=r, HR=halo, HF=halo, TILES=16,
                                                         CARRY=False, VEC=4, num_warps=1)),
        ]
    return out


def make_case(layout: str, W: int, B: int, D: int, T: int, seed: int = 0):
    """(fn returning the output, leaves, dout, bytes fwd+bwd, bytes bwd)."""
    g = torch.Generator(device=DEV).manual_seed(seed + W)
    w = (torch.randn(D, W, device=DEV, generator=g) * W ** -0.5).to(BF16).requires_grad_()
    b = (torch.randn(D, device=DEV, generator=g) * 0.5).to(BF16).requires_grad_()
    if layout == "fused":
        x = torch.randn(B, T, D, device=DEV, generator=g).to(BF16).requires_grad_()
        fn = lambda: ccmps.short_conv_fused(x, w, b)  # noqa: E731  (SiLU + residual, no mask)
    else:
        x = torch.randn(B, D, T, device=DEV, generator=g).to(BF16).requires_grad_()
        fn = lambda: ccmps.causal_conv1d(x, w, b, "silu")  # noqa: E731
    dout = torch.randn(x.shape, device=DEV, generator=g).to(BF16)
    n = x.numel() * x.element_size()
    return fn, (x, w, b), dout, 5 * n, 3 * n


def reference_grads(layout, leaves, dout):
    x, w, b = (t.detach().double().requires_grad_() for t in leaves)
    W = w.shape[1]
    xt = x.transpose(1, 2) if layout == "fused" else x
    pre = F.conv1d(F.pad(xt, (W - 1, 0)), w[:, None, :], b, groups=w.shape[0])
    out = pre * torch.sigmoid(pre)
    if layout == "fused":
        out = out.transpose(1, 2) + x
    return torch.autograd.grad(out, (x, w, b), dout.double())


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def use(layout, cfg):
    name = "conv_bwd_" + ("channel_last" if layout == "fused" else "contiguous")
    if cfg is None:
        _config.OVERRIDES.pop(name, None)
    else:
        _config.OVERRIDES[name] = cfg
    _config.clear()


def _warm(job):
    """Compile one variant in a worker process (B = 1: the same specialisation as the timed shape)."""
    layout, W, cfg = job
    try:
        use(layout, cfg)
        fn, leaves, dout, _, _ = make_case(layout, W, 1, SHAPE["D"], SHAPE["T"])
        fn().backward(dout)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # reported again by the timing process
        return repr(exc)[:200]


def bench(fn, **kwargs) -> float:
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median", **kwargs)


def copy_bandwidth() -> float:
    if DRY:
        return 1.0
    a = torch.randn(2**29, device=DEV, dtype=BF16)  # 1 GiB
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", default="4,3,8")
    parser.add_argument("--quick", action="store_true", help="v5 and the candidate only")
    parser.add_argument("--dry-run", action="store_true", help="interpreter on the CPU, small shape, no timing")
    args = parser.parse_args()
    t_start = time.time()
    widths = [int(w) for w in args.widths.split(",")]
    jobs = []
    for W in widths:
        for layout in ("bdt", "fused"):
            vs = variants(layout, W)
            if args.quick or W != 4:  # v5, the candidate, and (not --quick) the first other tiling
                other = [v for v in vs[2:] if v[1] != vs[1][1]][:1]
                vs = vs[:2] + (other if W != 4 and not args.quick else [])
            jobs += [(layout, W, label, cfg) for label, cfg in vs]
    warm_errors = []
    if not DRY:
        with cf.ProcessPoolExecutor(max_workers=min(16, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            warm_errors = list(pool.map(_warm, [(lay, W, cfg) for lay, W, _, cfg in jobs]))
    print(f"compiled {len(jobs)} variants in {time.time() - t_start:.0f} s; errors: "
          f"{[e for e in warm_errors if e]}", flush=True)

    copy_gbs = copy_bandwidth()
    name = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    cases = {}
    for layout, W, label, cfg in jobs:
        key = (layout, W)
        if key not in cases:
            fn, leaves, dout, n_fb, n_b = make_case(layout, W, **SHAPE)
            cases[key] = (fn, leaves, dout, n_fb, n_b, reference_grads(layout, leaves, dout))
        fn, leaves, dout, n_fb, n_b, ref = cases[key]
        use(layout, cfg)
        row = dict(work=layout, W=W, shape="B{B} D{D} T{T}".format(**SHAPE), variant=label,
                   config=_config.conv_bwd_tiles(SHAPE["T"], SHAPE["D"], W, layout == "fused", False, 2))
        try:
            grads = [torch.autograd.grad(fn(), leaves, dout) for _ in range(2)]
            row["err"] = max(rel(g, r) for g, r in zip(grads[0], ref))
            row["deterministic"] = all(torch.equal(a, b) for a, b in zip(*grads))
            ms_fb = bench(lambda: fn().backward(dout), grad_to_none=list(leaves))
            out = fn()
            ms_b = bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
            with torch.no_grad():
                ms_f = bench(fn)
            row.update(ms_fb=ms_fb, ms_b=ms_b, ms_f=ms_f, pct_fb=100 * n_fb / (ms_fb * 1e-3) / 1e9 / copy_gbs,
                       pct_b=100 * n_b / (ms_b * 1e-3) / 1e9 / copy_gbs)
        except Exception as exc:
            row["error"] = repr(exc)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    use("bdt", None)
    use("fused", None)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "v6_bench.json"), "w") as f:
            json.dump(dict(copy_gbs=copy_gbs, device=name, torch=torch.__version__,
                           triton=triton.__version__, rows=rows), f, indent=1)
    print(f"\n== copy {copy_gbs:.0f} GB/s; {time.time() - t_start:.0f} s; fwd+bwd bytes 5N, bwd 3N (bf16)")
    for r in rows:
        head = f"{r['work']:5} W{r['W']} {r['variant']:30}"
        if "error" in r:
            print(head, "ERROR", r["error"][:120])
        else:
            print(f"{head} fb {r['ms_fb']:.4f} ms {r['pct_fb']:5.1f}% | bwd {r['ms_b']:.4f} ms {r['pct_b']:5.1f}% | "
                  f"fwd {r['ms_f']:.4f} | err {r['err']:.1e}{'' if r['err'] < 2e-2 else ' WRONG'}"
                  f"{'' if r['deterministic'] else ' NONDET'}")


if __name__ == "__main__":
    main()

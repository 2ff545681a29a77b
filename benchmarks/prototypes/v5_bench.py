"""v5 measurement script (one device call): correctness against float64, then timings of the shipped
forward tiles against the per-thread-run kernel (`kernels/conv_fwd_runs.py`) in several tilings, all
with the copy bandwidth of the same run. Prints a short table last; writes the full log to $OUT.

    PYTHONPATH=$PWD python benchmarks/prototypes/v5_bench.py 
"""
from __future__ import annotations

import importlib
import json
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

import causal_conv1d_mps as ccmps
from causal_conv1d_mps.triton import _config

os.environ.setdefault("CAUSAL_CONV1D_BACKEND", "triton")
DEV = "cuda"
BF16 = torch.bfloat16
ROWS: list[dict] = []


def copy_bandwidth() -> float:
    a = torch.randn(2**29, device=DEV, dtype=BF16)  # 1 GiB
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9


def ref_conv(x_bdt, w, b, silu):
    W = w.shape[1]
    out = F.conv1d(F.pad(x_bdt.double(), (W - 1, 0)), w.double()[:, None, :], b.double(), groups=w.shape[0])
    return out * torch.sigmoid(out) if silu else out


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def use(name, cfg):
    if cfg is None:
        _config.OVERRIDES.pop(name, None)
    else:
        _config.OVERRIDES[name] = cfg
    _config.clear()


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def case_fwd(layout, B, D, T, W, variants, copy_gbs, fused=False):
    g = torch.Generator(device=DEV).manual_seed(B * D + T + W)
    w = (torch.randn(D, W, device=DEV, generator=g) * W ** -0.5).to(BF16)
    b = (torch.randn(D, device=DEV, generator=g) * 0.5).to(BF16)
    if fused:
        x = torch.randn(B, T, D, device=DEV, generator=g).to(BF16)
        mask = torch.rand(B, T, device=DEV, generator=g) > 0.1
        fn = lambda: ccmps.short_conv_fused(x, w, b, mask, True, True)  # noqa: E731
        xm = (x.double() * mask.double()[:, :, None]).transpose(1, 2)
        ref = ref_conv(xm, w, b, True).transpose(1, 2) + x.double()
        nbytes = 2 * x.numel() * x.element_size() + mask.numel()
        name = "conv_fwd_channel_last"
    else:
        x = torch.randn(B, T, D, device=DEV, generator=g).to(BF16).transpose(1, 2) if layout == "cl" else \
            torch.randn(B, D, T, device=DEV, generator=g).to(BF16)
        fn = lambda: ccmps.causal_conv1d(x, w, b, "silu")  # noqa: E731
        ref = ref_conv(x, w, b, True)
        nbytes = 2 * x.numel() * x.element_size()
        name = "conv_fwd_" + ("channel_last" if layout == "cl" else "contiguous")
    for label, cfg in variants:
        use(name, cfg)
        try:
            with torch.no_grad():
                out = fn()
                torch.cuda.synchronize()
                err = rel(out, ref)
                ms = bench(fn)
        except Exception as exc:  # a tiling that does not compile: record and go on
            ROWS.append(dict(work=("fused" if fused else layout), shape=f"B{B} D{D} T{T} W{W}", variant=label,
                             error=repr(exc)[:200]))
            print("ERR", label, repr(exc)[:300], flush=True)
            continue
        row = dict(work=("fused" if fused else layout), shape=f"B{B} D{D} T{T} W{W}", variant=label, ms=ms,
                   pct=100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs, err=err, ok=err < 1e-2)
        ROWS.append(row)
        print(json.dumps(row), flush=True)
    use(name, None)


def main():
    t_start = time.time()
    copy_gbs = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {copy_gbs:.0f} GB/s", flush=True)
    try:
        importlib.import_module("triton.experimental.gluon")
        print("gluon: importable", flush=True)
    except Exception as exc:
        print("gluon: not importable", repr(exc)[:100], flush=True)
    def old(layout, W):  # the v4 tiles of conv_fwd (R=0: the kernel before v5)
        if layout == "bdt":
            return dict(BT=256, BD=8, num_warps=4, R=0) if W <= 4 else dict(BT=128, BD=8, num_warps=2, R=0)
        return dict(BT=8, BD=128, num_warps=1, R=0) if W <= 4 else dict(BT=16, BD=128, num_warps=2, R=0)

    both = lambda layout, W: [("v4", old(layout, W)), ("v5", None)]  # noqa: E731
    for B, D, T in ((4, 4096, 8192), (8, 2048, 4096)):
        case_fwd("bdt", B, D, T, 4, both("bdt", 4), copy_gbs)
    case_fwd("cl", 4, 4096, 8192, 4, both("cl", 4), copy_gbs)
    case_fwd("cl", 8, 2048, 4096, 4, both("cl", 4), copy_gbs)
    case_fwd("cl", 4, 4096, 8192, 4, both("cl", 4), copy_gbs, fused=True)
    case_fwd("cl", 8, 4096, 2048, 4, both("cl", 4), copy_gbs, fused=True)
    for W in (2, 3, 5, 7):
        case_fwd("bdt", 8, 4096, 2048, W, both("bdt", W), copy_gbs)
    for W in (2, 7, 8):
        case_fwd("cl", 8, 4096, 2048, W, [("v4", None), ("runs BT8 BD256 R4", dict(BT=8, BD=256, R=4, HR=1,
                                                                                  num_warps=1))], copy_gbs, fused=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "v5_bench.json"), "w") as f:
            json.dump(dict(copy_gbs=copy_gbs, rows=ROWS), f, indent=1)
    print(f"\n== copy {copy_gbs:.0f} GB/s; {time.time() - t_start:.0f} s")
    for r in ROWS:
        if "error" in r:
            print(f"{r['work']:6} {r['shape']:22} {r['variant']:26} ERROR")
        else:
            print(f"{r['work']:6} {r['shape']:22} {r['variant']:26} {r['ms']:.4f} ms {r['pct']:5.1f}%"
                  f" err {r['err']:.1e}{'' if r['ok'] else ' WRONG'}")


if __name__ == "__main__":
    main()

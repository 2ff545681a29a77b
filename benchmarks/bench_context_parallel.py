"""What context parallelism costs: the halo exchange against the local kernel.

Run under torchrun, one process per device (NCCL on CUDA, gloo on CPU):

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_context_parallel.py                  # 2 GPUs
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_context_parallel.py --device cpu     # CPU, gloo

For each op (`short_conv_fused` on `[B, T, D]`, `causal_conv1d` on contiguous `[B, D, T]`) it times, on
each rank's slice of a `--seq-len` sequence (medians, or minima with `--stat min`, over `--reps`; each
repetition between two barriers, so that every row is paced by the slowest rank):
- local: the op alone on the slice, with initial states (the same work without any communication);
- exchange: the collectives alone (the all-gather of every rank's last W-1 inputs, the reduce-scatter
  of their gradient), on messages of the real size;
- cp: `causal_conv1d_mps.context_parallel` without and with `overlap`;
forward, and forward + backward. The exchange's cost is `cp - local`. Before timing, each variant's
outputs and final states are checked against the single-process op on the whole sequence (exit status 1
if one is wrong).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import causal_conv1d_mps as ccmps
import causal_conv1d_mps.context_parallel as cp
from causal_conv1d_mps.context_parallel import _exchange


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, reps: int, stat: str = "median") -> float:
    """Median (or minimum) wall time of `fn()` in ms. A repetition starts after a barrier and ends after
    another, once every rank is done: every row, the local op's included, is paced by the slowest rank
    and pays one barrier, so that `cp - local` is the cost of context parallelism and not of load
    imbalance. The minimum suits a shared CPU machine, where other work inflates the median."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        synchronize(device)
        dist.barrier()
        times.append((time.perf_counter() - start) * 1e3)
    value = statistics.median(times) if stat == "median" else min(times)
    slowest = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def make_inputs(op: str, batch: int, local_len: int, dim: int, width: int, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(dist.get_rank())
    shape = (batch, local_len, dim) if op == "fused" else (batch, dim, local_len)
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(dim, width, generator=gen) / width ** 0.5).to(device).requires_grad_(True)
    bias = torch.randn(dim, generator=gen).to(device).requires_grad_(True)
    states = torch.randn(batch, dim, width - 1, generator=gen).to(device, dtype)
    return x, weight, bias, states, torch.randn(shape, generator=gen).to(device, dtype)


def verify(op: str, local_len: int, dim: int, width: int, dtype, device, contexts) -> None:
    """Checks, before any timing, that every context-parallel variant gives this rank's slice of the
    single-process result (outputs and final states) on a sequence of `world * local_len`; exits 1 if not."""
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator(device="cpu").manual_seed(7)  # the same sequence on every rank
    total = world * local_len
    shape = (1, total, dim) if op == "fused" else (1, dim, total)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    weight = (torch.randn(dim, width, generator=gen) / width ** 0.5).to(device)
    bias = torch.randn(dim, generator=gen).to(device)
    tdim = 1 if op == "fused" else 2
    with torch.no_grad():
        if op == "fused":
            want, want_final = ccmps.short_conv_fused(x, weight, bias, None, True, True, return_final_states=True)
        else:
            want, want_final = ccmps.causal_conv1d(x, weight, bias, "silu", return_final_states=True)
        mine = x.narrow(tdim, rank * local_len, local_len).contiguous()
        for context in contexts:
            if op == "fused":
                got, final = cp.short_conv_fused(mine, weight, bias, None, True, True, return_final_states=True,
                                                 context=context)
            else:
                got, final = cp.causal_conv1d(mine, weight, bias, "silu", return_final_states=True, context=context)
            for name, a, b in (("out", got, want.narrow(tdim, rank * local_len, local_len)),
                               ("final_states", final, want_final)):
                err = ((a.double() - b.double()).norm() / b.double().norm()).item()
                limit = 1e-5 if dtype == torch.float32 else 1e-2
                if not err <= limit:
                    print(f"rank {rank}: {op} {name} (overlap={context.overlap}): relative error {err:.2e} > {limit}",
                          flush=True)
                    raise SystemExit(1)


def op_call(op: str, x, weight, bias, states=None, context=None):
    if op == "fused":
        if context is None:
            return ccmps.short_conv_fused(x, weight, bias, None, True, True, initial_states=states)
        return cp.short_conv_fused(x, weight, bias, None, True, True, context=context)
    if context is None:
        return ccmps.causal_conv1d(x, weight, bias, "silu", initial_states=states)
    return cp.causal_conv1d(x, weight, bias, "silu", context=context)


def exchange_only(x, dim: int, width: int, group, world: int):
    """The two collectives of one forward + backward, with messages of the real size and no compute."""
    tail = x.new_zeros(x.shape[0], dim, width - 1, dtype=_exchange.transfer_dtype(x))
    gathered = _exchange.start_gather(tail, None, 1, group, world).result()
    grads = torch.zeros(world * tail.numel(), dtype=tail.dtype, device=tail.device)
    received = _exchange.finish_reduce_scatter(_exchange.start_reduce_scatter(grads, group), tail)
    return gathered, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, help="global T (default 65536 on CUDA, 4096 on CPU)")
    parser.add_argument("--dim", type=int, help="D (default 4096 on CUDA, 256 on CPU)")
    parser.add_argument("--widths", default="4", help="comma-separated W")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--ops", default="fused,conv")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--stat", choices=["median", "min"], default="median", help="statistic over --reps")
    parser.add_argument("--json", help="write the rows to this file (first rank)")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    seq_len = args.seq_len or (65536 if gpu else 4096)
    dim = args.dim or (4096 if gpu else 256)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("bf16" if gpu else "fp32")]
    if gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if seq_len % world:
        parser.error(f"--seq-len: expected a multiple of the {world} ranks, got {seq_len}")
    local_len = seq_len // world
    plain, overlapped = cp.ContextParallel(overlap=False), cp.ContextParallel(overlap=True)
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    if rank == 0:
        print(f"context parallelism over {world} ranks ({dist.get_backend()}, {name}), {str(dtype)[6:]}, "
              f"B{args.batch} T{seq_len} (T_local {local_len}) D{dim}; {args.stat} ms of {args.reps}, slowest rank")
        print("| op | W | what | forward | forward + backward |")
        print("|---|---:|---|---:|---:|")
    rows = []
    for op in args.ops.split(","):
        for width in (int(w) for w in args.widths.split(",")):
            verify(op, local_len, dim, width, dtype, device, (plain, overlapped))
            x, weight, bias, states, grad = make_inputs(op, args.batch, local_len, dim, width, dtype, device)

            def fwd(call):
                def run():
                    with torch.no_grad():
                        call()
                return run

            def fwd_bwd(call):
                def run():
                    out = call()
                    out = out[0] if isinstance(out, tuple) else out
                    torch.autograd.backward(out, grad)
                return run

            cases = {
                "local (op alone)": lambda: op_call(op, x, weight, bias, states),
                "cp": lambda: op_call(op, x, weight, bias, context=plain),
                "cp, overlap": lambda: op_call(op, x, weight, bias, context=overlapped),
            }
            for what, call in cases.items():
                row = {"op": op, "W": width, "what": what,
                       "forward": time_ms(fwd(call), device, args.warmup, args.reps, args.stat),
                       "forward_backward": time_ms(fwd_bwd(call), device, args.warmup, args.reps, args.stat)}
                rows.append(row)
            ex = time_ms(lambda: exchange_only(x, dim, width, dist.group.WORLD, world), device, args.warmup, args.reps,
                         args.stat)
            rows.append({"op": op, "W": width, "what": "exchange only (all-gather + reduce-scatter)",
                         "forward": float("nan"), "forward_backward": ex})
            if rank == 0:
                for row in rows[-4:]:
                    fw = "-" if row["forward"] != row["forward"] else f"{row['forward']:.3f}"
                    print(f"| {op} | {width} | {row['what']} | {fw} | {row['forward_backward']:.3f} |", flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"world": world, "device": name, "dtype": str(dtype), "batch": args.batch,
                       "seq_len": seq_len, "dim": dim, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Context parallelism (causal_conv1d_mps.context_parallel) against the single-process op on the whole sequence.

One `torch.multiprocessing` spawn of 4 CPU processes (gloo, file:// rendezvous) runs every case: groups of
2, 3 and 4 ranks, both `causal_conv1d` layouts, `seq_idx` packing, the fused op with a mask and with
`cu_seqlens`, fp32 and bf16, W = 1..8, slices of unequal lengths, shorter than W-1 and empty, sequence
boundaries inside slices and exactly at rank boundaries, NaN where the rules say it must go nowhere.
Each rank compares its slice of the outputs and of dx, the final states, and the group sums of the
weight / bias / initial-state gradients with the single-process result (docs/CONTRACT.md section 6 tolerances:
fp32 1e-5,
bf16 1e-2 relative), and writes what it found; each case is then one pytest item.

A second test runs a few cases on 2 CUDA GPUs with NCCL (skipped unless 2 GPUs are present).
"""
from __future__ import annotations

import json
import os
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORLDS = (2, 3, 4)
KINDS = ("bdt", "btd", "seq", "fused", "packed")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "bf16": 1e-2}
WIDTHS = tuple(range(1, 9))
CASES = [(w, kind, dt, width) for w in WORLDS for kind in KINDS for dt in DTYPES for width in WIDTHS]
# ShortConvolution(context_parallel=group), and torch.compile(fullgraph=True) of both functions
CASES += [(3, "module", "fp32", 4), (2, "compile", "fp32", 4)]


def case_id(case) -> str:
    world, kind, dt, width = case
    return f"P{world}-{kind}-{dt}-W{width}"


# --------------------------------------------------------------------------- inputs (same on every rank)


def slice_lengths(world: int, width: int, total: int) -> list[int]:
    """Rotates between a near-equal split, slices shorter than W-1 (a sequence spans 3+ ranks) and an
    empty slice, so that every world size meets each pattern."""
    pattern = width % 3
    if pattern == 0:
        base, extra = divmod(total, world)
        return [base + (r < extra) for r in range(world)]
    if pattern == 1:
        short = [1, 2, 1, 3][:world - 1]
        return short + [total - sum(short)]
    lengths = [4, 0, 3, 5][:world - 1]
    return lengths + [total - sum(lengths)]


def packed_ids(batch: int, total: int, bounds: list[int], gen: torch.Generator) -> torch.Tensor:
    """`[B, T]` increasing sequence ids with padding (-1) runs; every rank boundary starts a new id in
    row 0, and random boundaries elsewhere."""
    ids = torch.empty(batch, total, dtype=torch.int32)
    for b in range(batch):
        cuts = set(torch.randint(1, max(total, 2), (3,), generator=gen).tolist())
        if b == 0:
            cuts |= set(bounds[1:-1])
        current, pad = 0, False
        for t in range(total):
            if t in cuts:
                current += 1
                pad = bool(torch.rand(1, generator=gen) < 0.3)
            ids[b, t] = -1 if pad else current
    return ids


def packed_offsets(total: int, bounds: list[int], gen: torch.Generator) -> torch.Tensor:
    """`[N+1]` global offsets: rank boundaries, random cuts and one empty sequence."""
    cuts = set(bounds[1:-1]) | set(torch.randint(1, max(total, 2), (2,), generator=gen).tolist())
    cuts = sorted(c for c in cuts if 0 < c < total)
    offsets = [0] + cuts + [cuts[0] if cuts else 0] + [total]
    return torch.tensor(sorted(offsets), dtype=torch.int64)


def make_case(case, index: int) -> dict:
    world, kind, dt, width = case
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(1000 + index)
    total = 13
    lengths = slice_lengths(world, width, total)
    bounds = [sum(lengths[:r]) for r in range(world + 1)]
    batch, dim = (1, 6) if kind == "packed" else (2, 5)
    h = width - 1

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    c = {"kind": kind, "dtype": dtype, "lengths": lengths, "bounds": bounds, "width": width}
    wdtype = torch.float32 if (dtype == torch.bfloat16 and width % 2) else dtype
    c["weight"] = (torch.randn(dim, width, generator=gen) * width ** -0.5).to(wdtype)
    c["bias"] = (torch.randn(dim, generator=gen) * 0.5).to(wdtype) if width != 3 else None
    c["init_everywhere"] = width % 2 == 0
    c["nan"] = dt == "fp32" and width % 2 == 0
    if kind in ("bdt", "btd", "seq"):
        c["x"] = rnd(batch, dim, total)
        c["silu"] = width % 2 == 1
        c["seq_idx"] = packed_ids(batch, total, bounds, gen) if kind == "seq" else None
        c["init"] = rnd(batch, dim, h) if width != 5 else None
        if kind == "seq" and c["nan"]:
            pads = (c["seq_idx"] < 0).nonzero()
            if len(pads):
                b, t = pads[len(pads) // 2].tolist()
                c["x"][b, :, t] = float("nan")
        c["g_out"] = rnd(batch, dim, total)
    else:
        c["x"] = rnd(batch, total, dim)
        mask = torch.rand(batch, total, generator=gen)
        c["mask"] = torch.where(mask < 0.25, torch.zeros(()), mask + 0.5)
        c["residual"] = width % 2 == 0
        c["act"] = width % 3 != 0
        c["cu"] = packed_offsets(total, bounds, gen) if kind == "packed" else None
        rows = batch if c["cu"] is None else c["cu"].shape[0] - 1
        c["init"] = rnd(rows, dim, h) if width != 5 else None
        if kind == "packed":
            c["init_everywhere"] = True
        if c["nan"]:
            zeros = (c["mask"] == 0).nonzero()
            if len(zeros):
                b, t = zeros[0].tolist()
                c["x"][b, t] = float("nan")
        c["g_out"] = rnd(batch, total, dim)
    rows = c["init"].shape[0] if c["init"] is not None else (batch if c.get("cu") is None else c["cu"].shape[0] - 1)
    c["g_final"] = [rnd(rows, dim, h) for _ in range(world)]
    return c


# --------------------------------------------------------------------------- one case on one rank


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _time_slice(c, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    if c["kind"] in ("bdt", "seq"):
        return t[:, :, start:stop].contiguous()
    if c["kind"] == "btd":  # a channel-last view of a contiguous [B, T_local, D]
        return t[:, :, start:stop].transpose(1, 2).contiguous().transpose(1, 2)
    return t[:, start:stop].contiguous()


def _run(c, x, weight, bias, init, *, start=None, stop=None, context=None):
    """The op on `x` (the whole sequence without `context`, this rank's slice with it)."""
    import causal_conv1d_mps as ccmps
    import causal_conv1d_mps.context_parallel as cp

    lib = ccmps if context is None else cp
    extra = {} if context is None else {"context": context}
    if c["kind"] in ("bdt", "btd", "seq"):
        seq = c["seq_idx"]
        if seq is not None and context is not None:
            seq = seq[:, start:stop]
        return lib.causal_conv1d(x, weight, bias, "silu" if c["silu"] else None, seq_idx=seq,
                                 initial_states=init, return_final_states=True, **extra)
    mask = c["mask"] if context is None else c["mask"][:, start:stop]
    return lib.short_conv_fused(x, weight, bias, mask, c["act"], c["residual"], initial_states=init,
                                return_final_states=True, cu_seqlens=c["cu"], **extra)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double(), ref.detach().double()
    if out64.numel() == 0:
        return 0.0
    # NaN stays inside its sequence on both sides (docs/CONTRACT.md section 7): NaNs must sit exactly where
    # the single-process result has them; the rest is compared.
    finite = ~torch.isnan(ref64)
    if not torch.equal(torch.isnan(out64), ~finite):
        return float("inf")
    out64, ref64 = out64[finite], ref64[finite]
    scale = torch.linalg.vector_norm(ref64).item()
    diff = torch.linalg.vector_norm(out64 - ref64).item()
    return diff / scale if scale > 0 else diff


def run_module_case(rank: int, world: int, group) -> str:
    """`ShortConvolution(context_parallel=group)` on this rank's slice equals the module on the sequence."""
    import causal_conv1d_mps as ccmps
    import causal_conv1d_mps.context_parallel as cp

    torch.manual_seed(0)
    whole = ccmps.ShortConvolution(6, 4, bias=True, residual=True)
    split = ccmps.ShortConvolution(6, 4, bias=True, residual=True, context_parallel=group)
    split.load_state_dict(whole.state_dict())
    x = torch.randn(2, 11, 6, generator=torch.Generator().manual_seed(1))
    cache = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(2))
    y, new_cache = whole(x, cache=cache)
    y_l, cache_l = split(cp.shard(x, 1, group), cache=cache)
    problems = [f"{name}: relative error {err:.3e}" for name, err in
                (("y", _rel(y_l, cp.shard(y, 1, group))), ("cache", _rel(cache_l, new_cache))) if not err <= 1e-5]
    return "; ".join(problems)


def run_compile_case(rank: int, world: int, group) -> str:
    """`torch.compile(fullgraph=True)` (aot_eager: the tracing of inductor without a C++ build) of a function
    calling both context-parallel ops, forward and backward, equals eager."""
    import causal_conv1d_mps.context_parallel as cp

    context = cp.ContextParallel(group)
    gen = torch.Generator().manual_seed(3)
    x = cp.shard(torch.randn(2, 10, 6, generator=gen), 1, context).clone().requires_grad_(True)
    weight = torch.randn(6, 4, generator=gen).requires_grad_(True)

    def model(x, weight):
        y, final = cp.short_conv_fused(x, weight, None, None, True, True, return_final_states=True, context=context)
        z = cp.causal_conv1d(y.transpose(1, 2), weight, None, "silu", context=context)
        return z.square().sum() + final.sum()

    eager = torch.autograd.grad(model(x, weight), [x, weight])
    compiled = torch.autograd.grad(torch.compile(model, fullgraph=True, backend="aot_eager")(x, weight), [x, weight])
    errors = [_rel(a, b) for a, b in zip(compiled, eager)]
    return "" if all(e <= 1e-6 for e in errors) else f"compiled gradients differ from eager: {errors}"


def run_case(c, rank: int, world: int, group) -> str:
    """Returns "" when this rank's results match, else what differs."""
    import torch.distributed as dist

    import causal_conv1d_mps.context_parallel as cp

    tol = TOL["fp32" if c["dtype"] == torch.float32 else "bf16"]
    start, stop = c["bounds"][rank], c["bounds"][rank + 1]
    # single process, whole sequence
    x, w, b, init = _leaf(c["x"]), _leaf(c["weight"]), _leaf(c["bias"]), _leaf(c["init"])
    out, final = _run(c, x, w, b, init)
    g_final = sum(g.double() for g in c["g_final"]).to(final.dtype)
    leaves = [t for t in (x, w, b, init) if t is not None]
    ref_grads = torch.autograd.grad((out * c["g_out"]).sum() + (final * g_final).sum(), leaves, allow_unused=True)
    ref = dict(zip(["x", "weight", "bias", "init"][:4], [None] * 4))
    for name, t in zip([n for n, v in zip(["x", "weight", "bias", "init"], (x, w, b, init)) if v is not None],
                       ref_grads):
        ref[name] = t
    # context parallel, this rank's slice
    context = cp.ContextParallel(group, overlap=bool(c["width"] % 2))
    xl = _leaf(_time_slice(c, c["x"], start, stop))
    wl, bl = _leaf(c["weight"]), _leaf(c["bias"])
    il = _leaf(c["init"]) if (rank == 0 or c["init_everywhere"]) else None
    out_l, final_l = _run(c, xl, wl, bl, il, start=start, stop=stop, context=context)
    g_out_l = _time_slice(c, c["g_out"], start, stop)
    leaves_l = [t for t in (xl, wl, bl, il) if t is not None]
    grads = dict(zip([n for n, v in zip(["x", "weight", "bias", "init"], (xl, wl, bl, il)) if v is not None],
                     torch.autograd.grad((out_l * g_out_l).sum() + (final_l * c["g_final"][rank]).sum(), leaves_l,
                                         allow_unused=True)))
    problems = []

    def compare(name, got, want):
        err = _rel(got, want)
        if not err <= tol:
            problems.append(f"{name}: relative error {err:.3e} > {tol:.0e}")

    compare("out", out_l, _time_slice(c, out, start, stop))
    compare("final_states", final_l, final)
    compare("dx", grads["x"], _time_slice(c, ref["x"], start, stop))
    for name in ("weight", "bias", "init"):
        if c[name] is None:
            continue
        if ref[name] is None:  # not used at all (W == 1 states)
            ref[name] = torch.zeros(c[name].shape, device=c[name].device)
        partial = grads.get(name)
        if partial is None:
            partial = torch.zeros(ref[name].shape, dtype=torch.float64, device=ref[name].device)
        partial = partial.double()
        dist.all_reduce(partial, group=group)
        compare(f"d{name} (sum over ranks)", partial, ref[name])
    return "; ".join(problems)


# --------------------------------------------------------------------------- the spawned workers


def _worker(rank: int, world: int, init_file: str, out_dir: str, backend: str, cases: list) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = None
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    # a case that fails on one rank must not leave the others waiting forever in a collective
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    groups = {w: dist.new_group(list(range(w))) for w in WORLDS if w <= world}
    results = {}
    for index, case in enumerate(cases):
        size = case[0]
        if rank >= size:
            continue
        try:
            if case[1] in ("module", "compile"):
                runner = run_module_case if case[1] == "module" else run_compile_case
                results[case_id(case)] = runner(rank, size, groups[size])
                continue
            c = make_case(case, index)
            if device is not None:
                c = {k: _to(v, device) for k, v in c.items()}
            results[case_id(case)] = run_case(c, rank, size, groups[size])
        except Exception:  # noqa: BLE001 - reported to the parent, which fails the case
            results[case_id(case)] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, list):
        return [_to(t, device) for t in v]
    return v


def spawn_cases(world: int, backend: str, cases: list) -> dict[str, str]:
    """Runs `cases` in `world` spawned processes; returns what each case found, merged over ranks."""
    import torch.multiprocessing as mp

    # conftest switches the Triton interpreter on for CPU runs; CUDA workers must compile the real kernels
    interpret = os.environ.pop("TRITON_INTERPRET", None) if backend == "nccl" else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            init_file = os.path.join(tmp, "rendezvous")
            mp.spawn(_worker, args=(world, init_file, tmp, backend, cases), nprocs=world, join=True)
            merged: dict[str, str] = {}
            for rank in range(world):
                for name, msg in json.loads(Path(tmp, f"rank{rank}.json").read_text()).items():
                    if msg:
                        merged[name] = (merged.get(name, "") + f"\nrank {rank}: {msg}").strip()
                    else:
                        merged.setdefault(name, "")
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return merged


@pytest.fixture(scope="module")
def gloo_results():
    return spawn_cases(max(WORLDS), "gloo", CASES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_single_process_gloo(gloo_results, case):
    assert case_id(case) in gloo_results, f"{case_id(case)} did not run"
    message = gloo_results[case_id(case)]
    assert message == "", message


NCCL_CASES = [(2, kind, dt, width) for kind in KINDS for dt in DTYPES for width in (1, 2, 4, 8)]


def test_context_needs_an_initialised_process_group():
    import causal_conv1d_mps.context_parallel as cp

    with pytest.raises(TypeError, match="context: expected a ContextParallel"):
        cp.causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4), context="world")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        cp.short_conv_fused(torch.randn(1, 3, 2), torch.randn(2, 4))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (NCCL)")
def test_matches_single_process_nccl_two_gpus():
    results = spawn_cases(2, "nccl", NCCL_CASES)
    failed = {name: msg for name, msg in results.items() if msg}
    assert len(results) == len(NCCL_CASES) and not failed, failed


def test_global_seq_ids_are_never_silently_narrowed():
    """int64 ids are compared across ranks, so they are not renumbered: padding of any size stays padding,
    and an id that does not fit int32 is an error naming seq_idx (it used to wrap around silently)."""
    import causal_conv1d_mps.context_parallel as cp

    ids = torch.tensor([[-(2**40), -1, 0, 7, 2**31 - 1]], dtype=torch.int64)
    assert cp.global_seq_ids_int32(ids).tolist() == [[-1, -1, 0, 7, 2**31 - 1]]
    with pytest.raises(ValueError, match=r"seq_idx: .*2\*\*31.*got 4294967296"):
        cp.global_seq_ids_int32(torch.tensor([[0, 2**32]], dtype=torch.int64))

"""Where the time goes in an LFM2-style transformers model, with and without this package.

    python benchmarks/profile_transformers.py --device cuda --dtype bf16

For each variant (transformers' PyTorch functions, then `integrations.transformers.enable()`):
1. one prefill and one decode step under `torch.cuda.set_sync_debug_mode("warn")`: every host
   synchronisation prints a warning with its stack (CUDA only);
2. `torch.profiler` over a few decode steps, then over one prefill: the ops and kernels by host time and
   device time, and the number of kernel launches per decode step;
3. wall time of a prefill and of a decode step, the two variants alternating, median of `--repeats`
   (the device synchronised around each call).
The model is the example's (`examples/transformers_lfm2.py`, random weights, nothing downloaded).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import transformers_lfm2 as example  # noqa: E402

from causal_conv1d_mps.bench.devices import pick_device  # noqa: E402
from causal_conv1d_mps.integrations import transformers as cc_hf  # noqa: E402


def one_decode_step(model, prompt):
    """Prefill with a cache, then one more token through the cache (what `generate` repeats)."""
    out = model(prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    return model(token, past_key_values=out.past_key_values, use_cache=True)


def sync_report(model, prompt, device):
    if device.type != "cuda":
        print("(host synchronisation report: CUDA only)")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                one_decode_step(model, prompt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"host synchronisations in one prefill + one decode step: {len(caught)}")
    for w in caught[:8]:
        print(f"  {w.filename}:{w.lineno}: {str(w.message)[:300]}")


def _launches(averages) -> int:
    return sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                      "cudaLaunchKernelExC", "cuLaunchKernelEx"))


def _print_tables(prof, device, rows: int):
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    if device.type == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=rows))
    return averages


def profile(model, prompt, device, steps: int, rows: int):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        cache = out.past_key_values
        for _ in range(2):  # warm
            step = model(token, past_key_values=cache, use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with torch_profile(activities=activities, with_stack=False) as prof:
            for _ in range(steps):
                step = model(token, past_key_values=cache, use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
    print(f"--- {steps} decode steps")
    averages = _print_tables(prof, device, rows)
    if device.type == "cuda":
        print(f"kernel launches per decode step: {_launches(averages) / steps:.1f}")
    del step
    with torch.no_grad():
        with torch_profile(activities=activities, with_stack=False) as prof:
            model(prompt, use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
    print("--- one prefill")
    averages = _print_tables(prof, device, rows)
    if device.type == "cuda":
        print(f"kernel launches per prefill: {_launches(averages)}")


def wall_times(model, prompt, device, repeats: int) -> None:
    """Median wall time of a prefill and of one decode step per variant, the variants alternating."""
    import statistics
    import time

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3, result

    times = {False: {"prefill": [], "decode": []}, True: {"prefill": [], "decode": []}}
    with torch.no_grad():
        for _ in range(repeats):
            for enabled in (False, True):
                (cc_hf.enable if enabled else cc_hf.disable)()
                ms, out = timed(lambda: model(prompt, use_cache=True))
                times[enabled]["prefill"].append(ms)
                token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
                ms, _ = timed(lambda: model(token, past_key_values=cache, use_cache=True))
                times[enabled]["decode"].append(ms)
    cc_hf.disable()
    for what in ("prefill", "decode"):
        theirs, ours = (statistics.median(times[e][what]) for e in (False, True))
        print(f"{what:8} transformers {theirs:8.3f} ms   causal_conv1d_mps {ours:8.3f} ms   "
              f"speed-up {theirs / ours:5.2f}x   (median of {repeats})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bf16", choices=sorted(example.DTYPES))
    p.add_argument("--steps", type=int, default=4, help="decode steps under the profiler")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--repeats", type=int, default=20, help="of the wall-time comparison")
    args, rest = p.parse_known_args(argv)
    model_args = example.parse_args(["--dtype", args.dtype] + rest)
    device = pick_device(args.device)
    import transformers

    transformers.logging.set_verbosity_error()
    model, _ = example.build_model(model_args, device, example.DTYPES[args.dtype])
    prompt = torch.randint(3, model_args.vocab, (model_args.batch, model_args.prompt_len),
                           generator=torch.Generator().manual_seed(1)).to(device)
    for enabled in (False, True):
        (cc_hf.enable if enabled else cc_hf.disable)()
        with torch.no_grad():
            one_decode_step(model, prompt)  # compile and warm
        print(f"\n==================== causal_conv1d_mps {'enabled' if enabled else 'disabled'} ====================")
        sync_report(model, prompt, device)
        profile(model, prompt, device, args.steps, args.rows)
    cc_hf.disable()
    print("\n==================== wall time ====================")
    wall_times(model, prompt, device, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

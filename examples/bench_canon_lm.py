"""Times the Canon-layer LM of canon_lm.py: a training step and a decode step, with the Canon layers on
`causal_conv1d_mps.ShortConvolution` against the same model on `nn.Conv1d(groups=D)`, plus the model with
no Canon layers (what the four convolutions cost on top of attention and MLP).

    python examples/bench_canon_lm.py                           # best device, default sizes
    python examples/bench_canon_lm.py --device cpu --d-model 256 --layers 2 --seq-len 256
    python examples/bench_canon_lm.py --out canon_lm_bench.json # also save the figures

Both models hold the same weights and are checked against each other (float32) before anything is timed.
A training step is forward (autocast where the device has it), cross-entropy, backward and an AdamW step;
a decode step is one token for the whole batch through every layer after a prefill of `--seq-len` tokens.
Times are medians: CUDA events on cuda, `torch.mps.synchronize()` around each call on mps, perf_counter on cpu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from causal_conv1d_mps.bench.devices import device_name
from causal_conv1d_mps.bench.timing import synchronize

from canon_lm import CanonLM, CanonLMConfig, autocast, autocast_dtype, best_device, copy_weights


def median_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of `fn()` in milliseconds, measured with the device's own clock."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            synchronize(device)
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


@torch.no_grad()
def verify(library: CanonLM, plain: CanonLM, tokens: torch.Tensor) -> None:
    """Float32 training forward and prefill + two decode steps agree between the twins."""
    def rel_err(a, b):
        return ((a - b).norm() / b.norm()).item()

    worst = rel_err(library(tokens), plain(tokens))
    cache_lib, cache_plain = library.new_cache(), plain.new_cache()
    prompt, rest = tokens[:, :-2], tokens[:, -2:]
    worst = max(worst, rel_err(library(prompt, cache_lib), plain(prompt, cache_plain)))
    for i in range(2):
        step = rest[:, i : i + 1]
        worst = max(worst, rel_err(library(step, cache_lib), plain(step, cache_plain)))
    if not worst < 1e-4:
        raise RuntimeError(f"library and nn.Conv1d models disagree: relative error {worst:.2e} (expected < 1e-4)")


def training_step(model: CanonLM, tokens: torch.Tensor, amp_dtype, compile_model: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model, fullgraph=True) if compile_model else model
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with autocast(tokens.device, amp_dtype):
            logits = forward(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_step(model: CanonLM, tokens: torch.Tensor, amp_dtype):
    """A prefilled cache and a function that decodes one more token into it (the KV cache grows by one
    per call, by the same amount for every model timed)."""
    cache = model.new_cache()
    with torch.no_grad(), autocast(tokens.device, amp_dtype):
        next_token = model(tokens, cache)[:, -1:].argmax(-1)

    @torch.no_grad()
    def step():
        # Every call attends over one more cached key. cuDNN attention builds a plan per new length (about
        # 18 ms a call on an H200, seen with torch 2.11), which would swamp the step and favour whichever
        # model is timed second; the other SDPA kernels need no per-length set-up.
        with autocast(tokens.device, amp_dtype), sdpa_kernel(_NO_CUDNN):
            model(next_token, cache)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["mps", "cuda", "cpu"], help="default: best available")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the training forward")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on cpu (default: PyTorch's)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device) if args.device else best_device()
    amp_dtype = autocast_dtype(device, args.precision)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(args.vocab, (args.batch, args.seq_len), generator=generator).to(device)

    def build(conv: str, canon: str = "ABCD") -> CanonLM:
        config = CanonLMConfig(args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                               ffn_hidden=4 * args.d_model, canon=canon, conv=conv)
        return CanonLM(config).to(device)

    torch.manual_seed(0)
    library, plain, no_canon = build("library"), build("torch"), build("library", canon="")
    copy_weights(library, plain)
    verify(library.eval(), plain.eval(), tokens[:2, :64])

    rows = {}
    for name, model in (("ShortConvolution (causal_conv1d_mps)", library),
                        ("nn.Conv1d(groups=D), causal padding", plain),
                        ("no Canon layers", no_canon)):
        train_ms = median_ms(training_step(model.train(), tokens, amp_dtype, args.compile),
                             device, args.warmup, args.reps)
        decode_ms = median_ms(decode_step(model.eval(), tokens, amp_dtype), device, args.warmup, args.reps)
        rows[name] = {"train_step_ms": train_ms, "decode_step_ms": decode_ms}

    precision = str(amp_dtype or torch.float32).removeprefix("torch.")
    print(f"Canon LM: {device_name(device)}; torch {torch.__version__}; {precision}; d_model {args.d_model}, "
          f"{args.layers} layers, batch {args.batch}, seq {args.seq_len}{', compiled' if args.compile else ''}")
    print("| Canon layers on | train step (ms) | decode step (ms) |")
    print("|---|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['train_step_ms']:.2f} | {row['decode_step_ms']:.3f} |")
    ours, theirs = rows["ShortConvolution (causal_conv1d_mps)"], rows["nn.Conv1d(groups=D), causal padding"]
    print(f"| speedup over nn.Conv1d | {theirs['train_step_ms'] / ours['train_step_ms']:.2f}x "
          f"| {theirs['decode_step_ms'] / ours['decode_step_ms']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "precision": precision,
                       "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()

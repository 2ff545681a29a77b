"""An LFM2-style model of Hugging Face transformers, prefill + greedy generation, with and without this package.

    python examples/transformers_lfm2.py                          # best device, LFM2-350M-shaped layers
    python examples/transformers_lfm2.py --device cpu --hidden-size 512 --layers 8 --prompt-len 128
    python examples/transformers_lfm2.py --device cuda --dtype bf16 --batch 8 --out lfm2.json

The model is built from an `Lfm2Config` with random weights (nothing is downloaded): LFM2's layout of
gated short-convolution layers (width 3) and attention layers. It runs with transformers' own PyTorch
functions, then with `causal_conv1d_mps.integrations.transformers.enable()`; the generated tokens are
compared (identical in float32), then each variant is timed after `--warmup` untimed runs: the prefill
(one forward over the prompt, last position's logits only, as in `generate`) and greedy `generate`. Decode
time per token = (generate - prefill) / (new tokens - 1). Times are medians over `--repeats`, the two
variants alternating; the device is synchronised around each call. More rows time each function alone on the
model's conv shapes, which isolates the part this package changes from the rest of the model: one call
synchronised (latency) and decode calls back to back (what a host-bound decode loop pays per call).

`--diagnose` then times every call into this package inside `generate` against the same call replayed alone
(host time, and device time on cuda), counts launches that missed the Triton launch cache, and measures the
garbage collector's time per `generate` of each variant: where a model is slower with the package while one
call alone is faster, these say whether our calls cost more in the model or the time goes elsewhere.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout, not installed

from causal_conv1d_mps.bench.devices import device_name, pick_device  # noqa: E402
from causal_conv1d_mps.bench.timing import synchronize  # noqa: E402
from causal_conv1d_mps.integrations import transformers as cc_hf  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (mps, then cuda, then cpu), cpu, cuda or mps")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16, help="LFM2-350M: 16 (10 conv, 6 attention)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed runs of each variant first (allocator, oneDNN, caches)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on cpu (0: leave as is)")
    p.add_argument("--out", help="also write the figures to this JSON file")
    p.add_argument("--diagnose", action="store_true",
                   help="also time each call into this package inside generate and the same call replayed alone")
    return p.parse_args(argv)


def lfm2_layer_types(layers: int) -> list[str]:
    """LFM2-350M's layers (attention at 2, 5, 8, 10, 12, 14 of 16); other depths keep its ratio, 6 in 16,
    spread evenly."""
    if layers == 16:
        attention = {2, 5, 8, 10, 12, 14}
    else:
        count = round(layers * 6 / 16)
        attention = {i for i in range(layers) if (i + 1) * count // layers > i * count // layers}
    return ["full_attention" if i in attention else "conv" for i in range(layers)]


def build_model(args, device, dtype):
    import transformers

    heads = max(1, args.hidden_size // 64)
    config = transformers.Lfm2Config(
        vocab_size=args.vocab, hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 4,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        layer_types=lfm2_layer_types(args.layers), conv_L_cache=3, conv_bias=False,
        max_position_embeddings=args.prompt_len + args.new_tokens + 16, pad_token_id=0, eos_token_id=2,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.Lfm2ForCausalLM(config).to(device=device, dtype=dtype).eval(), config


def timed(fn, device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def measure(model, prompt, args, device) -> dict:
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        # the last position's logits only, as generate's own prefill computes them: the subtraction below then
        # leaves the decode steps (logits over the whole prompt would add a vocab-sized matmul per position)
        prefill, _ = timed(lambda: model(prompt, use_cache=True, logits_to_keep=1), device)
        generate, tokens = timed(lambda: model.generate(prompt, **settings), device)
    return {"prefill_s": prefill, "generate_s": generate, "tokens": tokens}


def conv_call_times(config, args, device, dtype, calls: int = 50) -> dict:
    """Median time of one call of each function alone, on the shapes of this model's conv layers:
    prefill `[B, D, prompt]` (LFM2's gated product is channel-last) and a decode step with the cache's
    `[B, D, W]` state; transformers' PyTorch functions against this package's. These synchronise around each
    call (latency of one call, device included); the back-to-back row synchronises once after `calls` decode
    calls, which is what a host-bound decode loop pays per call."""
    from transformers.models.lfm2 import modeling_lfm2

    cc_hf.disable()
    theirs = modeling_lfm2.causal_conv1d_fn, modeling_lfm2.causal_conv1d_update
    ours = cc_hf.causal_conv1d_fn, cc_hf.causal_conv1d_update
    g = torch.Generator().manual_seed(2)
    d, width = config.hidden_size, config.conv_L_cache
    x = torch.randn(args.batch, args.prompt_len, d, generator=g).to(device, dtype).transpose(1, 2)
    weight = torch.randn(d, width, generator=g).to(device, dtype)
    token = torch.randn(args.batch, d, 1, generator=g).to(device, dtype)
    state = torch.zeros(args.batch, d, width, device=device, dtype=dtype)

    def median_us(fn) -> float:
        times = []
        with torch.no_grad():
            for i in range(calls + 5):
                seconds, _ = timed(fn, device)
                if i >= 5:
                    times.append(seconds)
        return statistics.median(times) * 1e6

    def back_to_back_us(fn) -> float:
        """Per call over `calls` calls with one synchronisation at the end: what a host-bound model pays."""
        with torch.no_grad():
            for _ in range(5):
                fn()
            seconds, _ = timed(lambda: [fn() for _ in range(calls)], device)
        return seconds / calls * 1e6

    result = {}
    for name, (fn, update) in (("transformers_pytorch", theirs), ("causal_conv1d_mps", ours)):
        result[name] = {"prefill_conv_us": median_us(lambda: fn(x, weight, None)),
                        "decode_conv_us": median_us(lambda: update(token, state, weight, None)),
                        "decode_conv_back_to_back_us": back_to_back_us(lambda: update(token, state, weight, None))}
    return result


def gc_during(fn) -> tuple[float, int]:
    """(seconds spent in Python's garbage collector, collections) while `fn()` runs."""
    spent, started = [0.0, 0], [0.0]

    def callback(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - started[0]
            spent[1] += 1

    gc.callbacks.append(callback)
    try:
        fn()
    finally:
        gc.callbacks.remove(callback)
    return spent[0], spent[1]


def diagnose(model, prompt, args, device, calls: int = 200) -> dict:
    """Each call into this package inside `generate`, against the same call replayed alone.

    `api.causal_conv1d_fn` and `api.causal_conv1d_update` (what the integration calls) are wrapped with a
    wall clock without synchronisation (host time: what a host-bound decode step waits for) and, on cuda,
    a pair of events (device time from the call's start to the end of its kernels). The first call of each
    function is kept and replayed `calls` times back to back with the same tensors (the state cloned): if
    the model's calls cost more than the replay, something in the model's arguments or surroundings does it;
    if not, our calls are not where the model loses time. Also counts cuda launches that missed the launch
    cache (Triton's own launch path) during the recorded `generate` (0 expected after the warm-up), and the
    time Python's garbage collector takes during one `generate` of each variant (a cost that grows with the
    objects a call allocates and with the size of the process, so it shows in a model and not alone)."""
    from causal_conv1d_mps import api
    from causal_conv1d_mps.triton import _launch

    names = ("causal_conv1d_fn", "causal_conv1d_update")
    originals = {name: getattr(api, name) for name in names}
    host = {name: [] for name in names}
    events = {name: [] for name in names}
    first_call = {}

    def timing(name):
        real = originals[name]

        def call(*a, **k):
            first_call.setdefault(name, (a, k))
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            start = time.perf_counter()
            result = real(*a, **k)
            host[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                end.record()
                events[name].append((begin, end))
            return result
        return call

    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    report = {"gc_in_generate": {}}
    for variant, switch in (("transformers_pytorch", cc_hf.disable), ("causal_conv1d_mps", cc_hf.enable)):
        switch()
        with torch.no_grad():
            model.generate(prompt, **settings)
            seconds, collections = gc_during(lambda: (model.generate(prompt, **settings), synchronize(device)))
        report["gc_in_generate"][variant] = {"ms": seconds * 1e3, "collections": collections}
    cc_hf.enable()
    try:
        for name in names:
            setattr(api, name, timing(name))
        with torch.no_grad():
            model.generate(prompt, **settings)  # warm: compiles, fills the launch cache
            for name in names:
                host[name].clear()
                events[name].clear()
            misses = _launch.misses
            model.generate(prompt, **settings)
            synchronize(device)
            report["launch_cache_misses_in_generate"] = _launch.misses - misses if device.type == "cuda" else None
            in_model = {name: (list(host[name]), list(events[name])) for name in names}
            for name in names:
                host[name].clear()
                events[name].clear()
                if name not in first_call:
                    continue
                a, k = first_call[name]
                if name == "causal_conv1d_update":
                    a = (a[0], a[1].clone(), *a[2:])
                fn = getattr(api, name)
                for _ in range(calls):
                    fn(*a, **k)
                synchronize(device)
        for name in names:
            model_host, model_events = in_model[name]
            if not model_host:
                continue
            row = {"calls_in_generate": len(model_host),
                   "host_us_in_model": statistics.median(model_host) * 1e6,
                   "host_us_alone": statistics.median(host[name]) * 1e6}
            if device.type == "cuda":
                row["device_us_in_model"] = statistics.median(b.elapsed_time(e) for b, e in model_events) * 1e3
                row["device_us_alone"] = statistics.median(b.elapsed_time(e) for b, e in events[name]) * 1e3
            report[name] = row
    finally:
        for name in names:
            setattr(api, name, originals[name])
        cc_hf.disable()
    return report


def print_diagnosis(report: dict) -> None:
    print("\n--diagnose: each call into causal_conv1d_mps inside generate, and the same call replayed alone "
          "(medians, us)")
    print("| function | calls in generate | host, in model | host, alone | device, in model | device, alone |")
    print("|---|---|---|---|---|---|")
    for name in ("causal_conv1d_fn", "causal_conv1d_update"):
        row = report.get(name)
        if row is None:
            continue
        device_cols = (f"{row['device_us_in_model']:.1f} | {row['device_us_alone']:.1f}"
                       if "device_us_in_model" in row else "- | -")
        print(f"| {name} | {row['calls_in_generate']} | {row['host_us_in_model']:.1f} | "
              f"{row['host_us_alone']:.1f} | {device_cols} |")
    misses = report.get("launch_cache_misses_in_generate")
    if misses is not None:
        print(f"cuda launches that missed the launch cache during generate: {misses}")
    for variant, gc_row in report["gc_in_generate"].items():
        print(f"garbage collector during one generate, {variant}: {gc_row['ms']:.2f} ms in "
              f"{gc_row['collections']} collections")


def run_variant(enabled: bool, model, prompt, args, device) -> dict:
    if enabled:
        cc_hf.enable()
    else:
        cc_hf.disable()
    return measure(model, prompt, args, device)


def summarise(runs: list[dict], args) -> dict:
    prefill = statistics.median(r["prefill_s"] for r in runs)
    generate = statistics.median(r["generate_s"] for r in runs)
    decode_per_token = max(generate - prefill, 0.0) / max(args.new_tokens - 1, 1)
    tokens_out = args.batch * args.new_tokens
    return {
        "prefill_ms": prefill * 1e3,
        "prefill_tokens_per_s": args.batch * args.prompt_len / prefill,
        "generate_ms": generate * 1e3,
        "generate_tokens_per_s": tokens_out / generate,
        "decode_ms_per_token": decode_per_token * 1e3,
        "decode_tokens_per_s": args.batch / decode_per_token if decode_per_token > 0 else float("inf"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    model, config = build_model(args, device, dtype)
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(1)).to(device)
    print(f"device: {device_name(device)}   torch {torch.__version__}   transformers {transformers.__version__}")
    print(f"LFM2-style model: hidden {args.hidden_size}, {args.layers} layers "
          f"({config.layer_types.count('conv')} conv, {config.layer_types.count('full_attention')} attention), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.dtype}; batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats} after {args.warmup} warm-up")

    warm = {flag: run_variant(flag, model, prompt, args, device) for flag in (False, True)}  # and the check
    same = torch.equal(warm[False]["tokens"], warm[True]["tokens"])
    for _ in range(args.warmup - 1):
        for flag in (False, True):
            run_variant(flag, model, prompt, args, device)
    print(f"generated tokens identical with and without causal_conv1d_mps: {same}")
    runs = {False: [], True: []}
    for _ in range(args.repeats):
        for flag in (False, True):
            runs[flag].append(run_variant(flag, model, prompt, args, device))
    cc_hf.disable()

    theirs, ours = summarise(runs[False], args), summarise(runs[True], args)
    rows = [("prefill (ms)", "prefill_ms", False), ("prefill tokens/s", "prefill_tokens_per_s", True),
            ("generate (ms)", "generate_ms", False), ("generate tokens/s", "generate_tokens_per_s", True),
            ("decode ms/token", "decode_ms_per_token", False), ("decode tokens/s", "decode_tokens_per_s", True)]
    print(f"\n| {'':30} | transformers (PyTorch) | causal_conv1d_mps | speedup |")
    print("|---|---|---|---|")
    for label, key, higher_is_better in rows:
        speedup = ours[key] / theirs[key] if higher_is_better else theirs[key] / ours[key]
        print(f"| {label:30} | {theirs[key]:22.2f} | {ours[key]:17.2f} | {speedup:6.2f}x |")
    conv = conv_call_times(config, args, device, dtype)
    for label, key in (("one conv call, prefill (us)", "prefill_conv_us"),
                       ("one conv call, decode (us)", "decode_conv_us"),
                       ("decode call, back to back (us)", "decode_conv_back_to_back_us")):
        theirs_us, ours_us = conv["transformers_pytorch"][key], conv["causal_conv1d_mps"][key]
        print(f"| {label:30} | {theirs_us:22.1f} | {ours_us:17.1f} | {theirs_us / ours_us:6.2f}x |")
    layers = config.layer_types.count("conv")
    print(f"\n({layers} conv layers: each prefill and each decode step makes {layers} such calls)")
    diagnosis = None
    if args.diagnose:
        diagnosis = diagnose(model, prompt, args, device)
        print_diagnosis(diagnosis)
    if args.out:
        record = {"device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
                  "args": vars(args), "tokens_identical": same, "transformers_pytorch": theirs,
                  "causal_conv1d_mps": ours, "conv_calls": conv}
        if diagnosis is not None:
            record["diagnosis"] = diagnosis
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if dtype == torch.float32 and not same:
        print("error: float32 greedy tokens differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

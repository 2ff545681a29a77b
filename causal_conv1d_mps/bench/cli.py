"""Command line: `python -m causal_conv1d_mps.bench [options]` (see docs/BENCHMARK.md)."""

from __future__ import annotations

import argparse
import sys

import torch

from . import baselines, devices, report, timing
from .cases import build_case
from .progress import Progress
from .runner import run_case
from .suites import SUITES, specs_for

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
MIB = 1 << 20
ROTATE_BYTES = {"full": 256 * MIB, "quick": 1 * MIB}  # full: past the largest L2/SLC caches (H200, M-series Max)
COPY_BYTES = {"full": 512 * MIB, "quick": 16 * MIB}


def _dtype(text: str) -> torch.dtype:
    key = text.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected fp32, fp16 or bf16 (or float32, float16, bfloat16), got {text!r}")
    return DTYPES[key]


def _suites(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected 'all' or a comma list of {', '.join(SUITES)}, got {text!r}")
    return list(dict.fromkeys(names))


def _width(text: str) -> int:
    try:
        width = int(text)
    except ValueError:
        width = 0
    if width < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return width


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m causal_conv1d_mps.bench",
        description="Time causal-conv1d-mps against eager PyTorch (and torch.compile, Dao-AILab causal-conv1d, "
        "flash-linear-attention where available), verifying every result against a float64 oracle first.",
    )
    p.add_argument("--device", type=devices.device_argument, default="auto", help="auto (mps > cuda > cpu), cpu, cuda[:N] or mps")
    p.add_argument("--dtype", type=_dtype, default=torch.bfloat16, help="fp32, fp16 or bf16 (default bf16)")
    p.add_argument("--suite", type=_suites, default=list(SUITES),
                   help=f"comma list of {', '.join(SUITES)}, or all (default all)")
    p.add_argument("--width", type=_width, default=4, help="width W for every suite but 'width' (default 4)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (seconds; for CI)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the eager PyTorch function")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="time every implementation by replaying CUDA graphs of its calls (CUDA only): the "
                   "GPU-bound figure, without the host time of each call from Python")
    p.add_argument("--json", metavar="FILE", help="write the header and every row to FILE as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a bar chart of speedup and %% of copy bandwidth (matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; exit status 0 when every row verified, 1 when one did not, 2 on bad usage."""
    args = parse_args(argv)
    if args.plot and (why := report.matplotlib_missing()):
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        device = devices.pick_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cuda_graphs and device.type != "cuda":
        print(f"error: --cuda-graphs: expected a CUDA device, got {device.type}", file=sys.stderr)
        return 2
    import causal_conv1d_mps as ccmps

    mode = "quick" if args.quick else "full"
    plan = timing.QUICK if args.quick else timing.FULL
    torch.manual_seed(args.seed)
    libs, unusable_libs = baselines.thirdparty(device)
    copy_gbps = devices.copy_bandwidth(device, COPY_BYTES[mode], plan)
    header = devices.header(
        device, dtype=str(args.dtype).removeprefix("torch."), width=args.width, suites=args.suite, quick=args.quick,
        compile=args.compile, cuda_graphs=args.cuda_graphs, seed=args.seed, copy_gbps=copy_gbps,
        rotate_bytes=ROTATE_BYTES[mode],
        **{lib.name: lib.version for lib in libs}, **({"unusable": unusable_libs} if unusable_libs else {}),
    )
    specs = specs_for(args.suite, args.width, args.quick)
    table = report.Table((["compile"] if args.compile else []) + [lib.name for lib in libs], sys.stdout)
    table.start(header)
    progress = Progress(len(specs))
    records = []
    try:
        for spec in specs:
            progress.step(f"{spec.suite}: {spec.name}")
            case = build_case(spec, args.dtype, device, ccmps, libs)
            records.append(run_case(case, plan, ROTATE_BYTES[mode], copy_gbps, args.compile, args.cuda_graphs))
            _release_memory(device)
            progress.advance()
            progress.clear()
            table.row(records[-1])
    finally:
        progress.close()
    table.finish(records)
    if args.json:
        report.write_json(args.json, header, records)
    if args.plot:
        report.write_plot(args.plot, header, records)
    return 0 if all(r["correct"] for r in records) else 1


def _release_memory(device: torch.device) -> None:
    # Large rows hold GBs; give them back before the next row (unified memory on Macs is shared).
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()

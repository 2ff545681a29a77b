"""Device choice, the copy-bandwidth yardstick, and the facts printed in the header."""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys

import torch

from . import timing, traffic


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def device_argument(text: str) -> str:
    """The `--device` argument of the command-line tools: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`."""
    if text != "auto" and text.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def pick_device(name: str) -> torch.device:
    """`auto` prefers mps, then cuda, then cpu; a named device must be usable here."""
    if name == "auto":
        return torch.device("mps" if mps_available() else "cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False here")
    if device.type == "mps" and not mps_available():
        raise ValueError("--device mps: torch.backends.mps.is_available() is False here")
    return device


def _mac_chip() -> str:
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or platform.machine()
    except (OSError, subprocess.SubprocessError):
        return platform.machine()


def _cpu_name() -> str:
    if sys.platform == "darwin":
        return _mac_chip()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"{_mac_chip()} (MPS)"
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def copy_bandwidth(device: torch.device, nbytes: int, plan: timing.Plan) -> float:
    """GB/s of a device-to-device `copy_` of `nbytes` (bytes read plus written)."""
    numel = nbytes // 4
    sets = [(torch.empty(numel, device=device), torch.rand(numel, device=device))]  # larger than any cache
    t = timing.measure(lambda s: s[0].copy_(s[1]), sets, device, plan)
    return traffic.copy_bytes(numel, 4) / t.seconds / 1e9


def _module_version(name: str) -> str | None:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))
    except Exception:  # an optional module may fail to import in many ways; the header just says so
        return None


def package_version() -> str:
    """The version of the package actually imported (a source checkout may differ from the installed one)."""
    import causal_conv1d_mps

    found = getattr(causal_conv1d_mps, "__version__", None)
    if found:
        return str(found)
    try:
        from importlib.metadata import version

        return version("causal-conv1d-mps")
    except Exception:
        return "unknown"


def header(device: torch.device, **fields) -> dict:
    """Facts about the run; `fields` adds the options and the measured copy bandwidth."""
    os_name = f"macOS {platform.mac_ver()[0]}" if sys.platform == "darwin" else platform.platform()
    return {
        "device": device.type,
        "device_name": device_name(device),
        "os": os_name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "causal_conv1d_mps": package_version(),
        "package_path": os.path.dirname(importlib.import_module("causal_conv1d_mps").__file__),
        "backend_env": os.environ.get("CAUSAL_CONV1D_BACKEND"),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }

"""Output: the header and a Markdown table on stdout, a JSON file, an optional plot."""

from __future__ import annotations

import json
from typing import TextIO

SCHEMA = "causal-conv1d-mps-bench/1"
OPTIONAL_COLUMNS = ("compile", "dao", "fla")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.4f}" if v < 1 else f"{v:.3f}"


def _num(v, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, fmt) + suffix


def header_lines(header: dict) -> list[str]:
    extra = ", ".join(f"{k} {header[k]}" for k in ("dao", "fla") if header.get(k))
    backend = header.get("backend_env") or "default"
    return [
        f"# causal-conv1d-mps {header['causal_conv1d_mps']} benchmark",
        f"device: {header['device']} - {header['device_name']} - {header['os']}",
        f"torch {header['torch']}, triton {header['triton'] or 'not installed'}, python {header['python']}"
        + (f", {extra}" if extra else ""),
        f"dtype {header['dtype']}, backend {backend}, {'quick' if header['quick'] else 'full'} run"
        f"{', CUDA graph replays' if header.get('cuda_graphs') else ''}, {header['time_utc']}",
        f"copy bandwidth: {header['copy_gbps']:.1f} GB/s (device copy_, read + write)",
        *(f"{name} installed but not used: {why}" for name, why in header.get("unusable", {}).items()),
    ]


class Table:
    """The Markdown table, printed row by row as results arrive (long runs show progress on stdout)."""

    def __init__(self, optional: list[str], out: TextIO):
        self.optional = [c for c in OPTIONAL_COLUMNS if c in optional]
        self.out = out

    def columns(self) -> list[str]:
        return ["suite", "case", "ours ms", "sd %", "eager ms", "speedup", *(f"{c} ms" for c in self.optional),
                "GB/s", "%copy", "rel err", "ok"]

    def start(self, header: dict) -> None:
        cols = self.columns()
        self._write(header_lines(header) + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)])

    def row(self, r: dict) -> None:
        cells = [r["suite"], r["name"], _ms(r["ours_ms"]), _num(r["ours_stdev_pct"], ".1f"), _ms(r["eager_ms"]),
                 _num(r["speedup"], ".2f", "x"), *(_ms(r["impls"].get(c, {}).get("ms")) for c in self.optional),
                 _num(r["gbps"], ".1f"), _num(r["pct_copy"], ".1f"), _num(r["rel_err"], ".1e"),
                 "ok" if r["correct"] else "FAIL"]
        self._write(["| " + " | ".join(cells) + " |"])

    def finish(self, records: list[dict]) -> None:
        lines = []
        notes = [f"- {r['suite']}: {r['name']}: {n}" for r in records for n in r["notes"]]
        if notes:
            lines += ["", "notes:", *notes]
        failed = sum(not r["correct"] for r in records)
        verdict = f"{failed} failed verification" if failed else "all verified"
        lines += ["", f"{len(records)} rows, {verdict}"]
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


def write_json(path: str, header: dict, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"schema": SCHEMA, "header": header, "rows": records}, f, indent=1)
        f.write("\n")


def matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib, which is not installed here: pip install matplotlib (or drop --plot)"
    return None


def write_plot(path: str, header: dict, records: list[dict]) -> None:
    """Two panels: speedup over eager PyTorch, and % of copy bandwidth, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['suite']}: {r['name']}" for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, max(3.0, 0.28 * len(records) + 1.5)), sharey=True)
    ax1.barh(names, [r["speedup"] or float("nan") for r in records], color="tab:blue")
    ax1.axvline(1.0, color="black", linewidth=0.8)
    ax1.set_xscale("log")  # speedups span 0.1x to 100x across suites
    ax1.set_xlabel("speedup over eager PyTorch (x, log scale)")
    ax2.barh(names, [r["pct_copy"] or 0 for r in records], color="tab:green")
    ax2.set_xlabel("% of copy bandwidth")
    ax1.invert_yaxis()
    fig.suptitle(f"causal-conv1d-mps {header['causal_conv1d_mps']} - {header['device_name']} - {header['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

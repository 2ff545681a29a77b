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
        f"dtype {header['dtype']}, backend {backend}, {'quick' if header['quick'] else 'full'} run, "
        f"{header['time_utc']}",
        f"copy bandwidth: {header['copy_gbps']:.1f} GB/s (device copy_, read + write)",
    ]


def table_lines(records: list[dict]) -> list[str]:
    present = [c for c in OPTIONAL_COLUMNS if any(r["impls"].get(c) for r in records)]
    cols = ["suite", "case", "ours ms", "sd %", "eager ms", "speedup", *(f"{c} ms" for c in present),
            "GB/s", "%copy", "rel err", "ok"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        cells = [r["suite"], r["name"], _ms(r["ours_ms"]), _num(r["ours_stdev_pct"], ".1f"), _ms(r["eager_ms"]),
                 _num(r["speedup"], ".2f", "x"), *(_ms(r["impls"].get(c, {}).get("ms")) for c in present),
                 _num(r["gbps"], ".1f"), _num(r["pct_copy"], ".1f"), _num(r["rel_err"], ".1e"),
                 "ok" if r["correct"] else "FAIL"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def print_report(header: dict, records: list[dict], out: TextIO) -> None:
    lines = header_lines(header) + [""] + table_lines(records)
    notes = [f"- {r['name']}: {n}" for r in records for n in r["notes"]]
    if notes:
        lines += ["", "notes:", *notes]
    failed = sum(not r["correct"] for r in records)
    lines += ["", f"{len(records)} rows, {failed} failed verification" if failed else f"{len(records)} rows, all verified"]
    out.write("\n".join(lines) + "\n")


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
    ax1.barh(names, [r["speedup"] or 0 for r in records], color="tab:blue")
    ax1.axvline(1.0, color="black", linewidth=0.8)
    ax1.set_xlabel("speedup over eager PyTorch (x)")
    ax2.barh(names, [r["pct_copy"] or 0 for r in records], color="tab:green")
    ax2.set_xlabel("% of copy bandwidth")
    ax1.invert_yaxis()
    fig.suptitle(f"causal-conv1d-mps {header['causal_conv1d_mps']} - {header['device_name']} - {header['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

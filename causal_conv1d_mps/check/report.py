"""The report: a short text on stdout, and the full results as JSON to share."""

from __future__ import annotations

import json
import math

SCHEMA = "causal-conv1d-mps-check/1"
MAX_FAIL_LINES = 20  # wrong results listed one by one in the text; the JSON has them all


def summarize(accuracy: list[dict], kernels: list[dict], timings: list[dict]) -> dict:
    """Per op: checks, failures, worst error, who served; overall: pass/fail, fallbacks, compile failures."""
    ops = {}
    for op in dict.fromkeys(r["op"] for r in accuracy):
        rows = [r for r in accuracy if r["op"] == op]
        ops[op] = {
            "checks": len(rows),
            "failed": sum(not r["ok"] for r in rows),
            "worst_rel_err": _worst_by_dtype(rows),
            "served_by": sorted({r["served_by"] for r in rows}),
            "fallbacks": sum(r["fallback"] for r in rows),
            "fallback_dtypes": sorted({r["dtype"] for r in rows if r["fallback"]}),
        }
    failed = [r for r in accuracy if not r["ok"]] + [t for t in timings if not t["correct"]]
    fallbacks = sorted({r["op"] for r in accuracy if r["fallback"]} | {t["op"] for t in timings if t["fallback"]})
    return {
        "passed": not failed,
        "accuracy_checks": len(accuracy),
        "accuracy_failures": sum(not r["ok"] for r in accuracy),
        "timing_failures": sum(not t["correct"] for t in timings),
        "ops": ops,
        "fallback_ops": fallbacks,
        "compile_failures": [k["name"] for k in kernels if not k["ok"]],
        "exit_status": 0 if not failed else 1,
    }


def _worst_by_dtype(rows: list[dict]) -> dict[str, float | None]:
    """`{dtype: largest relative error}` over the rows that produced outputs (None where none did)."""
    worst: dict[str, float | None] = {}
    for r in rows:
        current = worst.setdefault(r["dtype"], None)
        if r["rel_err"] is not None and (current is None or r["rel_err"] > current):
            worst[r["dtype"]] = r["rel_err"]
    return worst


def _fmt_err(v) -> str:
    return "-" if v is None else "inf" if v == float("inf") else f"{v:.1e}"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.4f}" if v < 1 else f"{v:.2f}"


def _environment_lines(env: dict) -> list[str]:
    backend = env["backend"] + ("" if env["backend_forced"] else f" (default on {env['device']})")
    lines = [
        f"causal-conv1d-mps {env['causal_conv1d_mps']} self-check ({env['package_path']})",
        f"device: {env['device']} - {env['device_name']} - {env['os']}",
        f"torch {env['torch']}, triton {env['triton'] or 'not installed'}, python {env['python']}",
        f"backend: {backend}",
    ]
    if env.get("metal_path"):
        lines.append(f"  Metal sources from CAUSAL_CONV1D_METAL_PATH={env['metal_path']} (not the packaged ones)")
    if env.get("backend_unavailable"):
        lines.append(f"  WARNING: the {env['backend']} backend cannot run here: {env['backend_unavailable']}")
    for name, s in env["dtypes"].items():
        if not s["checked"]:
            lines.append(f"  {name}: not checked: {s['reason']}")
        elif s["served_by"] != env["backend"]:
            lines.append(f"  {name}: served by the reference path (FALLBACK): {s['reason']}")
        else:
            lines.append(f"  {name}: {s['served_by']}")
    return lines


def _kernel_lines(kernels: list[dict], env: dict) -> list[str]:
    if not kernels:
        return [f"compile: nothing to compile ({env['backend']} backend)"]
    how = {"compile_family": ", each family", "first call": ", first call of each op"}.get(kernels[0]["how"], "")
    lines = [f"compile ({env['backend']}{how}):"]
    for k in kernels:
        seconds = "-" if k["seconds"] is None else f"{k['seconds']:.2f} s"
        verdict = "ok" if k["ok"] else f"FAILED: {k['error']}"
        lines.append(f"  {k['name']:<30} {seconds:>9}  {verdict}")
    return lines


def _failure(r: dict) -> str:
    """What went wrong in a failed check: the error raised, or each wrong output and by how much."""
    if r["error"]:
        return r["error"]
    wrong = [f"{k} not bit-exact" if g["exact"] else f"{k} rel err {_fmt_err(g['rel_err'])} > {r['tolerance']:.0e}"
             for k, g in r["outputs"].items() if not g["ok"]]
    return ", ".join(wrong)


def _accuracy_lines(accuracy: list[dict], summary: dict, env: dict) -> list[str]:
    dtypes = list(dict.fromkeys(r["dtype"] for r in accuracy))
    lines = ["accuracy against float64 on the CPU: largest relative error per dtype (tolerance float32 1e-5, "
             "float16 2e-3, bfloat16 1e-2; states bit-exact)",
             f"  {'op':<28} {'checks':>6} {'failed':>6} " + " ".join(f"{d:>9}" for d in dtypes) + "  served by"]
    for op, s in summary["ops"].items():
        served = env["backend"]
        if s["fallbacks"]:
            served = f"FALLBACK to reference in {s['fallbacks']} of {s['checks']} ({', '.join(s['fallback_dtypes'])})"
        errs = " ".join(f"{_fmt_err(s['worst_rel_err'].get(d)):>9}" for d in dtypes)
        lines.append(f"  {op:<28} {s['checks']:>6} {s['failed']:>6} {errs}  {served}")
    return lines + _failure_lines([r for r in accuracy if not r["ok"]])


def _failure_lines(failed: list[dict]) -> list[str]:
    """One line per wrong result; checks that raised the same error share one line (a kernel that does
    not compile fails every check of its op the same way)."""
    lines, raised = [], {}
    for r in failed:
        if r["error"]:
            raised.setdefault((r["op"], r["error"]), []).append(r)
        else:
            lines.append(f"  FAIL {r['op']} [{r['case']}] {r['dtype']} W{r['width']} {r['shape']}: {_failure(r)}")
    shown = lines[:MAX_FAIL_LINES]
    if len(lines) > len(shown):
        shown.append(f"  ... and {len(lines) - len(shown)} more wrong results (all in the JSON)")
    for (op, error), rows in raised.items():
        where = rows[0]
        also = f" and {len(rows) - 1} more checks of {op}" if len(rows) > 1 else ""
        shown.append(f"  FAIL {op} [{where['case']}] {where['dtype']} W{where['width']} {where['shape']}{also}: "
                     f"{error}")
    return shown


def _timing_lines(timings: list[dict], env: dict) -> list[str]:
    if not timings:
        return ["timing: skipped (--no-timing)"]
    lines = [f"timing ({timings[0]['dtype']}, median ms per call; eager = the F.conv1d(groups=D) PyTorch you would "
             "write):", f"  {'case':<52} {'ours':>8} {'eager':>8} {'speedup':>8}"]
    for t in timings:
        speedup = "-" if t["speedup"] is None else f"{t['speedup']:.2f}x"
        flag = "" if t["correct"] else "  FAIL"
        flag += "  FALLBACK to reference" if t["fallback"] else ""
        lines.append(f"  {t['name']:<52} {_ms(t['ours_ms']):>8} {_ms(t['eager_ms']):>8} {speedup:>8}{flag}")
        lines += [f"    note: {n}" for n in t["notes"] if not t["correct"] or "warning" in n or "error" in n]
    if env["device"] == "cpu":
        lines.append(f"  (on cpu the {env['backend']} backend runs on the CPU: a smoke test, not a performance figure)")
    return lines


def _verdict_lines(summary: dict) -> list[str]:
    lines = []
    if summary["compile_failures"]:
        lines.append(f"WARNING: kernels that failed to compile: {', '.join(summary['compile_failures'])} "
                     "(their ops ran on the reference path)")
    if summary["fallback_ops"]:
        lines.append(f"WARNING: these ops fell back to the reference path (slower, still correct): "
                     f"{', '.join(summary['fallback_ops'])}")
    checks = f"{summary['accuracy_checks']} accuracy checks, {summary['accuracy_failures']} failed"
    if summary["timing_failures"]:
        checks += f"; {summary['timing_failures']} timed shapes gave a wrong result"
    lines.append(f"result: {'PASS' if summary['passed'] else 'FAIL'} ({checks})")
    return lines


def environment_text(env: dict) -> str:
    return "\n".join(_environment_lines(env)) + "\n"


def compile_text(kernels: list[dict], env: dict) -> str:
    return "\n".join(_kernel_lines(kernels, env)) + "\n"


def results_text(env: dict, accuracy: list[dict], timings: list[dict] | None, summary: dict) -> str:
    """The accuracy table, the timing table and the verdict."""
    blocks = [_accuracy_lines(accuracy, summary, env), _timing_lines(timings or [], env), _verdict_lines(summary)]
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"


def write_json(path: str, env: dict, kernels: list[dict], accuracy: list[dict], timings: list[dict] | None,
               summary: dict) -> None:
    document = {"schema": SCHEMA, "environment": env, "compile": kernels, "accuracy": accuracy,
                "timing": timings, "summary": summary}
    with open(path, "w") as f:
        json.dump(_finite(document), f, indent=1, default=str)
        f.write("\n")


def _finite(value):
    """The document with infinite or NaN floats as strings ("inf"): strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

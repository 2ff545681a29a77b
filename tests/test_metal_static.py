"""Static checks of the shipped .metal sources for what Apple's Metal compiler rejects but the Linux
harness (which compiles the kernels as C++) would accept. Each rule is shown to fire on a bad snippet."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).resolve().parent.parent / "causal_conv1d_mps" / "metal" / "kernels"
SHIPPED = sorted(KERNEL_DIR.glob("*.metal"))
MAX_LINES = 700

_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_VECTOR_TYPES = r"(?:float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong|bool)[234]"

# rule name -> (pattern searched in the comment-free source, what Metal requires instead)
RULES = {
    "std": (re.compile(r"\bstd::"), "Metal has no C++ standard library: use metal:: functions"),
    "double": (re.compile(r"\bdouble\b"), "Metal has no double precision"),
    "include": (re.compile(r"#\s*include\s*[<\"](?!metal_stdlib[>\"])"),
                "only <metal_stdlib> is available everywhere (PyTorch's headers are not on every install)"),
    "vector_constructor": (re.compile(rf"\b{_VECTOR_TYPES}\s*\("),
                           "vector constructors do not compile in the harness: index lanes instead"),
    "implicit_bfloat": (re.compile(r"\bbfloat\s+\w+\s*=(?!\s*static_cast\s*<\s*bfloat\s*>)[^;]*;"),
                        "Metal rejects implicit float-to-bfloat conversion: write static_cast<bfloat>(v)"),
}


def violations(source: str) -> list[str]:
    """Every rule broken by `source`, as 'rule: line N: text'."""
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        if not line.isascii():
            found.append(f"non_ascii: line {number}: Metal reads sources as ASCII")
    code = _COMMENTS.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), source)
    for name, (pattern, why) in RULES.items():
        for match in pattern.finditer(code):
            number = code.count("\n", 0, match.start()) + 1
            found.append(f"{name}: line {number}: {match.group().strip()!r} ({why})")
    return found


def test_sources_are_shipped():
    names = {p.name for p in SHIPPED}
    assert "common.metal" in names, f"common.metal missing from {KERNEL_DIR}: {sorted(names)}"
    assert len(names) >= 4, f"expected the kernel files of every op, found {sorted(names)}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_source_is_metal_safe(path: Path):
    source = path.read_bytes().decode("utf-8", errors="replace")
    problems = violations(source)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_source_is_small_enough_to_read(path: Path):
    lines = path.read_text(encoding="ascii").count("\n")
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it (limit {MAX_LINES})"


BAD_SNIPPETS = {
    "non_ascii": "inline float f(float x) { return x; }  // \u00b5s\n",
    "std": "inline float f(float x) { return std::max(x, 0.0f); }\n",
    "double": "inline double f(double x) { return x; }\n",
    "include": "#include <metal_stdlib>\n#include <c10/metal/utils.h>\n",
    "vector_constructor": "inline float4 f(float a) { return float4(a, a, a, a); }\n",
    "implicit_bfloat": "inline void f(device bfloat* y, float v) { bfloat r = v * 2.0f; y[0] = r; }\n",
}


@pytest.mark.parametrize("rule", sorted(BAD_SNIPPETS))
def test_rule_fires_on_a_bad_snippet(rule: str):
    problems = violations(BAD_SNIPPETS[rule])
    assert any(p.startswith(rule + ":") for p in problems), f"rule {rule} missed its snippet; found {problems}"


def test_rules_accept_the_correct_forms():
    good = (
        "#include <metal_stdlib>\n"
        "using namespace metal;\n"
        "// std::max, double, float4(a, b) and bfloat r = v; in a comment are fine\n"
        "inline void f(device bfloat* y, float v, float4 q) {\n"
        "  bfloat r = static_cast<bfloat>(v * q[0]);\n"
        "  y[0] = r;\n"
        "}\n"
    )
    assert violations(good) == []


# The loader's source assembly and availability answers: no compiler or GPU needed.

def test_sources_are_assembled_with_common_first(monkeypatch):
    from causal_conv1d_mps.metal import _loader

    monkeypatch.delenv(_loader.SOURCE_ENV_VAR, raising=False)
    files = [p.name for p in _loader.source_files()]
    assert files[0] == "common.metal" and sorted(files) == sorted(p.name for p in SHIPPED), files
    source = _loader.kernel_source()
    assert source.index("struct Seg") < source.index("struct CausalConvCtx"), "common.metal must come first"


def test_source_override_accepts_a_file_or_a_folder(monkeypatch, tmp_path):
    from causal_conv1d_mps.metal import _loader

    (tmp_path / "b.metal").write_text("// b\n")
    (tmp_path / "common.metal").write_text("// common\n")
    (tmp_path / "notes.txt").write_text("not a kernel\n")
    monkeypatch.setenv(_loader.SOURCE_ENV_VAR, str(tmp_path))
    assert [p.name for p in _loader.source_files()] == ["common.metal", "b.metal"]
    monkeypatch.setenv(_loader.SOURCE_ENV_VAR, str(tmp_path / "b.metal"))
    assert _loader.kernel_source().endswith("// b\n")
    monkeypatch.setenv(_loader.SOURCE_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=_loader.SOURCE_ENV_VAR):
        _loader.source_files()


def test_unsupported_reasons_name_the_cause():
    import torch

    from causal_conv1d_mps.metal import _loader

    assert "float64" in _loader.unsupported_reason(torch.device("cpu"), torch.float64)
    assert "int32" in _loader.unsupported_reason(torch.device("cpu"), torch.int32)
    assert "cuda" in _loader.unsupported_reason(torch.device("cuda"), torch.float32)


def test_mps_needs_the_public_compile_shader(monkeypatch):
    """PyTorch 2.6 has only the private `_compile_shader` (list arguments unverified): not used."""
    import torch

    from causal_conv1d_mps.metal import _loader

    monkeypatch.delattr(torch.mps, "compile_shader", raising=False)
    monkeypatch.setattr(torch.mps, "_compile_shader", lambda source: None, raising=False)
    _loader.unsupported_reason.cache_clear()
    try:
        reason = _loader.unsupported_reason(torch.device("mps"), torch.float32)
    finally:
        _loader.unsupported_reason.cache_clear()
    assert reason is not None and "compile_shader" in reason and "2.7" in reason


def test_assembled_sources_stay_ascii_with_a_non_ascii_path(monkeypatch, tmp_path):
    """Each file is preceded by `#line 1 "<path>"`; a non-ASCII path must not make the source non-ASCII."""
    from causal_conv1d_mps.metal import _loader

    folder = tmp_path / "caf\u00e9"
    folder.mkdir()
    (folder / "common.metal").write_text("// common\n")
    monkeypatch.setenv(_loader.SOURCE_ENV_VAR, str(folder))
    source = _loader.kernel_source("states")
    assert source.isascii()
    assert '#line 1 "common.metal"\n// common\n' in source
    monkeypatch.delenv(_loader.SOURCE_ENV_VAR)
    assert f'#line 1 "{_loader.KERNEL_DIR / "states.metal"}"\n' in _loader.kernel_source("states")


def test_the_first_error_line_is_the_first_diagnostic():
    from causal_conv1d_mps.metal._loader import first_error_line

    wrapped = ('Failed to create metal library, error: Error Domain=MTLLibraryErrorDomain Code=3 "program_source:'
               "12:5: error: use of undeclared identifier 'oops'\nprogram_source:20:1: error: second\" UserInfo={}")
    assert first_error_line(wrapped) == "program_source:12:5: error: use of undeclared identifier 'oops'"
    harness = "compiling failed:\n/k/states.metal:4:37: error: no\nnote"
    assert first_error_line(harness) == "/k/states.metal:4:37: error: no"
    assert first_error_line("\nsomething went wrong\nerror later") == "error later"
    assert first_error_line("") == "(no compiler message)"

"""The address-space check (metal_harness/address_spaces.py): every kernel instantiation of every shipped
kernel family compiles with Metal's address spaces enforced (clang, C++ for OpenCL), and planted mismatches
that the harness proper cannot see (it defines address spaces away) make the check fail."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("metal_harness") is None:  # test-only package at the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metal_harness.address_spaces import check_address_spaces, unavailable_reason  # noqa: E402

from causal_conv1d_mps.metal import _loader  # noqa: E402

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PLAIN_KERNELS = {"reduce_rows_float"}  # not templates: checked as written, not counted as instantiations


@pytest.fixture(autouse=True)
def _packaged_sources(monkeypatch):
    monkeypatch.delenv(_loader.SOURCE_ENV_VAR, raising=False)


def _expected_instantiations(family: str) -> int:
    names = {n for dtype in DTYPES for n in _loader.family_kernel_names(family, dtype)}
    return len(names - PLAIN_KERNELS)


@pytest.mark.parametrize("family", _loader.FAMILIES)
def test_every_instantiation_compiles_with_address_spaces(family):
    count = check_address_spaces(_loader.kernel_source(family), f"{family} family")
    assert count == _expected_instantiations(family), f"{family}: {count} instantiations checked"


def _plant(family: str, old: str, new: str) -> str:
    source = _loader.kernel_source(family)
    assert old in source, f"the planted edit no longer applies: {old!r} is not in the {family} source"
    return source.replace(old, new)


def test_conditional_of_class_prvalue_and_thread_lvalue_fails():
    """The construct Apple's compiler rejected in seg_next, planted back."""
    source = _plant("causal_conv1d", "    if (has_seq) {\n      return seg_first(b, t);\n    }\n    return prev;",
                    "    return has_seq ? seg_first(b, t) : prev;")
    with pytest.raises(SyntaxError, match=r"incompatible operand types \('Seg' and '__private Seg'\)"):
        check_address_spaces(source, "planted")


def test_device_pointer_into_a_thread_pointer_fails_in_its_instantiation():
    source = _plant("states", "if (pos >= start) {", "if (pos >= start) {\n    thread const T* own = x;")
    with pytest.raises(SyntaxError, match=r"__private .*__global|__global.*__private"):
        check_address_spaces(source, "planted")


def test_threadgroup_array_keeps_its_address_space():
    """`threadgroup float red[N]` passed where a device pointer is expected."""
    source = _plant("short_conv_fused", "cc_backward_group<T, W>(c, dx, part, red,",
                    "cc_backward_group<T, W>(c, dx, red, red,")
    with pytest.raises(SyntaxError, match="__local"):
        check_address_spaces(source, "planted")


def test_implicit_float_to_bfloat_fails_only_where_instantiated():
    source = _plant("states", "      out[i] = v;", "      out[i] = static_cast<float>(v);")
    with pytest.raises(SyntaxError, match=r"gather_states<bfloat>"):
        check_address_spaces(source, "planted")


def test_errors_name_the_real_file_and_line():
    source = _plant("short_conv_update", "  const long B = p[UPDATE_B];", "  const long B = p[UPDATE_B] + undeclared;")
    with pytest.raises(SyntaxError, match=r"short_conv_update\.metal:\d+:\d+: error"):
        check_address_spaces(source, "planted")

"""One source of truth for the host/kernel contract (causal_conv1d_mps/metal/_contract.py): the generated
MSL header and the launchers' parameter lists agree, and no kernel file indexes its parameters by a raw
number or writes a flag value by hand. No compiler needed."""
from __future__ import annotations

import importlib
import re

import pytest
import torch

from causal_conv1d_mps._activation import SILU
from causal_conv1d_mps.metal import _contract, _launch, _loader

# The launcher modules (the package's attributes of these names are the ops).
conv_launchers = importlib.import_module("causal_conv1d_mps.metal.causal_conv1d")
fused_launchers = importlib.import_module("causal_conv1d_mps.metal.short_conv_fused")
update_launchers = importlib.import_module("causal_conv1d_mps.metal.short_conv_update")

# Which parameter table each kernel file's kernels read.
FILE_TABLES = {"causal_conv1d.metal": {"CONV"}, "short_conv_fused.metal": {"FUSED"},
               "short_conv_update.metal": {"UPDATE"}, "states.metal": {"GATHER", "REDUCE"}, "common.metal": set()}
KERNEL_TABLES = (("causal_conv1d_", "CONV"), ("short_conv_fused_", "FUSED"), ("short_conv_update_", "UPDATE"),
                 ("gather_states_", "GATHER"), ("reduce_rows_", "REDUCE"))


def _code(path) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(encoding="ascii"), flags=re.S)


def test_the_header_defines_every_slot_flag_and_the_group_once():
    header = _contract.msl_header()
    assert header.isascii()
    for table, slots in _contract.PARAMS.items():
        assert len(set(slots)) == len(slots), f"{table}: a slot name is repeated"
        for i, slot in enumerate(slots):
            assert re.search(rf"^\s*{table}_{slot} = {i},$", header, re.M), f"{table}_{slot} is not slot {i}"
        assert f"{table}_COUNT = {len(slots)}" in header
    for name, bit in _contract.FLAGS.items():
        assert f"#define CC_{name} {bit}\n" in header
    assert len(set(_contract.FLAGS.values())) == len(_contract.FLAGS)
    assert f"#define CC_GROUP {_contract.GROUP}\n" in header


def test_every_compiled_source_starts_with_the_generated_header(monkeypatch):
    monkeypatch.delenv(_loader.SOURCE_ENV_VAR, raising=False)
    for family in _loader.FAMILIES:
        source = _loader.kernel_source(family)
        assert source.index(_contract.msl_header()) < source.index("struct Seg"), family


def contract_violations(code: str, allowed: set[str]) -> list[str]:
    """Parameter reads that are not named slots of the `allowed` tables, and contract values defined by hand."""
    found = []
    for index in re.findall(r"\bp\[([^\]]*)\]", code):
        table, _, slot = index.partition("_")
        if table not in allowed or slot not in _contract.PARAMS[table]:
            found.append(f"p[{index}] is not a slot of {sorted(allowed)}")
    found += [f"defines {m.group(1)} by hand" for m in
              re.finditer(r"#\s*define\s+(CC_(?:HAS_\w+|ACTIVATION_\w+|RESIDUAL|CIRCULAR|GROUP))\b", code)]
    return found


@pytest.mark.parametrize("name", sorted(FILE_TABLES))
def test_kernel_files_read_parameters_by_their_own_slot_names_only(name):
    problems = contract_violations(_code(_loader.KERNEL_DIR / name), FILE_TABLES[name])
    assert not problems, f"{name}: {problems}"


def test_planted_raw_indices_and_hand_written_flags_are_found():
    bad = ("#define CC_HAS_BIAS 1\n"
           "inline long f(constant long* p) { return p[3] + p[FUSED_T] + p[CONV_NOPE]; }\n")
    problems = contract_violations(bad, {"CONV"})
    assert len(problems) == 4, problems


def test_pack_requires_every_slot_by_name():
    slots = _contract.PARAMS["REDUCE"]
    assert _contract.pack("REDUCE", ROWS=3, COLS=4) == [3, 4] and slots == ("ROWS", "COLS")
    with pytest.raises(TypeError, match=r"missing \['COLS'\]"):
        _contract.pack("REDUCE", ROWS=3)
    with pytest.raises(TypeError, match=r"unknown \['ROW'\]"):
        _contract.pack("REDUCE", ROW=3, ROWS=3, COLS=4)


@pytest.fixture
def launches(monkeypatch):
    """Records every launch of the launchers (no compiler: nothing runs)."""
    calls = []

    def record(device, family, name, args, threads, group_size=None):
        calls.append((family, name, args[-1], threads))

    for module in (_launch, conv_launchers, fused_launchers, update_launchers):
        monkeypatch.setattr(module, "launch", record)
    return calls


def _table(kernel: str) -> str:
    return next(table for prefix, table in KERNEL_TABLES if kernel.startswith(prefix))


def test_launchers_fill_every_slot_of_their_kernels_table(launches):
    b, d, t, w = 2, 5, 11, 4
    x = torch.randn(b, d, t)
    weight, init = torch.randn(d, w), torch.randn(b, d, w - 1)
    conv_launchers.causal_conv1d_fwd(x, weight, None, None, init, SILU, True)
    conv_launchers.causal_conv1d_bwd(x.transpose(1, 2).contiguous().transpose(1, 2), weight, None, None, init,
                                     torch.randn(b, d, t).transpose(1, 2).contiguous().transpose(1, 2), None, SILU)
    xf = torch.randn(b, t, d)
    fused_launchers.short_conv_fused_fwd(xf, weight, None, torch.ones(b, t), init, None, SILU, True, True)
    fused_launchers.short_conv_fused_bwd(xf, weight, None, None, init, None, torch.randn(b, t, d), None, SILU, True)
    update_launchers.short_conv_update(torch.randn(b, 1, d), torch.randn(b, d, w), weight, None, None, None,
                                       SILU, False)
    update_launchers.causal_conv1d_varlen_states(torch.randn(t, d), torch.tensor([0, 4, t], dtype=torch.int32), 3)
    seen = set()
    for family, name, params, threads in launches:
        table = _table(name)
        seen.add(table)
        slots = _contract.PARAMS[table]
        assert len(params) == len(slots), f"{name}: {len(params)} parameters for the {len(slots)} slots of {table}"
        values = dict(zip(slots, params))
        if table in ("CONV", "FUSED"):
            assert (values["B"], values["D"], values["T"], values["W"]) == (b, d, t, w), (name, values)
            if "_bwd_" in name and "dinit" not in name:
                assert values["CHANNELS"] > 0 and values["RUN_GROUPS"] > 0, (name, values)
        if table == "CONV" and "_bwd_" in name:
            assert values["CHANNEL_LAST"] == 1 and values["X_STRIDE_D"] == 1, (name, values)
    assert seen == set(_contract.PARAMS), f"tables never launched: {set(_contract.PARAMS) - seen}"

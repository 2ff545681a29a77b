"""`examples/transformers_lfm2.py` runs end to end on a tiny model and reports both variants."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "transformers_lfm2.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("transformers_lfm2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_and_reports_identical_tokens(tmp_path, capsys):
    example = _load_example()
    out = tmp_path / "lfm2.json"
    code = example.main(["--device", "cpu", "--hidden-size", "64", "--layers", "3", "--vocab", "128",
                         "--prompt-len", "10", "--new-tokens", "4", "--repeats", "1", "--warmup", "1",
                         "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "generated tokens identical with and without causal_conv1d_mps: True" in printed
    assert "| decode ms/token" in printed
    record = json.loads(out.read_text())
    assert record["tokens_identical"] is True
    for variant in ("transformers_pytorch", "causal_conv1d_mps"):
        assert record[variant]["generate_tokens_per_s"] > 0 and record[variant]["prefill_ms"] > 0


def test_layer_layout_follows_lfm2():
    example = _load_example()
    assert [i for i, t in enumerate(example.lfm2_layer_types(16)) if t != "conv"] == [2, 5, 8, 10, 12, 14]
    assert example.lfm2_layer_types(8).count("full_attention") == 3

"""`causal_conv1d_mps.integrations.transformers.enable()` / `disable()`: what gets replaced, when, and undo.

Import order matters here, so the orders that need a fresh interpreter run in a subprocess: enabling
before transformers is imported, modeling modules imported while enabled, and Dao-AILab's
`causal_conv1d` package (a stand-in on `sys.path`) kept unless `force=True`. The rest runs in-process.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

from causal_conv1d_mps.integrations import transformers as cc_hf
from conftest import skip_without_lfm3

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMES = ("causal_conv1d_fn", "causal_conv1d_update")


@pytest.fixture(autouse=True)
def _disabled_after():
    yield
    cc_hf.disable()


def _run_script(script: str, tmp_path: Path, extra_path: Path | None = None) -> str:
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + ([str(extra_path)] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    done = subprocess.run([sys.executable, "-c", TINY_LFM + textwrap.dedent(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"script failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


TINY_LFM = """
def tiny(config_class, width):
    return config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, conv_L_cache=width,
                        layer_types=["conv", "full_attention"], pad_token_id=0, eos_token_id=2)
"""


# --- without transformers: version gate, registry logic on synthetic modules --------------------------

@pytest.mark.parametrize("version", ["4.57.1", "5.14.0", "6.0.0"])
def test_unsupported_transformers_versions_are_refused(monkeypatch, version):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    with pytest.raises(RuntimeError, match=rf"expected transformers >=5.15,<6, got {version}"):
        cc_hf.enable()
    assert not cc_hf.is_enabled()


def test_missing_transformers_is_an_import_error(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ImportError, match="transformers is not installed"):
        cc_hf.enable()


def _synthetic_modeling_module(monkeypatch, family: str, source: str) -> ModuleType:
    module = ModuleType(f"transformers.models.{family}.modeling_{family}")
    exec(textwrap.dedent(source), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_registry_replaces_restores_and_keeps_what_it_must(monkeypatch):
    """Own functions are replaced and restored (the same objects); another signature and a function
    transformers took from another package (closure of its hub-kernel wrapper) are kept, the latter
    replaced with force=True."""
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.23.0")
    own = _synthetic_modeling_module(monkeypatch, "synthown", """
        def causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None): pass
        def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs): pass
    """)
    other = _synthetic_modeling_module(monkeypatch, "synthother", """
        def causal_conv1d_fn(x, w): pass
    """)
    foreign = _synthetic_modeling_module(monkeypatch, "synthforeign", """
        import functools
        def _decorate(torch_function, implementation):
            is_new_implementation = implementation is not torch_function
            @functools.wraps(torch_function)
            def wrapped(*args, **kwargs):
                return (implementation if is_new_implementation else torch_function)(*args, **kwargs)
            return wrapped
        def dao_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                   final_states_out=None, activation=None): pass
        dao_fn.__module__ = "causal_conv1d.causal_conv1d_interface"
        def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs): pass
        causal_conv1d_fn = _decorate(causal_conv1d_fn, dao_fn)
    """)
    originals = {(m.__name__, n): m.__dict__.get(n) for m in (own, other, foreign) for n in NAMES}
    cc_hf.enable()
    assert own.causal_conv1d_fn is cc_hf.causal_conv1d_fn and own.causal_conv1d_update is cc_hf.causal_conv1d_update
    assert other.causal_conv1d_fn is originals[(other.__name__, "causal_conv1d_fn")]
    assert foreign.causal_conv1d_fn is originals[(foreign.__name__, "causal_conv1d_fn")]
    report = cc_hf.status()
    assert report[own.__name__] == {n: "causal_conv1d_mps" for n in NAMES}
    assert "unexpected signature" in report[other.__name__]["causal_conv1d_fn"]
    assert report[foreign.__name__]["causal_conv1d_fn"].startswith("kept: causal_conv1d.causal_conv1d_interface")
    cc_hf.enable(force=True)
    assert foreign.causal_conv1d_fn is cc_hf.causal_conv1d_fn
    cc_hf.disable()
    assert cc_hf.status() == {}
    for (name, fn), original in originals.items():
        assert sys.modules[name].__dict__.get(fn) is original, f"{name}.{fn} not restored"


def test_enabled_context_restores_the_previous_state(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.23.0")
    own = _synthetic_modeling_module(monkeypatch, "synthctx", """
        def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs): pass
    """)
    original = own.causal_conv1d_fn
    with cc_hf.enabled():
        assert own.causal_conv1d_fn is cc_hf.causal_conv1d_fn
    assert own.causal_conv1d_fn is original and not cc_hf.is_enabled()
    cc_hf.enable()
    with cc_hf.enabled():
        pass
    assert cc_hf.is_enabled() and own.causal_conv1d_fn is cc_hf.causal_conv1d_fn


# --- through transformers ---------------------------------------------------------------------------

def _modeling_modules_defining_the_functions() -> list[str]:
    """Every `transformers.models.*.modeling_*` source of the installed version that defines one of them."""
    spec = importlib.util.find_spec("transformers")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    found = []
    for path in sorted(models.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8")
        if any(f"def {name}(" in text for name in NAMES):
            found.append(f"transformers.models.{path.parent.name}.{path.stem}")
    return found


def test_every_modeling_module_that_defines_them_is_replaced_and_restored():
    pytest.importorskip("transformers")
    import importlib

    names = _modeling_modules_defining_the_functions()
    assert len(names) >= 17, names  # 5.15 had 17 families, 5.23 has 23
    modules = [importlib.import_module(name) for name in names]
    before = {(m.__name__, n): m.__dict__[n] for m in modules for n in NAMES}
    cc_hf.enable()
    for m in modules:
        for n in NAMES:
            assert m.__dict__[n] is getattr(cc_hf, n), \
                f"{m.__name__}.{n} not replaced: {cc_hf.status().get(m.__name__)}"
    cc_hf.disable()
    for (name, n), original in before.items():
        assert sys.modules[name].__dict__[n] is original, f"{name}.{n} not restored"


def test_a_model_built_before_enable_follows_enable_and_disable(spy):
    transformers = pytest.importorskip("transformers")
    skip_without_lfm3()
    namespace: dict = {}
    exec(TINY_LFM, namespace)
    torch.manual_seed(0)
    model = transformers.Lfm3ForCausalLM(namespace["tiny"](transformers.Lfm3Config, 7)).eval()
    ids = torch.randint(3, 60, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
        assert spy["causal_conv1d_fn"] == 0
        cc_hf.enable()
        out = model(ids).logits
        assert spy["causal_conv1d_fn"] == 1
        cc_hf.disable()
        again = model(ids).logits
    assert spy["causal_conv1d_fn"] == 1
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6) and torch.equal(again, ref)


def test_enable_before_transformers_is_imported_and_modules_imported_while_enabled(tmp_path):
    """A fresh interpreter: enable() first, then transformers and its (lazily imported) modeling modules."""
    pytest.importorskip("transformers")
    out = _run_script("""
        import sys, torch
        from causal_conv1d_mps.integrations import transformers as cc_hf
        from causal_conv1d_mps import api
        cc_hf.enable()
        assert "transformers" not in sys.modules
        import transformers
        lfm2 = sys.modules[transformers.Lfm2ForCausalLM.__module__]   # imported lazily, after enable()
        assert lfm2.causal_conv1d_fn is cc_hf.causal_conv1d_fn, lfm2.causal_conv1d_fn
        assert lfm2.causal_conv1d_update is cc_hf.causal_conv1d_update
        assert lfm2.__loader__.__class__.__name__ != "_CallbackLoader"
        calls = []
        real_update = api.causal_conv1d_update
        api.causal_conv1d_update = lambda *a, **k: calls.append(1) or real_update(*a, **k)
        torch.manual_seed(0)
        model = transformers.Lfm2ForCausalLM(tiny(transformers.Lfm2Config, 3)).eval()
        tokens = model.generate(torch.randint(3, 60, (2, 6)), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert len(calls) == 3, calls  # one conv layer, three cached decode steps
        cc_hf.disable()
        assert cc_hf.__dict__["_registry"].hook not in sys.meta_path
        assert lfm2.causal_conv1d_fn is not cc_hf.causal_conv1d_fn
        assert lfm2.causal_conv1d_fn.__wrapped__.__module__ == lfm2.__name__  # transformers' wrapper again
        mamba = sys.modules[transformers.MambaForCausalLM.__module__]  # imported after disable(): untouched
        assert mamba.causal_conv1d_fn is not cc_hf.causal_conv1d_fn
        assert "causal_conv1d" not in sys.modules
        print("ok")
    """, tmp_path)
    assert out.strip().endswith("ok")


FAKE_DAO = '''
"""Stand-in for Dao-AILab's causal_conv1d: counts calls, computes with causal_conv1d_mps."""
import causal_conv1d_mps
CALLS = []
def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    CALLS.append("fn")
    return causal_conv1d_mps.causal_conv1d_fn(x, weight, bias, seq_idx, initial_states, return_final_states,
                                              final_states_out, activation)
def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    CALLS.append("update")
    return causal_conv1d_mps.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens,
                                                  conv_state_indices)
'''


def test_dao_causal_conv1d_is_kept_unless_forced(tmp_path):
    pytest.importorskip("transformers")
    skip_without_lfm3()
    package = tmp_path / "fake_site" / "causal_conv1d"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_DAO, encoding="utf-8")
    out = _run_script("""
        import sys, torch
        import causal_conv1d
        import transformers
        from transformers.models.lfm2 import modeling_lfm2
        from transformers.models.lfm3 import modeling_lfm3
        from causal_conv1d_mps.integrations import transformers as cc_hf
        wrapper, lfm3_before = modeling_lfm2.causal_conv1d_fn, modeling_lfm3.causal_conv1d_fn
        cc_hf.enable()
        assert sys.modules["causal_conv1d"] is causal_conv1d           # never shadowed
        assert modeling_lfm2.causal_conv1d_fn is wrapper                # Dao's, through transformers
        if hasattr(lfm3_before, "__wrapped__"):  # decorated since 5.24: Dao's too
            assert modeling_lfm3.causal_conv1d_fn is lfm3_before
        else:                                    # undecorated (5.23): never Dao's, so ours
            assert modeling_lfm3.causal_conv1d_fn is cc_hf.causal_conv1d_fn
        report = cc_hf.status()
        assert report[modeling_lfm2.__name__]["causal_conv1d_fn"].startswith("kept: causal_conv1d"), report
        torch.manual_seed(0)
        model = transformers.Lfm2ForCausalLM(tiny(transformers.Lfm2Config, 3)).eval()
        with torch.no_grad():
            model(torch.randint(3, 60, (1, 8)))
        assert causal_conv1d.CALLS == ["fn"], causal_conv1d.CALLS
        cc_hf.enable(force=True)
        assert modeling_lfm2.causal_conv1d_fn is cc_hf.causal_conv1d_fn
        with torch.no_grad():
            model(torch.randint(3, 60, (1, 8)))
        assert causal_conv1d.CALLS == ["fn"], causal_conv1d.CALLS
        cc_hf.disable()
        assert modeling_lfm2.causal_conv1d_fn is wrapper
        print("ok")
    """, tmp_path, extra_path=package.parent)
    assert out.strip().endswith("ok")

"""The short host path of small calls (docs/PERFORMANCE.md, P5): the Triton launch cache, the shortcuts the
argument checks take, and the eager autograd road. Each shortcut must decide exactly what the long way did.

No GPU needed: the launch cache is driven with stand-in kernels and tensors, and the transformers decode
loop runs on cpu through the Triton interpreter with its launches recorded.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import causal_conv1d_mps as ccmps
from causal_conv1d_mps import _validate as check
from causal_conv1d_mps import api
from causal_conv1d_mps.triton import _launch

# ------------------------------------------------------------------------------------ the launch cache


class FakeTensor:
    """What `_launch.launch` reads of a cuda tensor argument."""

    is_cuda = True

    def __init__(self, dtype=torch.float16, address=1 << 20, device=0):
        self.dtype, self.address, self.device_index = dtype, address, device

    def get_device(self):
        return self.device_index

    def data_ptr(self):
        return self.address


class FakeKernel:
    """`kernel[grid](*args, **constexprs, num_warps=...)` records the call and returns a compiled kernel
    whose launcher records its calls."""

    def __init__(self):
        self.jit_calls = []
        self.runs = []

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            kernel = self

            class Compiled:
                function = object()
                packed_metadata = ("metadata",)

                @staticmethod
                def run(*launch_args):
                    kernel.runs.append(launch_args)

            return Compiled

        return jit


@pytest.fixture
def fast_launch(monkeypatch):
    monkeypatch.setattr(_launch, "_enabled", True)
    monkeypatch.setattr(_launch, "_compiled", {})
    monkeypatch.setattr(_launch, "_by_class", {})
    monkeypatch.setattr(_launch, "_current_stream", lambda device: 1000 + device)


def test_a_repeated_launch_calls_the_cached_launcher(fast_launch):
    kernel = FakeKernel()
    x, out = FakeTensor(), FakeTensor(address=2 << 20)
    args, constexprs = (x, None, out, 128, 64, 1), dict(W=4, BT=8)
    misses = _launch.misses
    _launch.launch(kernel, (3, 2), args, constexprs, 4)
    assert len(kernel.jit_calls) == 1 and kernel.runs == []
    assert kernel.jit_calls[0] == ((3, 2), args, dict(W=4, BT=8, num_warps=4))
    for _ in range(3):
        _launch.launch(kernel, (3, 2), args, constexprs, 4)
    assert len(kernel.jit_calls) == 1, "a repeated launch went through Triton's own path"
    assert len(kernel.runs) == 3
    assert _launch.misses == misses + 1
    (entry,) = _launch._compiled.values()
    assert entry[3] is not None, "the cache must keep the compiled kernel alive (its deletion unloads the module)"
    grid_x, grid_y, grid_z, stream, _, metadata, hook_data, enter, leave, *rest = kernel.runs[0]
    assert (grid_x, grid_y, grid_z, stream, metadata) == (3, 2, 1, 1000, ("metadata",))
    assert (hook_data, enter, leave) == (None, None, None)
    assert tuple(rest) == (*args, 4, 8)


@pytest.mark.parametrize("change", ["int value", "dtype", "alignment", "device", "constexpr", "num_warps", "None"])
def test_anything_triton_specialises_on_misses_the_cache(fast_launch, change):
    kernel = FakeKernel()
    x = FakeTensor()
    base = dict(args=(x, 128, FakeTensor(address=3 << 20)), constexprs=dict(W=4), num_warps=4)
    changed = dict(base)
    if change == "int value":
        changed["args"] = (x, 129, base["args"][2])
    elif change == "dtype":
        changed["args"] = (x, 128, FakeTensor(dtype=torch.float32, address=3 << 20))
    elif change == "alignment":
        changed["args"] = (x, 128, FakeTensor(address=(3 << 20) + 8))
    elif change == "device":
        changed["args"] = (FakeTensor(device=1), 128, base["args"][2])
    elif change == "constexpr":
        changed["constexprs"] = dict(W=3)
    elif change == "num_warps":
        changed["num_warps"] = 2
    else:
        changed["args"] = (x, 128, None)
    for call in (base, changed, base, changed):
        _launch.launch(kernel, (1,), call["args"], call["constexprs"], call["num_warps"])
    assert len(kernel.jit_calls) == 2 and len(kernel.runs) == 2


@pytest.mark.parametrize("first, then, compiles", [
    (512, 1024, 1), (512, 528, 1), (100, 7, 1),  # same class: divisible by 16 or not, int32, not 1
    (512, 520, 2), (16, 1, 2), (1, 2, 2),  # divisibility by 16, the constant 1
    (5, 2**31 + 5, 2), (2**31 + 5, 2**32 + 5, 2), (-5, -2**40 - 5, 2),  # integer width
])
def test_new_integers_of_a_compiled_class_skip_triton(fast_launch, first, then, compiles):
    """A new sequence length (say) reuses the kernel compiled for another length of the same class; the
    launcher then gets the new value."""
    kernel = FakeKernel()
    x = FakeTensor()
    _launch.launch(kernel, (1,), (x, first, 64), dict(W=3), 4)
    _launch.launch(kernel, (1,), (x, then, 64), dict(W=3), 4)
    _launch.launch(kernel, (1,), (x, then, 64), dict(W=3), 4)
    assert len(kernel.jit_calls) == compiles
    assert kernel.runs[-1][9:12] == (x, then, 64)


@pytest.mark.triton
def test_kernels_reused_across_lengths_of_one_class_are_exact(device, monkeypatch):
    """On a GPU: lengths of one class (512, 528, 1024) launch the kernel compiled for the first through the
    class table, and every result matches float64 PyTorch; other classes compile their own."""
    if device.type != "cuda":
        pytest.skip("the launch cache serves cuda launches (run with --device cuda)")
    import torch.nn.functional as F

    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "triton")
    g = torch.Generator().manual_seed(5)
    D, W = 64, 4
    w, b = torch.randn(D, W, generator=g).to(device), torch.randn(D, generator=g).to(device)
    misses_after = {}
    for T in (512, 528, 1024, 520, 100, 37):
        x = torch.randn(2, D, T, generator=g).to(device)
        out = ccmps.causal_conv1d(x, w, b, "silu")
        ref = F.silu(F.conv1d(x.double(), w.double().unsqueeze(1), b.double(), padding=W - 1, groups=D)[..., :T])
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5, T
        torch.cuda.synchronize()
        misses_after[T] = _launch.misses
    if _launch._enabled:
        assert misses_after[528] == misses_after[512] and misses_after[1024] == misses_after[528]


def test_a_new_address_with_the_same_alignment_hits_the_cache(fast_launch):
    """Decode steps get a new `x` each step: its address must not be part of the key, only its alignment."""
    kernel = FakeKernel()
    for step in range(5):
        x = FakeTensor(address=(1 << 20) + 512 * step)
        _launch.launch(kernel, (1,), (x, 1, 64), dict(W=3), 4)
    assert len(kernel.jit_calls) == 1 and len(kernel.runs) == 4


def test_a_launcher_of_another_signature_turns_the_fast_path_off(fast_launch):
    kernel = FakeKernel()
    args = (FakeTensor(), 7)
    _launch.launch(kernel, (1,), args, {}, 4)
    key = next(iter(_launch._compiled))

    def other_signature(*launch_args):
        raise TypeError("takes 9 positional arguments")

    _launch._compiled[key] = (other_signature, None, None, None)
    _launch.launch(kernel, (1,), args, {}, 4)
    assert _launch._enabled is False
    assert len(kernel.jit_calls) == 2, "after a TypeError the launch must still happen, through Triton"
    misses = _launch.misses
    _launch.launch(kernel, (1,), args, {}, 4)
    assert len(kernel.jit_calls) == 3 and _launch.misses == misses + 1


def test_cache_key_is_the_per_argument_key():
    args = (FakeTensor(), None, 5, FakeTensor(dtype=torch.bfloat16, address=(1 << 20) + 4), 16)
    constexprs = dict(A=1, B=True)
    assert _launch.cache_key("k", 0, 4, constexprs, args) == (
        "k", 0, 4, *constexprs.values(), *map(_launch._arg_key, args))


# ------------------------------------------------------------------- transformers decode: one key per kernel


def _lfm2_launch_keys(monkeypatch, generate_calls: int):
    transformers = pytest.importorskip("transformers")
    from causal_conv1d_mps._backend import backend_unavailable_reason
    from causal_conv1d_mps.integrations import transformers as cc_hf
    from causal_conv1d_mps.triton import launch_conv, launch_update

    reason = backend_unavailable_reason("triton", torch.device("cpu"))
    if reason is not None:  # the model runs on cpu: the launches are the Triton interpreter's
        pytest.skip(f"backend triton on cpu: {reason}")

    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "triton")
    keys: dict[str, list] = {}
    real_conv, real_update = launch_conv.launch, launch_update.launch

    def recording(real):
        def launch(kernel, grid, args, constexprs, num_warps):
            keys.setdefault(kernel.__name__, []).append(
                _launch.cache_key(kernel, 0, num_warps, constexprs, args))
            return real(kernel, grid, args, constexprs, num_warps)
        return launch

    monkeypatch.setattr(launch_conv, "launch", recording(real_conv))
    monkeypatch.setattr(launch_update, "launch", recording(real_update))
    transformers.logging.set_verbosity_error()
    config = transformers.Lfm2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3, conv_bias=False,
        max_position_embeddings=64, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Lfm2ForCausalLM(config).eval()
    prompt = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    with cc_hf.enabled(), torch.no_grad():
        for _ in range(generate_calls):
            model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    return keys


def test_lfm2_decode_steps_reuse_one_launch_key_per_kernel(monkeypatch):
    """Every decode step of a transformers model (and every prefill of one prompt length) launches with the
    key of the step before, so on a GPU all but the first launch take the cached launcher. An argument that
    changed every call (a position, a pointer-derived value) would send each step through Triton's own
    launch path and grow the cache."""
    keys = _lfm2_launch_keys(monkeypatch, generate_calls=2)
    assert keys.get("short_conv_update_kernel"), "no decode step reached the Triton update kernel"
    assert any(name.startswith("conv_fwd") for name in keys), "no prefill reached the Triton forward kernel"
    for name, seen in keys.items():
        # 2 generate calls x 2 conv layers: 4 prefill launches; 2 x 4 decode steps x 2 layers: 16 updates
        assert len(seen) >= 4, (name, len(seen))
        assert len(set(seen)) == 1, f"{name}: {len(set(seen))} distinct launch keys over {len(seen)} launches"


# ------------------------------------------------------------------------- shortcuts of the argument checks


def _strided_views():
    """3-D views `[B, D, T]` of many layouts: contiguous, channel-last, size-1 dimensions with odd strides,
    slices, expanded and empty."""
    views = []
    for b, d, t in itertools.product((1, 2), (1, 3), (1, 4)):
        base = torch.zeros(b, d, t)
        views += [base, torch.zeros(b, t, d).transpose(1, 2), base.transpose(0, 2).contiguous().transpose(0, 2),
                  torch.zeros(b, d, 2 * t)[:, :, ::2], torch.zeros(b, 2 * t, d)[:, :t].transpose(1, 2),
                  torch.zeros(1, d, t).expand(b, d, t), torch.zeros(b, d, 1).expand(b, d, t),
                  torch.as_strided(torch.zeros(64), (b, d, t), (7, 1, 3))]
    views += [torch.zeros(2, 3, 0), torch.zeros(2, 0, 3).transpose(1, 2)]
    return views


def test_channel_last_test_agrees_with_transpose_is_contiguous():
    for x in _strided_views():
        expected = x.transpose(1, 2).is_contiguous()
        assert api._is_channel_last(x) == expected or x.numel() == 0, (tuple(x.shape), x.stride())
        layout = api._bdt_layout(x)
        if x.is_contiguous() or expected:
            assert layout is x
        else:
            assert layout.is_contiguous() and torch.equal(layout, x)


def _self_overlapping_the_long_way(x):
    extent = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz > 1):
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def test_self_overlap_verdict_is_the_same_every_time_and_names_the_argument():
    for x in _strided_views():
        for name in ("conv_state", "final_states_out", "conv_state"):  # the second visit is a cached verdict
            if x.numel() > 1 and _self_overlapping_the_long_way(x):
                with pytest.raises(ValueError, match=f"^{name}: expected a tensor whose elements do not share"):
                    check.not_self_overlapping(name, x)
            else:
                check.not_self_overlapping(name, x)


def _shares_bytes(a, b):
    """Whether two tensors' byte ranges overlap, from their storage offsets (the long way)."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        lo = t.data_ptr()
        return lo, lo + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()

    (lo, hi), (o_lo, o_hi) = span(a), span(b)
    return o_lo < hi and lo < o_hi


def test_memory_conflict_finds_exactly_the_overlapping_inputs():
    storage = torch.zeros(4, 6, 8)
    written = [storage[1:3], storage[:, 2:4], storage[0, :, :3], storage[2:, :, 4:].transpose(1, 2), storage[:0]]
    inputs = [storage[0], storage[3], storage[:, 5], storage[1, 0, :1], storage[3:], storage[:, :, 7],
              torch.zeros(5), storage[:0], storage.view(-1)[17:40]]
    for value in written:
        for other in inputs:
            expected = _shares_bytes(value, other)
            for call in (lambda: check.memory_conflict("conv_state", value, "bias", None, "x", other),
                         lambda: check.not_sharing_memory("conv_state", value, bias=None, x=other)):
                if expected:
                    with pytest.raises(ValueError, match="^x: shares memory with conv_state"):
                        call()
                else:
                    call()


def test_device_shortcut_agrees_with_the_named_check():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    assert check.on_one_device(cpu, None, cpu) and check.on_one_device(None, None)
    assert not check.on_one_device(cpu, None, meta)
    with pytest.raises(ValueError, match="x on cpu, weight on meta"):
        check.same_device(x=cpu, bias=None, weight=meta)


# --------------------------------------------------------------------------------- the eager autograd road


@pytest.mark.parametrize("op", ["causal_conv1d", "short_conv_fused"])
def test_eager_backward_with_create_graph_keeps_the_double_backward_guard(monkeypatch, op):
    """Without create_graph the backward skips once_differentiable's wrapper; with it the gradients are the
    same and differentiating them again still raises instead of returning wrong second derivatives."""
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6 if op == "short_conv_fused" else 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = (lambda: ccmps.short_conv_fused(x, w)) if op == "short_conv_fused" else (
        lambda: ccmps.causal_conv1d(x, w, activation="silu"))
    # a cotangent that requires grad is what once_differentiable guards (a grad-of-grad through it)
    dout = torch.randn(fn().shape, generator=g, dtype=torch.float64, requires_grad=True)
    plain = torch.autograd.grad(fn(), (x, w), dout)
    twice = torch.autograd.grad(fn(), (x, w), dout, create_graph=True)
    for a, b in zip(plain, twice):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert twice[0].requires_grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        twice[0].sum().backward()


@pytest.mark.parametrize("op", ["causal_conv1d", "short_conv_fused"])
def test_the_eager_autograd_road_wraps_final_states_only_when_asked(monkeypatch, op):
    """Without final states the eager Function has one output (`out`): autograd wraps nothing else, and the
    backward gets `dout` alone. With them, two; the gradients of `out` are the same either way."""
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6 if op == "short_conv_fused" else 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    call = (lambda **k: ccmps.short_conv_fused(x, w, **k)) if op == "short_conv_fused" else (
        lambda **k: ccmps.causal_conv1d(x, w, activation="silu", **k))
    out = call()
    if not hasattr(out.grad_fn, "_input_metadata"):
        pytest.skip("this PyTorch does not expose a node's outputs (Node._input_metadata)")
    assert type(out.grad_fn).__name__.endswith("EagerBackward")
    assert len(out.grad_fn._input_metadata) == 1
    with_final, final = call(return_final_states=True)
    assert with_final.grad_fn is final.grad_fn and len(with_final.grad_fn._input_metadata) == 2
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    alone = torch.autograd.grad(out, (x, w), dout)
    both = torch.autograd.grad(with_final, (x, w), dout)
    for a, b in zip(alone, both):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


_FORWARD_ONLY = {
    "causal_conv1d_fwd": lambda x, w: ccmps.causal_conv1d_fwd(x.transpose(1, 2), w, silu_activation=True),
    "short_conv_fused_fwd_only": lambda x, w: ccmps.short_conv_fused_fwd_only(x, w),
    "short_conv_update_fwd_only": lambda x, w: ccmps.short_conv_update_fwd_only(
        x[:, -1], torch.zeros(x.shape[0], x.shape[2], w.shape[1]), w),
}


@pytest.mark.parametrize("fn", list(_FORWARD_ONLY))
def test_forward_only_functions_restore_the_grad_mode_however_they_end(fn):
    """The forward-only functions set the grad-mode flag themselves (cheaper than `torch.no_grad()`): they
    record no graph, and leave the mode as they found it after a result and after an error."""
    call = _FORWARD_ONLY[fn]
    x, w = torch.randn(2, 6, 4), torch.randn(4, 3, requires_grad=True)
    for enabled in (True, False):
        with torch.set_grad_enabled(enabled):
            out = call(x, w)
            assert out.grad_fn is None and not out.requires_grad
            assert torch.is_grad_enabled() is enabled
            with pytest.raises(ValueError, match="^weight: expected shape"):
                call(x, torch.randn(5, 3, requires_grad=True))
            assert torch.is_grad_enabled() is enabled


# ------------------------------------------------------------------------ the example's in-model diagnosis


def test_example_diagnosis_times_every_call_of_generate(tmp_path, capsys):
    pytest.importorskip("transformers")
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "transformers_lfm2.py"
    spec = importlib.util.spec_from_file_location("transformers_lfm2_diagnose", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "lfm2.json"
    code = example.main(["--device", "cpu", "--hidden-size", "64", "--layers", "3", "--vocab", "128",
                         "--prompt-len", "10", "--new-tokens", "4", "--repeats", "1", "--warmup", "1",
                         "--diagnose", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "--diagnose: each call into causal_conv1d_mps inside generate" in printed
    diagnosis = json.loads(out.read_text())["diagnosis"]
    conv_layers = example.lfm2_layer_types(3).count("conv")
    assert diagnosis["causal_conv1d_fn"]["calls_in_generate"] == conv_layers  # one prefill
    assert diagnosis["causal_conv1d_update"]["calls_in_generate"] == conv_layers * 3  # new tokens - 1 steps
    for row in (diagnosis["causal_conv1d_fn"], diagnosis["causal_conv1d_update"]):
        assert row["host_us_in_model"] > 0 and row["host_us_alone"] > 0
    from causal_conv1d_mps import api

    assert api.causal_conv1d_update.__module__ == "causal_conv1d_mps.api", "the timing wrappers were left in place"


@pytest.mark.parametrize("op", ["causal_conv1d", "short_conv_fused"])
def test_a_dead_functorch_wrapper_takes_function_apply(monkeypatch, op):
    """A weight leaked from a finished `torch.func` transform is a dead wrapper, which only
    `Function.apply`'s Python wrapper unwraps: the eager road hands such calls to it, with the same gradients."""
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6 if op == "short_conv_fused" else 5, 3, generator=g, dtype=torch.float64)
    call = ccmps.short_conv_fused if op == "short_conv_fused" else (
        lambda x_, w_: ccmps.causal_conv1d(x_, w_, activation="silu"))
    xg = x.clone().requires_grad_()
    expected = torch.autograd.grad(call(xg, w).square().sum(), xg)[0]
    leaked = []
    torch.func.grad(lambda w_: leaked.append(w_) or w_.sum())(w)
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    applied = []
    real_apply = torch.autograd.Function.apply.__func__
    monkeypatch.setattr(torch.autograd.Function, "apply",
                        classmethod(lambda cls, *a, **k: applied.append(cls) or real_apply(cls, *a, **k)))
    call(xg, leaked[0]).square().sum().backward()
    assert applied, "a dead wrapper skipped Function.apply"
    torch.testing.assert_close(xg.grad, expected)


# ---------------------------------------------------------- decode steps: the checks' verdicts per signature

# B == D so that a bias `[D]` and a cache_seqlens `[B]` of one dtype read alike: only their slots tell them apart
VB, VD, VW, VS = 4, 4, 3, 4


@pytest.fixture
def fresh_verdicts():
    api._decode_verdicts.clear()
    yield api._decode_verdicts
    api._decode_verdicts.clear()


def _decode_args(**changes):
    """Valid arguments of a decode step (`x` `[B, D]`, a `[B, D, S]` state), with `changes` applied."""
    g = torch.Generator().manual_seed(8)
    args = dict(x=torch.randn(VB, VD, generator=g), state=torch.randn(VB, VD, VS, generator=g),
                weight=torch.randn(VD, VW, generator=g), bias=torch.randn(VD, generator=g),
                cache_seqlens=None, indices=None)
    args.update(changes)
    return args


_DECODE_CALLS = {
    "short_conv_update": lambda a: ccmps.short_conv_update(
        a["x"], a["state"], a["weight"], a["bias"], a["cache_seqlens"], conv_state_indices=a["indices"]),
    "causal_conv1d_update": lambda a: ccmps.causal_conv1d_update(
        a["x"], a["state"], a["weight"], a["bias"], "silu", a["cache_seqlens"], a["indices"]),
}


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


# name -> (the valid call's changes, the failing call's changes): each failing call differs from the valid one
# in one field of the signature (shape, strides, dtype, device, requires_grad, None or a tensor)
_ONE_FIELD = {
    "state rows (shape only)": ({}, dict(state=torch.zeros(VB + 1, VD, VS))),
    "state too short": ({}, dict(state=torch.zeros(VB, VD, VW - 2))),
    "state strides (expanded)": ({}, dict(state=torch.zeros(1, VD, VS).expand(VB, VD, VS))),
    "state dtype": ({}, dict(state=torch.zeros(VB, VD, VS, dtype=torch.float64))),
    "state device": ({}, dict(state=torch.zeros(VB, VD, VS, device="meta"))),
    "state requires grad": ({}, dict(state=torch.zeros(VB, VD, VS, requires_grad=True))),
    "x dtype": ({}, dict(x=torch.zeros(VB, VD, dtype=torch.float64))),
    "x integer": ({}, dict(x=torch.zeros(VB, VD, dtype=torch.int64))),
    "x channels": ({}, dict(x=torch.zeros(VB, VD - 1))),
    "x rank": ({}, dict(x=torch.zeros(VD))),
    "x device": ({}, dict(x=torch.zeros(VB, VD, device="meta"))),
    "weight width": ({}, dict(weight=torch.zeros(VD, VS + 2))),
    "weight integer": ({}, dict(weight=torch.zeros(VD, VW, dtype=torch.int32))),
    "weight device": ({}, dict(weight=torch.zeros(VD, VW, device="meta"))),
    "bias shape": ({}, dict(bias=torch.zeros(VD + 1))),
    "bias integer": ({}, dict(bias=torch.zeros(VD, dtype=torch.int64))),
    "bias device": ({}, dict(bias=torch.zeros(VD, device="meta"))),
    "bias not a tensor": ({}, dict(bias=[0.0] * VD)),
    "cache_seqlens float": (dict(cache_seqlens=_i32(0, 1, 2, 3)), dict(cache_seqlens=torch.zeros(VB))),
    "cache_seqlens shape": (dict(cache_seqlens=_i32(0, 1, 2, 3)), dict(cache_seqlens=_i32(0, 1, 2, 3, 4))),
    "indices float": (dict(indices=_i32(0, 1, 2, 3)), dict(indices=torch.zeros(VB))),
    "indices dropped": (dict(indices=_i32(0, 1, 2, 3), state=torch.zeros(VB + 2, VD, VS)),
                        dict(indices=None, state=torch.zeros(VB + 2, VD, VS))),
    "bias given as cache_seqlens": ({}, dict(bias=None, cache_seqlens=torch.zeros(VB))),
}


def _error_of(call, args):
    with pytest.raises((TypeError, ValueError)) as info:
        call(args)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("fn", list(_DECODE_CALLS))
@pytest.mark.parametrize("case", list(_ONE_FIELD))
def test_a_known_signature_never_lets_a_changed_field_through(fresh_verdicts, fn, case):
    """After a valid call's verdict is kept, a call that differs in one field of the signature raises
    exactly what it raises with no verdict kept, and changes no state."""
    call = _DECODE_CALLS[fn]
    valid, failing = (_decode_args(**changes) for changes in _ONE_FIELD[case])
    expected = _error_of(call, failing)
    assert not fresh_verdicts, "a failing call left a verdict"
    for _ in range(2):  # the second call takes the kept verdict
        call(valid)
    assert len(fresh_verdicts) == 1
    state = failing["state"]
    before = state.clone() if state.device.type != "meta" else None
    with torch.enable_grad():
        assert _error_of(call, failing) == expected
    if before is not None:
        assert torch.equal(state, before)


def test_a_known_signature_still_checks_memory_every_call(fresh_verdicts):
    """The pointers change from call to call: an input that shares memory with the state is found with the
    signature of a valid call (contiguous `[B, D]` x and `[D, W]` weight), and so is an x whose strides
    reach into the state from below its first byte."""
    buffer = torch.zeros(VB * VD * VS + 2 * VB * VD + VD * VW)
    state = buffer[:VB * VD * VS].view(VB, VD, VS)
    x_inside = buffer[VB * VD * VS - 2:VB * VD * VS - 2 + VB * VD].view(VB, VD)
    weight_inside = buffer[:VD * VW].view(VD, VW)
    for fn, call in _DECODE_CALLS.items():
        for name, changes in (("x", dict(x=x_inside)), ("weight", dict(weight=weight_inside))):
            fresh_verdicts.clear()
            call(_decode_args(state=state))
            call(_decode_args(state=state))
            assert len(fresh_verdicts) == 1
            with pytest.raises(ValueError, match=f"^{name}: shares memory with conv_state"):
                call(_decode_args(state=state, **changes))
    # x below the state, reaching into it through a large stride: its extent is not the valid x's
    below = torch.zeros(2 * VB * VD * VS)
    state = below[VB * VD * VS:].view(VB, VD, VS)
    x_strided = below.as_strided((VB, VD), (1, (VB * VD * VS) // (VD - 1)))
    assert x_strided.shape == (VB, VD) and check.byte_extent(x_strided) > VB * VD * VS * 4
    fresh_verdicts.clear()
    call = _DECODE_CALLS["short_conv_update"]
    call(_decode_args(state=state))
    call(_decode_args(state=state))
    with pytest.raises(ValueError, match="^x: shares memory with conv_state"):
        call(_decode_args(state=state, x=x_strided))


def test_a_known_signature_still_checks_index_values_every_call(fresh_verdicts):
    state = torch.zeros(VB + 2, VD, VS)
    call = _DECODE_CALLS["short_conv_update"]
    call(_decode_args(state=state, indices=_i32(0, 1, 2, 3)))
    call(_decode_args(state=state, indices=_i32(5, 4, -1, 0)))
    assert len(fresh_verdicts) == 1
    with pytest.raises(ValueError, match="^conv_state_indices: expected values < 6"):
        call(_decode_args(state=state, indices=_i32(0, 6, 2, 3)))
    with pytest.raises(ValueError, match="^conv_state_indices: expected distinct slots"):
        call(_decode_args(state=state, indices=_i32(0, 1, 1, 3)))


def test_a_leaf_state_requiring_grad_is_checked_against_the_grad_mode_every_call(fresh_verdicts):
    state = torch.zeros(VB, VD, VS, requires_grad=True)
    call = _DECODE_CALLS["causal_conv1d_update"]
    with torch.no_grad():
        call(_decode_args(state=state))
        call(_decode_args(state=state))
    with torch.enable_grad(), pytest.raises(ValueError, match="^conv_state: a leaf tensor that requires grad"):
        call(_decode_args(state=state))


def test_the_module_and_the_integration_share_the_verdicts_and_name_their_arguments(fresh_verdicts):
    module = ccmps.ShortConvolution(VD, VW)
    with torch.no_grad():
        module.step(torch.zeros(VB, VD), torch.zeros(VB, VD, VS))
        module.step(torch.zeros(VB, VD), torch.zeros(VB, VD, VS))
        assert len(fresh_verdicts) == 1
        with pytest.raises(ValueError, match="^cache: expected a tensor whose elements do not share memory"):
            module.step(torch.zeros(VB, VD), torch.zeros(1, VD, VS).expand(VB, VD, VS))
    pytest.importorskip("transformers")
    from causal_conv1d_mps.integrations import transformers as cc_hf

    args = _decode_args()
    for _ in range(2):
        cc_hf.causal_conv1d_update(args["x"].unsqueeze(-1), args["state"], args["weight"])
    with pytest.raises(ValueError, match="^conv_state: expected 4 rows"):
        cc_hf.causal_conv1d_update(args["x"].unsqueeze(-1), torch.zeros(VB + 1, VD, VS), args["weight"])


def test_the_verdicts_are_bounded(fresh_verdicts):
    call = _DECODE_CALLS["short_conv_update"]
    for s in range(VW - 1, VW - 1 + fresh_verdicts.limit + 10):
        call(_decode_args(state=torch.zeros(VB, VD, s)))
        assert 0 < len(fresh_verdicts) <= fresh_verdicts.limit


def test_decode_signature_is_none_where_the_full_checks_must_run():
    x, state, weight = torch.zeros(VB, VD), torch.zeros(VB, VD, VS), torch.zeros(VD, VW)
    assert check.decode_signature(0, x, state, weight, None, None, None) is not None
    assert check.decode_signature(0, x, state.requires_grad_(), weight, None, None, None) is None
    state = torch.zeros(VB, VD, VS)
    assert check.decode_signature(0, [0.0], state, weight, None, None, None) is None
    assert check.decode_signature(0, x, state, weight, None, None, "indices") is None

    class Sub(torch.Tensor):
        pass

    assert check.decode_signature(0, x.as_subclass(Sub), state, weight, None, None, None) is None
    # the two public functions read x in different layouts: never one signature
    assert check.decode_signature(0, x, state, weight, None, None, None) != check.decode_signature(
        1, x, state, weight, None, None, None)


def test_the_kept_launch_plan_of_a_decode_step_follows_every_flag_and_a_config_override(monkeypatch):
    """The decode launcher keeps its kernel, tiles and constexprs per (device, D, S, W, activation, flags):
    each of those changing gives the constexprs that choosing afresh gives, and a tile override is honoured."""
    from causal_conv1d_mps.triton import _config, launch_update

    launched = []
    monkeypatch.setattr(launch_update, "launch", lambda kernel, grid, args, constexprs, nw: launched.append(
        (grid, dict(constexprs), nw)))
    monkeypatch.setattr(launch_update, "_plans", {})
    g = torch.Generator().manual_seed(9)
    x, state = torch.randn(2, 1, 40, generator=g), torch.randn(2, 40, 5, generator=g)
    weight, bias, seqlens = torch.randn(40, 4, generator=g), torch.randn(40, generator=g), _i32(0, 3)

    def constexprs(**changes):
        a = dict(x=x, conv_state=state, weight=weight, bias=bias, cache_seqlens=None, conv_state_indices=None,
                 activation=1, residual=False)
        a.update(changes)
        launch_update.launch_update(**a)
        return launched[-1]

    first = constexprs()
    assert first == constexprs() and len(launch_update._plans) == 1
    for changes, field, value in (
            (dict(bias=None), "HAS_BIAS", False), (dict(activation=0), "ACTIVATION", 0),
            (dict(residual=True), "HAS_RESIDUAL", True), (dict(cache_seqlens=seqlens), "IS_CIRCULAR", True),
            (dict(conv_state_indices=_i32(1, 0)), "HAS_STATE_INDICES", True),
            (dict(weight=torch.randn(40, 3, generator=g)), "W", 3)):
        assert constexprs(**changes)[1][field] == value, field
        assert constexprs()[1] == first[1]
    wide = constexprs(x=torch.randn(2, 1, 200, generator=g), conv_state=torch.randn(2, 200, 5, generator=g),
                      weight=torch.randn(200, 4, generator=g), bias=None)
    assert wide[1]["BD"] != first[1]["BD"] and wide[0][0] == -(-200 // wide[1]["BD"])
    monkeypatch.setitem(_config.OVERRIDES, "update", dict(BD=16, num_warps=2))
    _config.clear()
    overridden = constexprs()
    assert overridden[1]["BD"] == 16 and overridden[2] == 2 and overridden[0] == (-(-40 // 16), 2)
    monkeypatch.delitem(_config.OVERRIDES, "update")
    _config.clear()
    assert constexprs() == first


# ------------------------------------------------- causal_conv1d and short_conv_fused: verdicts per signature

CB, CD, CT, CW = 2, 4, 6, 3


@pytest.fixture
def fresh_conv_verdicts():
    api._conv_verdicts.clear()
    yield api._conv_verdicts
    api._conv_verdicts.clear()


def _conv_args(**changes):
    g = torch.Generator().manual_seed(10)
    args = dict(x=torch.randn(CB, CD, CT, generator=g), weight=torch.randn(CD, CW, generator=g),
                bias=torch.randn(CD, generator=g), seq_idx=None, initial_states=None, final_states_out=None)
    args.update(changes)
    return args


def _conv_call(a):
    return ccmps.causal_conv1d(a["x"], a["weight"], a["bias"], "silu", seq_idx=a["seq_idx"],
                               initial_states=a["initial_states"], final_states_out=a["final_states_out"])


def _fused_args(**changes):
    g = torch.Generator().manual_seed(11)
    args = dict(x=torch.randn(CB, CT, CD, generator=g), weight=torch.randn(CD, CW, generator=g), bias=None,
                attention_mask=None, initial_states=None, cu_seqlens=None)
    args.update(changes)
    return args


def _fused_call(a):
    return ccmps.short_conv_fused(a["x"], a["weight"], a["bias"], a["attention_mask"],
                                  initial_states=a["initial_states"], cu_seqlens=a["cu_seqlens"])


_SEQ = torch.zeros(CB, CT, dtype=torch.int32)
_PACKED = dict(x=torch.randn(1, 9, CD), cu_seqlens=_i32(0, 4, 9))
_CONV_ONE_FIELD = {
    "x rank": (_conv_call, {}, dict(x=torch.zeros(CD, CT))),
    "x integer": (_conv_call, {}, dict(x=torch.zeros(CB, CD, CT, dtype=torch.int64))),
    "x device": (_conv_call, {}, dict(x=torch.zeros(CB, CD, CT, device="meta"))),
    "weight channels": (_conv_call, {}, dict(weight=torch.zeros(CD + 1, CW))),
    "weight integer": (_conv_call, {}, dict(weight=torch.zeros(CD, CW, dtype=torch.int32))),
    "weight device": (_conv_call, {}, dict(weight=torch.zeros(CD, CW, device="meta"))),
    "bias shape": (_conv_call, {}, dict(bias=torch.zeros(CD + 1))),
    "bias integer": (_conv_call, {}, dict(bias=torch.zeros(CD, dtype=torch.int64))),
    "bias given as seq_idx": (_conv_call, {}, dict(bias=None, seq_idx=torch.zeros(CD))),
    "bias given as initial_states": (_conv_call, {}, dict(bias=None, initial_states=torch.zeros(CD))),
    "no bias, then seq_idx float": (_conv_call, dict(bias=None), dict(bias=None, seq_idx=_SEQ.float())),
    "bias device": (_conv_call, {}, dict(bias=torch.zeros(CD, device="meta"))),
    "seq_idx float": (_conv_call, dict(seq_idx=_SEQ), dict(seq_idx=_SEQ.float())),
    "seq_idx shape": (_conv_call, dict(seq_idx=_SEQ), dict(seq_idx=_SEQ[:, 1:])),
    "initial_states width": (_conv_call, dict(initial_states=torch.zeros(CB, CD, CW - 1)),
                             dict(initial_states=torch.zeros(CB, CD, CW))),
    "initial_states device": (_conv_call, dict(initial_states=torch.zeros(CB, CD, CW - 1)),
                              dict(initial_states=torch.zeros(CB, CD, CW - 1, device="meta"))),
    "final_states_out strides (expanded)": (_conv_call, dict(final_states_out=torch.zeros(CB, CD, CW - 1)),
                                            dict(final_states_out=torch.zeros(1, CD, CW - 1).expand(CB, CD, CW - 1))),
    "final_states_out dtype": (_conv_call, dict(final_states_out=torch.zeros(CB, CD, CW - 1)),
                               dict(final_states_out=torch.zeros(CB, CD, CW - 1, dtype=torch.int32))),
    "fused x rank": (_fused_call, {}, dict(x=torch.zeros(CT, CD))),
    "fused weight channels": (_fused_call, {}, dict(weight=torch.zeros(CD - 1, CW))),
    "fused mask shape": (_fused_call, dict(attention_mask=torch.ones(CB, CT)),
                         dict(attention_mask=torch.ones(CB + 1, CT))),
    "fused mask complex": (_fused_call, dict(attention_mask=torch.ones(CB, CT)),
                           dict(attention_mask=torch.ones(CB, CT, dtype=torch.complex64))),
    "fused mask device": (_fused_call, dict(attention_mask=torch.ones(CB, CT)),
                          dict(attention_mask=torch.ones(CB, CT, device="meta"))),
    "fused initial_states rows": (_fused_call, dict(initial_states=torch.zeros(CB, CD, CW - 1)),
                                  dict(initial_states=torch.zeros(CB + 1, CD, CW - 1))),
    "fused cu_seqlens batch": (_fused_call, dict(x=torch.zeros(1, CT, CD), cu_seqlens=_i32(0, CT)),
                               dict(x=torch.zeros(CB, CT, CD), cu_seqlens=_i32(0, CT))),
    "fused cu_seqlens float": (_fused_call, _PACKED, dict(_PACKED, cu_seqlens=torch.tensor([0.0, 4.0, 9.0]))),
    "fused cu_seqlens values": (_fused_call, _PACKED, dict(_PACKED, cu_seqlens=_i32(0, 5, 3))),
    "fused cu_seqlens end": (_fused_call, _PACKED, dict(_PACKED, cu_seqlens=_i32(0, 4, 8))),
}


@pytest.mark.parametrize("case", list(_CONV_ONE_FIELD))
def test_a_known_convolution_signature_never_lets_a_changed_field_through(fresh_conv_verdicts, case):
    """As for the decode step: after a valid call's verdict is kept, a call differing in one field raises
    what it raises with none kept; the values of cu_seqlens are checked every call."""
    call, valid_changes, failing_changes = _CONV_ONE_FIELD[case]
    make = _conv_args if call is _conv_call else _fused_args
    valid, failing = make(**valid_changes), make(**failing_changes)
    expected = _error_of(call, failing)
    assert not fresh_conv_verdicts, "a failing call left a verdict"
    for _ in range(2):
        call(valid)
    assert len(fresh_conv_verdicts) == 1
    assert _error_of(call, failing) == expected


def test_a_known_convolution_signature_still_checks_memory_every_call(fresh_conv_verdicts):
    args = _conv_args()
    buffer = torch.zeros(2 * CB * CD * CT)
    inside = buffer[CB * CD * CT - 2:CB * CD * CT - 2 + CB * CD * (CW - 1)].view(CB, CD, CW - 1)
    x = buffer[:CB * CD * CT].view(CB, CD, CT)
    for _ in range(2):
        _conv_call(dict(args, x=x, final_states_out=torch.zeros(CB, CD, CW - 1)))
    assert len(fresh_conv_verdicts) == 1
    with pytest.raises(ValueError, match="^x: shares memory with final_states_out"):
        _conv_call(dict(args, x=x, final_states_out=inside))


def test_compiled_calls_neither_read_nor_fill_the_verdicts(fresh_verdicts, fresh_conv_verdicts):
    """Under torch.compile every check runs (symbolic sizes) and the tables are left alone: a guard on
    their contents would recompile the model whenever an eager call adds a verdict."""
    from torch._dynamo.utils import counters

    def step(x, state, weight):
        window = ccmps.causal_conv1d(state, weight)[..., -1]
        return ccmps.short_conv_update(x, state, weight) + window

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    x, state, weight = torch.randn(VB, VD), torch.zeros(VB, VD, VS), torch.randn(VD, VW)
    with torch.no_grad():
        compiled(x, state, weight)
        assert not fresh_verdicts and not fresh_conv_verdicts
        for rows in range(1, 4):  # eager calls of new signatures
            step(torch.randn(rows, VD), torch.zeros(rows, VD, VS), weight)
        assert fresh_verdicts and fresh_conv_verdicts
        compiled(x, state, weight)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# ------------------------------------------- the backend module kept with a signature's verdict (`_backend.Choice`)


@pytest.fixture
def counted_select(monkeypatch):
    """`_backend.select`, counting its calls (the reference backend forced)."""
    from causal_conv1d_mps import _backend

    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    calls = []
    real = _backend.select

    def select(device, dtype):
        calls.append((device, dtype))
        return real(device, dtype)

    monkeypatch.setattr(_backend, "select", select)
    return calls


_ENTRY_CALLS = {"causal_conv1d": (_conv_call, _conv_args), "short_conv_fused": (_fused_call, _fused_args)}


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "forward + backward"])
@pytest.mark.parametrize("entry", list(_ENTRY_CALLS))
def test_a_known_signature_skips_backend_selection(fresh_conv_verdicts, counted_select, entry, grad):
    """A repeated call hands the module chosen with its verdict to `ops`; its backward runs that module's."""
    call, make = _ENTRY_CALLS[entry]
    args = make()
    if grad:
        args = dict(args, x=args["x"].requires_grad_(), weight=args["weight"].requires_grad_())
    call(args)
    counted_select.clear()
    out = call(args)
    if grad:
        out.sum().backward()
        assert args["x"].grad is not None and args["weight"].grad is not None
    assert counted_select == [], f"select was called {len(counted_select)} times for a known signature"


@pytest.mark.parametrize("entry", list(_ENTRY_CALLS))
def test_a_known_signature_still_reads_the_backend_variable_every_call(fresh_conv_verdicts, monkeypatch, entry):
    """CAUSAL_CONV1D_BACKEND is read at call time: a changed value, valid or not, takes effect on the next
    call of a known signature."""
    from causal_conv1d_mps import reference

    call, make = _ENTRY_CALLS[entry]
    args = make()
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    call(args)
    call(args)
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="^CAUSAL_CONV1D_BACKEND: expected one of"):
        call(args)
    ran = []
    name = "causal_conv1d_fwd" if entry == "causal_conv1d" else "short_conv_fused_fwd"
    real = getattr(reference, name)
    monkeypatch.setattr(reference, name, lambda *a: ran.append(name) or real(*a))
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    call(args)
    assert ran == [name]


def test_clearing_the_backend_cache_forgets_the_modules_kept_with_verdicts(fresh_conv_verdicts, counted_select):
    from causal_conv1d_mps import _backend

    for _ in range(2):
        _conv_call(_conv_args())
    assert len(fresh_conv_verdicts) == 1
    _backend.clear_cache()
    assert not fresh_conv_verdicts
    _conv_call(_conv_args())  # checked again, and its module chosen anew
    assert len(fresh_conv_verdicts) == 1

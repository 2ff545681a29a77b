"""The Canon-layer language model of examples/canon_lm.py: the library's ShortConvolution inside a real
model gives the same numbers as nn.Conv1d (through every backend), cached decoding equals recomputation,
training learns, torch.compile traces the whole model without a graph break, and training with context
parallelism 2 under torchrun gives the loss curve of one process.

Runs on the suite's `--device` (default cpu), in float32 (tight tolerance) unless a test says otherwise.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import uses_small_shapes

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "canon_lm.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("canon_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


canon_lm = _load_example()
TASK = canon_lm.RecallTask(num_keys=8, num_values=8, num_pairs=4, num_queries=2)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32, the same arithmetic up to summation order


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    # cuDNN would run the nn.Conv1d twin in TF32 on NVIDIA GPUs
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # The model is tiny: on a shared runner every multi-threaded op waits for a busy sibling core
    # (measured: the training test took 54 s with 2 threads, 1.5 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(conv: str, device: torch.device, seed: int = 0, n_layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = canon_lm.CanonLMConfig(TASK.vocab_size, d_model=32, n_layers=n_layers, n_heads=2, ffn_hidden=48,
                                    conv=conv)
    return canon_lm.CanonLM(config).to(device).eval()


def twin_models(device: torch.device, seed: int = 0, n_layers: int = 2):
    """The model on the library and the same weights on nn.Conv1d."""
    library = tiny_model("library", device, seed, n_layers)
    plain = tiny_model("torch", device, seed + 1, n_layers)
    canon_lm.copy_weights(library, plain)
    return library, plain


def tokens(device: torch.device, batch: int = 3, seed: int = 0) -> torch.Tensor:
    return TASK.sample(batch, torch.Generator().manual_seed(seed))[0].to(device)


def layers_for(backend: str, device: torch.device) -> int:
    """One block where the kernels run in the Triton interpreter or the Metal harness (seconds per call)."""
    return 1 if uses_small_shapes(backend, device) else 2


def test_weights_copy_between_library_and_torch_conv(device):
    library, plain = twin_models(device)
    assert all(conv.weight.abs().min() > 0 for block in library.blocks for conv in block.canon.values())
    for (name, a), (_, b) in zip(library.named_parameters(), plain.named_parameters()):
        assert torch.equal(a.reshape(b.shape), b), name


@torch.no_grad()
def test_training_forward_matches_torch_conv(backend, device):
    library, plain = twin_models(device, n_layers=layers_for(backend, device))
    x = tokens(device)
    torch.testing.assert_close(library(x), plain(x), **TOL)


def test_gradients_match_torch_conv(device):
    """Through the device's own backend (the op tests cover each backend's backward on CPU; the Triton
    interpreter takes seconds per backward call)."""
    library, plain = twin_models(device)
    x = tokens(device)
    out_lib, out_plain = library(x), plain(x)
    grad_out = torch.randn_like(out_lib)
    out_lib.backward(grad_out)
    out_plain.backward(grad_out)
    for (name, a), (_, b) in zip(library.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad.reshape(b.shape), b.grad, **TOL, msg=lambda m: f"{name}: {m}")


@torch.no_grad()
def test_prefill_and_decode_match_torch_conv(backend, device):
    library, plain = twin_models(device, n_layers=layers_for(backend, device))
    x = tokens(device)
    split = 5
    cache_lib, cache_plain = library.new_cache(), plain.new_cache()
    torch.testing.assert_close(library(x[:, :split], cache_lib), plain(x[:, :split], cache_plain), **TOL)
    for t in range(split, x.shape[1]):
        step = x[:, t : t + 1]
        torch.testing.assert_close(library(step, cache_lib), plain(step, cache_plain), **TOL,
                                   msg=lambda m: f"decode position {t}: {m}")
    for layer_lib, layer_plain in zip(cache_lib, cache_plain):
        assert layer_lib.conv.keys() == set("ABCD")
        for place, state in layer_lib.conv.items():
            # states are copies of inputs: equal up to the inputs' own rounding
            torch.testing.assert_close(state, layer_plain.conv[place], **TOL, msg=lambda m: f"Canon-{place}: {m}")


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_mixes_low_precision_activations_with_float32_weights(amp_dtype, device):
    """As the example trains on GPUs: Canon B and D see low-precision activations (A and C see RMSNorm's
    output), all with float32 weights; results stay within low-precision error of float32."""
    model = tiny_model("library", device)
    x = tokens(device)
    reference = model(x).detach()
    with canon_lm.autocast(device, amp_dtype):
        logits = model(x)
    error = ((logits.float() - reference).norm() / reference.norm()).item()
    assert error < 2e-2, f"relative error {error:.2e} of {amp_dtype} autocast against float32"
    logits.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters())

    cache = model.new_cache()
    with torch.no_grad(), canon_lm.autocast(device, amp_dtype):
        model(x[:, :5], cache)
        model(x[:, 5:6], cache)
    states = {place: state.dtype for place, state in cache[0].conv.items()}
    # a state keeps its input's dtype: the projections' outputs (B, D) are in amp_dtype
    assert states["B"] == states["D"] == amp_dtype, states


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_decoding_equals_full_recompute(chunk, device):
    """Prefill, then the rest `chunk` tokens per call (step with L > 1 and a masked attention
    over the cache when chunk > 1): every logit equals the full-sequence forward's."""
    model = tiny_model("library", device)
    x = tokens(device)
    full = model(x)
    cache = model.new_cache()
    split = 4
    pieces = [model(x[:, :split], cache)]
    for start in range(split, x.shape[1], chunk):
        pieces.append(model(x[:, start : start + chunk], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
    assert cache[0].keys.shape[2] == x.shape[1]


@torch.no_grad()
def test_generation_with_cache_equals_rerunning_the_sequence(device):
    model = tiny_model("library", device, seed=3)
    prompt = tokens(device, batch=2, seed=1)[:, : TASK.prompt_len]
    generated = canon_lm.generate(model, prompt, max_new_tokens=6)

    sequence = prompt
    for _ in range(6):
        next_token = model(sequence)[:, -1].argmax(-1)
        sequence = torch.cat([sequence, next_token[:, None]], dim=1)
    expected = sequence[:, prompt.shape[1] :]
    assert torch.equal(generated, expected), f"cached {generated.tolist()}, recomputed {expected.tolist()}"


def test_short_training_run_lowers_the_loss(device):
    model = tiny_model("library", device).train()
    losses = canon_lm.train(model, TASK, steps=40, batch_size=32, lr=1e-2, progress=False)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}"


def test_torch_compile_fullgraph_forward_and_backward(device):
    model = tiny_model("library", device).train()
    x = tokens(device)
    # aot_eager: the same tracing as inductor (fake kernels, autograd, no graph break) without a C++ build
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    eager_out = model(x)
    eager_out.square().mean().backward()
    torch.testing.assert_close(out, eager_out, **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_context_parallel_training_under_torchrun_matches_one_process(device, tmp_path):
    """`torchrun --nproc-per-node 2 examples/canon_lm.py --context-parallel` (gloo on CPU, NCCL on 2 GPUs):
    every step's loss equals the single-process run's on the same data (float32; only the order of the
    sums over ranks differs)."""
    if device.type == "mps" or (device.type == "cuda" and torch.cuda.device_count() < 2):
        pytest.skip(f"context parallelism 2 needs 2 processes with a device each; {device} has not")
    args = ["--device", device.type, "--precision", "float32", "--steps", "12", "--batch-size", "8",
            "--d-model", "32", "--layers", "1", "--eval-batch", "8"]
    env = dict(os.environ, PYTHONPATH=str(EXAMPLE.parents[1]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(EXAMPLE), "--context-parallel", "--loss-log", str(tmp_path / "cp.json"), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    canon_lm.main([*args, "--loss-log", str(tmp_path / "one.json")])
    split = json.loads((tmp_path / "cp.json").read_text())
    whole = json.loads((tmp_path / "one.json").read_text())
    assert len(split) == len(whole) == 12
    torch.testing.assert_close(torch.tensor(split), torch.tensor(whole), rtol=1e-4, atol=0)

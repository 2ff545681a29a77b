"""Every hybrid family of transformers, through its own modeling code, with and without this package.

For each family whose modeling file defines `causal_conv1d_fn` / `causal_conv1d_update`, a tiny randomly
initialised model (no downloads) runs with transformers' own PyTorch functions and then with
`integrations.transformers.enable()`: forward logits within the float32 tolerance, greedy `generate`
token-identical, a training step's gradients close, and (where the modeling code keeps packed sequences
apart outside the convolution) a packed forward equal to the sequences run one by one. A call counter
proves that this package's functions ran. A small subset runs the Triton kernels under the interpreter.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from causal_conv1d_mps.integrations import transformers as cc_hf  # noqa: E402
from conftest import rel_error  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 64
TOKENS = (3, 56)  # leaves out the special and image-token ids of the tiny configs
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
GDN = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
           linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])
MOE = dict(moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts_per_tok=2, num_experts=4)
MLA = dict(num_key_value_heads=4, kv_lora_rank=8, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8,
           linear_head_dim=8, linear_num_heads=4, linear_conv_kernel_dim=4, mlp_layer_types=["dense", "sparse"],
           layer_types=["linear_attention", "full_attention"])
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8)
INKLING = dict(head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=8,
               layer_types=["hybrid_sliding", "hybrid"], moe_intermediate_size=16, n_routed_experts=4,
               num_experts_per_tok=2)

# family -> (config class, its arguments beyond COMMON). One short-conv / SSM / linear-attention layer and
# one attention layer where the family has both.
CONFIGS = {
    "lfm2": ("Lfm2Config", dict(intermediate_size=64, layer_types=["conv", "full_attention"], conv_L_cache=3,
                                conv_bias=True, block_auto_adjust_ff_dim=False)),
    "lfm2_moe": ("Lfm2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                       num_experts_per_tok=2, num_dense_layers=1, conv_L_cache=3,
                                       layer_types=["conv", "full_attention"])),
    "lfm3": ("Lfm3Config", dict(intermediate_size=64, layer_types=["conv", "full_attention"], head_dim=8,
                                conv_L_cache=7)),
    "mamba": ("MambaConfig", dict(state_size=8, intermediate_size=64, time_step_rank=4, conv_kernel=4)),
    "falcon_mamba": ("FalconMambaConfig", dict(state_size=8, intermediate_size=64, time_step_rank=4, conv_kernel=4)),
    "mamba2": ("Mamba2Config", dict(num_heads=8, head_dim=8, state_size=8, n_groups=2, conv_kernel=4,
                                    time_step_rank=4, chunk_size=8, expand=2)),
    "bamba": ("BambaConfig", dict(intermediate_size=64, attn_layer_indices=[1], **MAMBA2)),
    "falcon_h1": ("FalconH1Config", dict(intermediate_size=64, mamba_d_ssm=64, head_dim=8, **MAMBA2)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(intermediate_size=64, num_local_experts=4,
                                                        num_experts_per_tok=2, shared_intermediate_size=32,
                                                        layer_types=["linear_attention", "full_attention"],
                                                        **MAMBA2)),
    "nemotron_h": ("NemotronHConfig", dict(layers_block_type=["linear_attention", "full_attention"], head_dim=8,
                                           intermediate_size=64, ssm_state_size=8, mamba_num_heads=8,
                                           mamba_head_dim=8, n_groups=2, conv_kernel=4, chunk_size=8)),
    "zamba2": ("Zamba2Config", dict(layers_block_type=["linear_attention", "hybrid"], hybrid_layer_ids=[1],
                                    mamba_d_state=8, mamba_d_conv=4, mamba_ngroups=1, n_mamba_heads=2,
                                    mamba_headdim=32, chunk_size=8, intermediate_size=64, adapter_rank=4,
                                    attention_hidden_size=64, attention_head_dim=16, kv_channels=8,
                                    num_query_groups=4)),
    "jamba": ("JambaConfig", dict(intermediate_size=64, num_experts=2, num_experts_per_tok=1, expert_layer_period=2,
                                  expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
                                  mamba_d_conv=4, mamba_dt_rank=4)),
    "zamba": ("ZambaConfig", dict(layers_block_type=["linear_attention", "hybrid"], attention_hidden_size=64,
                                  attention_head_dim=16, intermediate_size=64, n_mamba_heads=2, attn_layer_period=2,
                                  attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_dt_rank=4)),
    "qwen3_next": ("Qwen3NextConfig", dict(intermediate_size=64, head_dim=8, **GDN, **MOE)),
    "qwen3_5": ("Qwen3_5TextConfig", dict(intermediate_size=64, head_dim=8, **GDN)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(head_dim=8, **GDN, **MOE)),
    "qwen4_exp": ("Qwen4ExpTextConfig", dict(head_dim=8, hc_lowrank=8, ple_embed_dim=32, indexer_n_heads=2,
                                             indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                                             indexer_compress_ratio=4, **GDN, **MOE)),
    "olmo_hybrid": ("OlmoHybridConfig", dict(intermediate_size=64, layer_types=["linear_attention", "full_attention"],
                                             linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                                             linear_value_head_dim=16, linear_conv_kernel_dim=4)),
    "kimi_linear": ("KimiLinearConfig", dict(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                             num_experts_per_token=2, head_dim=4, **MLA)),
    "bailing_hybrid": ("BailingHybridConfig", dict(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                                   num_experts_per_token=2, num_expert_group=1, topk_group=1,
                                                   head_dim=4, layer_group_size=2, num_nextn_predict_layers=0, **MLA)),
    "glm5_next": ("Glm5NextTextConfig", dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                                             num_experts_per_tok=2, q_lora_rank=16, index_head_dim=8,
                                             index_n_heads=2, **{k: v for k, v in MLA.items()
                                                                 if k != "qk_rope_head_dim"})),
    "inkling": ("InklingTextConfig", dict(mlp_layer_types=["dense", "sparse"], intermediate_size=64,
                                          n_shared_experts=1, **INKLING)),
    "inkling2": ("Inkling2TextConfig", dict(n_layers_per_attn_res_block=1, unpadded_vocab_size=VOCAB, **INKLING)),
    # Since transformers 5.24:
    "lara_mini": ("LaraMiniConfig", dict(head_dim=8, sliding_window=8, **{**GDN, **MOE,
                                         "layer_types": ["linear_attention", "sliding_attention"]})),
    "inkling2_loop": ("Inkling2LoopTextConfig", dict(n_layers_per_attn_res_block=1, unpadded_vocab_size=VOCAB,
                                                     loop_layer_index_start=1, loop_layer_index_end=2,
                                                     loop_num_passes=2, loop_gate_rank=4, **{
                                                         **INKLING, "num_hidden_layers": 3,
                                                         "layer_types": ["hybrid_sliding", "hybrid", "hybrid"]})),
}

# Families whose modeling code keeps packed sequences apart once the convolution does (measured with
# transformers 5.23; the others are listed in docs/TRANSFORMERS.md with the reason).
PACKED = ("lfm2", "lfm2_moe", "lfm3", "zamba")
TRITON_SUBSET = ("lfm2", "mamba2", "qwen3_5")


def build(family: str, device, dtype=torch.float32):
    class_name, arguments = CONFIGS[family]
    if not hasattr(transformers, class_name):
        pytest.skip(f"{family}: not in transformers {transformers.__version__}")
    config = getattr(transformers, class_name)(**{**COMMON, **arguments})
    torch.manual_seed(0)
    if family == "glm5_next":  # a vision-language model only: tiny vision tower, text-only inputs
        vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32,
                      projection_intermediate_size=32, patch_size=2, image_size=8)
        config = transformers.Glm5NextConfig(text_config=config.to_dict(), vision_config=vision,
                                             image_token_id=60, video_token_id=61, image_start_token_id=62,
                                             image_end_token_id=63, video_start_token_id=58, video_end_token_id=59,
                                             tie_word_embeddings=False)
        model = transformers.AutoModelForImageTextToText.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype).eval()


def tokens(*shape, seed=1, device="cpu") -> torch.Tensor:
    return torch.randint(*TOKENS, shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.fixture(scope="module", params=list(CONFIGS))
def family_model(request, device):
    return request.param, build(request.param, device)


@pytest.fixture(autouse=True)
def _disabled_around():
    cc_hf.disable()
    yield
    cc_hf.disable()


@pytest.fixture(scope="module", autouse=True)
def _no_tf32_convolutions():
    """transformers' own path runs `F.conv1d`, which cuDNN may compute in TF32 on NVIDIA GPUs; the float32
    comparisons need it in float32."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


def test_the_table_covers_every_family_of_the_installed_version():
    """A family added by a newer transformers needs a tiny config here (the replacement itself is generic)."""
    from test_transformers_integration import _modeling_modules_defining_the_functions

    families = {name.split(".")[2] for name in _modeling_modules_defining_the_functions()}
    assert families <= set(CONFIGS), f"no tiny config for {sorted(families - set(CONFIGS))}"


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def test_forward_logits(family_model, device, spy):
    family, model = family_model
    ids = tokens(2, 13, device=device)
    ref = _logits(model, ids)
    with cc_hf.enabled():
        out = _logits(model, ids)
    assert spy["causal_conv1d_fn"] >= 1, f"{family}: this package was not called"
    assert rel_error(out, ref) <= 1e-5, f"{family}: logits relative error {rel_error(out, ref):.2e}"


def test_greedy_generate_is_token_identical(family_model, device, spy):
    family, model = family_model
    ids = tokens(2, 7, seed=2, device=device)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, **settings)
        with cc_hf.enabled():
            out = model.generate(ids, **settings)
    assert spy["causal_conv1d_update"] >= 4, f"{family}: decode steps did not reach this package ({spy})"
    assert torch.equal(out, ref), f"{family}: {out.tolist()} != {ref.tolist()}"


def _gradients(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    model(ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    return grads


def test_training_step_gradients(family_model, device, spy):
    family, model = family_model
    ids = tokens(2, 11, seed=4, device=device)
    ref = _gradients(model, ids)
    with cc_hf.enabled():
        out = _gradients(model, ids)
    assert spy["causal_conv1d_fn"] >= 1
    assert out.keys() == ref.keys()
    conv_grads = [n for n in ref if "conv" in n]
    assert conv_grads and all(ref[n].abs().sum() > 0 for n in conv_grads), f"{family}: no conv gradient"
    flat_out, flat_ref = torch.cat([out[n].flatten() for n in ref]), torch.cat([ref[n].flatten() for n in ref])
    error = rel_error(flat_out, flat_ref)
    assert error <= 1e-5, f"{family}: gradients relative error {error:.2e}"
    for n in conv_grads:
        assert rel_error(out[n], ref[n]) <= 1e-4, f"{family}: {n} relative error {rel_error(out[n], ref[n]):.2e}"


def _packed_inputs(lengths, device, seed=5):
    seqs = [tokens(1, n, seed=seed + i, device=device) for i, n in enumerate(lengths)]
    positions = torch.cat([torch.arange(n) for n in lengths]).view(1, -1).to(device)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(1, -1)
    return seqs, torch.cat(seqs, 1), positions, seq_idx.to(device=device, dtype=torch.int32)


@pytest.mark.parametrize("family", PACKED)
def test_packed_forward_equals_the_sequences_one_by_one(family, device, spy):
    """`seq_idx` as `DataCollatorWithFlattening(return_seq_idx=True)` gives it; with this package each
    sequence is convolved alone."""
    model = build(family, device)
    seqs, ids, positions, seq_idx = _packed_inputs([5, 9, 4], device)
    one_by_one = torch.cat([_logits(model, s) for s in seqs], 1)
    try:  # transformers' own functions refuse seq_idx (decorated ones) or ignore it (LFM3's)
        theirs = _logits(model, ids, position_ids=positions, seq_idx=seq_idx)
    except ValueError as refused:
        assert "packed sequences" in str(refused)
    else:
        assert rel_error(theirs, one_by_one) > 1e-5
    with cc_hf.enabled():
        packed = _logits(model, ids, position_ids=positions, seq_idx=seq_idx)
        leaky = _logits(model, ids, position_ids=positions)
    assert spy["causal_conv1d_fn"] >= 2
    assert rel_error(packed, one_by_one) <= 1e-5, f"{family}: {rel_error(packed, one_by_one):.2e}"
    assert rel_error(leaky, one_by_one) > 1e-5  # without seq_idx the convolution mixes the sequences


def test_packed_training_step_equals_the_sequences_one_by_one(device):
    """Training on packed sequences: gradients of a packed batch equal those of its sequences summed."""
    model = build("lfm2", device).train()
    lengths = [6, 3, 8]
    seqs, ids, positions, seq_idx = _packed_inputs(lengths, device, seed=9)
    cotangent = torch.randn(1, sum(lengths), VOCAB, generator=torch.Generator().manual_seed(0)).to(device)
    with cc_hf.enabled():
        (model(ids, position_ids=positions, seq_idx=seq_idx, use_cache=False).logits * cotangent).sum().backward()
        packed = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        pieces = cotangent.split(lengths, dim=1)
        for s, c in zip(seqs, pieces):
            (model(s, use_cache=False).logits * c).sum().backward()
    for n, p in model.named_parameters():
        assert rel_error(packed[n], p.grad) <= 1e-5, f"{n}: {rel_error(packed[n], p.grad):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("family", ["lfm2", "mamba2"])
def test_half_precision_is_as_close_to_float32_as_transformers_own(family, dtype, device, spy):
    """In bf16 both paths round; ours must stay as close to the float32 model as transformers' own."""
    ids = tokens(2, 12, seed=6, device=device)
    ref32 = _logits(build(family, device), ids)
    model = build(family, device, dtype)
    theirs = _logits(model, ids)
    with cc_hf.enabled():
        ours = _logits(model, ids)
    assert spy["causal_conv1d_fn"] >= 1
    assert rel_error(ours, ref32) <= 2 * rel_error(theirs, ref32) + 1e-3


@pytest.mark.triton
@pytest.mark.parametrize("family", TRITON_SUBSET)
def test_triton_kernels_under_the_interpreter(family, device, monkeypatch, spy):
    from causal_conv1d_mps._backend import backend_unavailable_reason

    reason = backend_unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(f"backend triton on {device}: {reason}")
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "triton")
    model = build(family, device)
    ids = tokens(1, 9, seed=7, device=device)
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    ref = _logits(model, ids)
    with torch.no_grad():
        ref_tokens = model.generate(ids, **settings)
    with cc_hf.enabled():
        out = _logits(model, ids)
        with torch.no_grad():
            out_tokens = model.generate(ids, **settings)
    assert spy["causal_conv1d_fn"] >= 2 and spy["causal_conv1d_update"] >= 2
    assert rel_error(out, ref) <= 1e-5
    assert torch.equal(out_tokens, ref_tokens)


def test_torch_compile_sees_no_graph_break(device, spy):
    """The replaced functions are custom ops with fake implementations: dynamo traces LFM2 in one graph."""
    import torch._dynamo

    model = build("lfm2", device)
    ids = tokens(2, 13, seed=8, device=device)
    ref = _logits(model, ids)
    with cc_hf.enabled():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids, use_cache=False)
        compiled = torch.compile(model, backend="aot_eager")
        with torch.no_grad():
            out = compiled(ids, use_cache=False).logits
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert spy["causal_conv1d_fn"] >= 1
    assert rel_error(out, ref) <= 1e-5

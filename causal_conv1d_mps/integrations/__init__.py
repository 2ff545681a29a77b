"""Integrations with other libraries; each submodule imports its library only when used.

- `causal_conv1d_mps.integrations.transformers`: Hugging Face transformers' hybrid models (LFM2, Mamba,
  Qwen3-Next, ...) run their short convolutions on this package (`enable()` / `disable()`).
"""

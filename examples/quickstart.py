"""The main job in a few lines: a fused short convolution forward and backward, then cached decoding,
on the best device here (mps, cuda or cpu), checked against the plain PyTorch reference."""
import torch

import causal_conv1d_mps as ccmps

device = "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
B, T, D, W = 2, 64, 128, 4
conv = ccmps.ShortConvolution(D, kernel_size=W, bias=True, activation="silu", residual=True, device=device)
x = torch.randn(B, T, D, device=device, requires_grad=True)

y, cache = conv(x[:, :48], output_final_state=True)           # prefill, returning the conv cache
y.square().mean().backward()                                    # gradients for x, weight and bias
steps = [conv.step(x[:, t].detach(), cache)[0] for t in range(48, T)]  # decode token by token

with torch.no_grad():
    full = ccmps.reference.short_conv_fused_fwd(x.detach(), conv.weight, conv.bias, None, None, None,
                                                True, True, False)[0]
err_prefill = ((y - full[:, :48]).norm() / full[:, :48].norm()).item()
err_decode = ((torch.stack(steps, 1) - full[:, 48:]).norm() / full[:, 48:].norm()).item()
print(f"device={device}  prefill rel.err={err_prefill:.2e}  decode rel.err={err_decode:.2e}  "
      f"|dweight|={conv.weight.grad.norm():.3f}")
assert err_prefill < 1e-5 and err_decode < 1e-5

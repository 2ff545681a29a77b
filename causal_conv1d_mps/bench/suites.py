"""The shapes of each suite, as `Spec`s (one benchmark row each).

`B, D, T` name batch, channels and sequence length whatever the op's layout. `--quick` shrinks
every spec to a tiny one of the same kind (same op, flags and layout) so that CI exercises every
code path in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

SUITES = ("basic", "canon", "large", "backward", "decode", "width")
WIDTH_SWEEP = tuple(range(2, 17))
QUICK_WIDTH_SWEEP = (2, 3, 8, 16)  # --quick: the ends, an odd width and a power of two


@dataclass(frozen=True)
class Spec:
    suite: str
    op: str  # the public function timed: causal_conv1d, short_conv_fused or short_conv_update
    label: str  # what the row stands for, e.g. "CanonB qkv"
    B: int
    D: int
    T: int = 1
    width: int = 4
    silu: bool = True
    bias: bool = True
    residual: bool = True  # fused and decode ops only
    mask: bool = False  # fused op only: an HF-style int64 attention mask with left padding
    backward: bool = False  # time forward + backward
    channel_last: bool = False  # causal_conv1d only: x is the transposed view of a [B, T, D] tensor
    row_stride: int = 0  # fused op only: x is x_wide[..., -D:] of a [B, T, row_stride] projection output

    @property
    def name(self) -> str:
        if self.op == "short_conv_update":
            dims = f"B{self.B} D{self.D}"
        elif self.op == "causal_conv1d":
            dims = f"B{self.B} D{self.D} T{self.T}"
        else:
            dims = f"B{self.B} T{self.T} D{self.D}"
        return f"{self.label} {dims} W{self.width}"


def _basic(width: int) -> list[Spec]:
    shapes = [(1, 64, 128), (2, 128, 256), (4, 256, 512), (1, 512, 1024), (8, 64, 128)]
    return [
        Spec("basic", "causal_conv1d", "fwd silu" if silu else "fwd", b, d, t, width, silu=silu)
        for b, d, t in shapes
        for silu in (False, True)
    ]


def _canon(width: int) -> list[Spec]:
    fused = [Spec("canon", "short_conv_fused", "fused", b, d, t, width)
             for b, t, d in [(1, 128, 512), (2, 256, 768), (4, 512, 1024)]]
    # CanonA/C convolve the hidden states (D = hidden size) before attention / the MLP.
    canon_ac = [Spec("canon", "short_conv_fused", "CanonA/C mask", b, d, t, width, mask=True)
                for b, t, d in [(2, 256, 768), (4, 512, 1024)]]
    # CanonB convolves the concatenated q, k, v projections: D = (H + 2 KV) * head_dim.
    canon_b = [
        Spec("canon", "short_conv_fused", f"CanonB qkv H{h} KV{kv} hd{hd}", b, (h + 2 * kv) * hd, t, width, mask=True)
        for b, t, h, kv, hd in [(2, 256, 12, 4, 64), (2, 512, 16, 8, 64)]
    ]
    # CanonD convolves gate||up (D = 2 I). In a parallel block (one fused input projection
    # [qkv | gate | up], hidden H) it reads that slice of the wider output in place.
    canon_d = [
        Spec("canon", "short_conv_fused", f"CanonD gate-up H{h} I{i}", b, 2 * i, t, width, mask=True)
        for b, t, h, i in [(2, 256, 768, 2048), (2, 512, 1024, 4096)]
    ]
    canon_d_slice = [replace(s, label=s.label.replace("gate-up", "gate-up slice"), row_stride=s.D + 3 * h)
                     for s, h in zip(canon_d, (768, 1024))]
    return fused + canon_ac + canon_b + canon_d + canon_d_slice


def _large(width: int) -> list[Spec]:
    return [
        Spec("large", "causal_conv1d", "fwd silu", 4, 4096, 8192, width),
        Spec("large", "causal_conv1d", "fwd silu", 8, 2048, 4096, width),
        Spec("large", "causal_conv1d", "fwd silu channel-last", 4, 4096, 8192, width, channel_last=True),
        Spec("large", "short_conv_fused", "fused mask", 4, 4096, 8192, width, mask=True),
        Spec("large", "short_conv_fused", "fused mask", 8, 4096, 2048, width, mask=True),
    ]


def _backward(width: int) -> list[Spec]:
    fused = [Spec("backward", "short_conv_fused", "fused fwd+bwd", b, d, t, width, backward=True)
             for b, t, d in [(1, 128, 512), (2, 512, 2048), (8, 2048, 4096)]]
    conv = [Spec("backward", "causal_conv1d", "fwd+bwd silu", b, d, t, width, backward=True)
            for b, d, t in [(2, 128, 256), (2, 2048, 512), (8, 4096, 2048)]]
    return fused + conv


def _decode(width: int) -> list[Spec]:
    shapes = [(1, 4096), (8, 4096), (32, 4096), (64, 8192), (256, 8192)]
    return [Spec("decode", "short_conv_update", "decode", b, d, 1, width) for b, d in shapes]


def _width(_: int, widths=WIDTH_SWEEP) -> list[Spec]:
    return [
        spec
        for w in widths
        for spec in (
            Spec("width", "causal_conv1d", "fwd silu", 4, 4096, 2048, w),
            Spec("width", "short_conv_fused", "fused", 4, 4096, 2048, w),
        )
    ]


_BUILDERS = {
    "basic": _basic, "canon": _canon, "large": _large, "backward": _backward, "decode": _decode, "width": _width,
}


def shrink(spec: Spec) -> Spec:
    """A tiny spec of the same kind, for `--quick`."""
    dim = min(spec.D, 96)
    row_stride = dim + 32 if spec.row_stride else 0
    return replace(spec, B=min(spec.B, 2), D=dim, T=min(spec.T, 64), row_stride=row_stride)


def specs_for(suites: list[str], width: int, quick: bool) -> list[Spec]:
    """The rows of the chosen suites in order; `--quick` shrinks them and drops duplicates."""
    rows: list[Spec] = []
    for suite in suites:
        built = _width(width, QUICK_WIDTH_SWEEP) if quick and suite == "width" else _BUILDERS[suite](width)
        if quick:
            built = [shrink(s) for s in built]
        for spec in built:
            if spec not in rows:
                rows.append(spec)
    return rows

"""The host/kernel contract of the Metal kernels, defined once: flag bits, the activation codes (from the
registry `causal_conv1d_mps._activation`), the threadgroup size of the weight-gradient kernels, and the named
slots of each kernel's int64 parameter list (`constant long* p`).

The launchers build their parameter lists from these tables by name (`pack`); the loader prepends the MSL
text generated from the same tables (`msl_header`) to every compiled source, so the kernels read `p[CONV_T]`,
`CC_HAS_BIAS`, `CC_ACTIVATION_SILU`, `CC_GROUP`, never a number copied by hand.
"""
from __future__ import annotations

from .. import _activation

# Flag bits of the `flags` slot, in bit order (bit i = 1 << i). MSL name: CC_<name>.
FLAG_NAMES = ("HAS_BIAS", "HAS_SEQ", "HAS_INIT", "HAS_DFINAL", "HAS_MASK", "HAS_CU", "RESIDUAL",
              "CIRCULAR", "HAS_INDICES")
FLAGS = {name: 1 << i for i, name in enumerate(FLAG_NAMES)}

# The value of the ACTIVATION slot: an activation code of the registry. MSL name: CC_ACTIVATION_<NAME>.
ACTIVATION_CODES = {a.name.upper(): a.code for a in _activation.ACTIVATIONS}

# Threads per threadgroup of the kernels that reduce in threadgroup memory (the backward kernels).
GROUP = 256

# Parameter slots of each table, in order. MSL name of a slot: <TABLE>_<SLOT>, e.g. CONV_X_STRIDE_T.
PARAMS: dict[str, tuple[str, ...]] = {
    # causal_conv1d.metal: x (B, D, T) in either layout.
    "CONV": ("B", "D", "T", "W", "X_STRIDE_B", "X_STRIDE_D", "X_STRIDE_T", "G_STRIDE_B", "G_STRIDE_D",
             "G_STRIDE_T", "FLAGS", "ACTIVATION", "RUN", "CHANNEL_LAST", "RUNS", "N_STATES",
             "CHANNELS", "RUN_GROUPS"),  # the last two: backward only (threadgroup tile)
    # short_conv_fused.metal: x (B, T, D), stride over D is 1.
    "FUSED": ("B", "D", "T", "W", "X_STRIDE_B", "X_STRIDE_T", "FLAGS", "ACTIVATION", "RUN", "RUNS", "N_STATES",
              "CHANNELS", "RUN_GROUPS"),
    # short_conv_update.metal: x (B, L, D), conv_state (N, D, S), out (B, L, D), any strides.
    "UPDATE": ("B", "L", "D", "W", "S", "N", "X_STRIDE_B", "X_STRIDE_L", "X_STRIDE_D", "STATE_STRIDE_N",
               "STATE_STRIDE_D", "STATE_STRIDE_S", "OUT_STRIDE_B", "OUT_STRIDE_L", "OUT_STRIDE_D", "FLAGS",
               "ACTIVATION"),
    # states.metal, gather_states: out (N, D, STATE_LEN) from x with strides (b, t, d).
    "GATHER": ("N", "D", "STATE_LEN", "T", "X_STRIDE_B", "X_STRIDE_T", "X_STRIDE_D", "FLAGS"),
    # states.metal, reduce_rows_float: column sums of a (ROWS, COLS) float32 matrix.
    "REDUCE": ("ROWS", "COLS"),
}

GENERATED_NAME = "contract.generated.metal"


def pack(table: str, **values: int) -> list[int]:
    """The int64 parameter list of `table`, every slot given by name exactly once."""
    slots = PARAMS[table]
    missing = [s for s in slots if s not in values]
    unknown = [k for k in values if k not in slots]
    if missing or unknown:
        raise TypeError(f"Metal parameters {table}: missing {missing}, unknown {unknown}")
    return [int(values[s]) for s in slots]


def msl_header() -> str:
    """The MSL text of this contract (ASCII), compiled before every kernel file."""
    lines = [f"// Generated from {__name__} (Python) by the loader: do not edit, do not copy.",
             "// Flag bits of the FLAGS parameter slots."]
    lines += [f"#define CC_{name} {bit}" for name, bit in FLAGS.items()]
    lines.append("// Activation codes of the ACTIVATION parameter slots (cc_activation in common.metal).")
    lines += [f"#define CC_ACTIVATION_{name} {code}" for name, code in ACTIVATION_CODES.items()]
    lines += ["// Threads per threadgroup of the kernels that reduce in threadgroup memory.",
              f"#define CC_GROUP {GROUP}"]
    for table, slots in PARAMS.items():
        lines.append(f"// Slots of the int64 parameter list p[] of the {table} kernels ({len(slots)} slots).")
        lines.append(f"enum {table.capitalize()}Param : int {{")
        lines += [f"  {table}_{slot} = {i}," for i, slot in enumerate(slots)]
        lines += [f"  {table}_COUNT = {len(slots)}", "};"]
    return "\n".join(lines) + "\n"

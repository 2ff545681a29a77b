"""The self-check a user runs first: `python -m causal_conv1d_mps.check` (see docs/CHECK.md).

It needs only PyTorch and the installed package. On the chosen device and backend it reports the
environment, compiles the kernels (timing each family), runs every op and dtype against a float64
reference computed on the CPU by `causal_conv1d_mps.reference`, says for each op whether the kernels
served the calls or the reference path did (a fallback), times a few shapes against eager PyTorch, and
prints a short report (optionally a JSON file to share). Exit status: 0 when every check passed, 1 when
a result was wrong, 2 on a usage error.

Modules, one job each: `cli` (arguments, the run), `environment` (device, backend, dtypes, versions),
`serving` (which backend served a call), `kernels` (compile step), `cases` (inputs, calls and float64
expectations of each accuracy check), `accuracy` (runs and grades them), `speed` (timing against
eager PyTorch, through the benchmark package), `report` (text and JSON).
"""

from .cli import main

__all__ = ["main"]

"""The benchmark users run: `python -m causal_conv1d_mps.bench` (or `python bench.py` in a checkout).

It times this package's ops against the PyTorch code a user would otherwise write (and, where
installed, Dao-AILab `causal_conv1d` and flash-linear-attention), checks every result against a
float64 oracle before timing it, and reports achieved bandwidth as a fraction of the device's
own copy bandwidth measured in the same run. See docs/BENCHMARK.md.

Modules, one job each: `cli` (arguments, the run), `suites` (which shapes), `cases` (inputs and
the callables of one row), `baselines` (eager PyTorch and third-party formulations), `oracle`
(float64 definitions), `accuracy` (chunked error check), `traffic` (byte counts), `timing`,
`devices` (device choice, copy bandwidth, header), `runner` (verify then time one row),
`report` (table, JSON, plot), `progress`.
"""

from .cli import main, parse_args

__all__ = ["main", "parse_args"]

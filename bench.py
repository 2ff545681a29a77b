"""Runs the benchmark from a source checkout: `python bench.py --dtype bf16` (options: --help).

A thin wrapper over `python -m causal_conv1d_mps.bench`; see docs/BENCHMARK.md.
"""

from causal_conv1d_mps.bench import main

if __name__ == "__main__":
    raise SystemExit(main())

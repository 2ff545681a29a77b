"""Launch configurations (tile shapes, warps), chosen per shape and cached.

The GPU figures come from the runs recorded in docs/PERF_NOTES.md. Under the interpreter every program
costs Python time, so there the tiles are as large as the problem allows. `OVERRIDES` lets
benchmarks/perf_targets.py try variants without editing this file.
"""
from __future__ import annotations

import functools

import triton

# name -> dict of fields replacing the chosen config (benchmarks only)
OVERRIDES: dict[str, dict] = {}

# widest filter sent to the per-thread-run forward kernel (its halo and taps stay in registers up to here)
RUNS_MAX_W = 8


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _override(name: str, config: dict) -> dict:
    extra = OVERRIDES.get(name)
    return {**config, **extra} if extra else config


@functools.lru_cache(maxsize=1024)
def conv_tiles(T: int, D: int, W: int, channel_last: bool, interpreted: bool, elem_bytes: int = 4) -> dict:
    """Tiles of the forward convolution kernels over `[T, D]`.

    A config with `R` selects the per-thread-run kernel (`kernels/conv_fwd_runs.py`): measured faster for
    16-bit inputs at W <= RUNS_MAX_W (docs/PERF_NOTES.md, v5); other cases keep `conv_fwd`.
    """
    if interpreted:
        config = dict(BT=min(_pow2(T), 64), BD=min(_pow2(D), 64), num_warps=4)
        if elem_bytes == 2 and W <= RUNS_MAX_W and config["BT"] >= 8:  # the same kernel choice as on a GPU
            config.update(R=8 if not channel_last else 4, HR=8 if not channel_last else 1,
                          BTB=config["BT"])
    elif channel_last:
        # D is contiguous: 128 channels give 256-byte rows in 16-bit types (16-byte vectors per thread).
        # Small tiles keep registers low (occupancy); wide filters re-load more rows per tap and prefer
        # taller tiles (sweep in docs/PERF_NOTES.md, v4)
        bt, bd, nw = (8, 128, 1) if W <= 4 else (16, 128, 2) if W <= 8 else (32, 64, 2)
        config = dict(BT=min(_pow2(T, 8), bt), BD=min(_pow2(D, 16), bd), num_warps=nw)
        if elem_bytes == 2 and W <= RUNS_MAX_W and D % 256 == 0:
            # one warp, 256 channels (a 16-byte vector per thread), runs of 4 rows held by each thread
            config = dict(BT=8, BD=256, R=4, HR=1, BTB=2, num_warps=1)
    else:
        # T is contiguous: long time tiles, a few channels
        bt, nw = (256, 4) if W <= 4 else (128, 2)
        config = dict(BT=min(_pow2(T, 16), bt), BD=min(_pow2(D), 8), num_warps=nw)
        if elem_bytes == 2 and W <= RUNS_MAX_W and T % 8 == 0 and T >= 1024:
            # a run is one 16-byte vector of 8 time steps; its halo is the previous run (an L1 hit)
            config = dict(BT=1024, BD=min(_pow2(D), 4), R=8, HR=8, BTB=128, num_warps=4)
    return _override("conv_fwd_" + ("channel_last" if channel_last else "contiguous"), config)


@functools.lru_cache(maxsize=1024)
def conv_bwd_tiles(T: int, D: int, W: int, channel_last: bool, interpreted: bool) -> dict:
    """Tiles of the backward kernel; `TILES` T tiles per program bound the number of partial rows."""
    if interpreted:
        config = dict(BT=min(_pow2(T), 64), BD=min(_pow2(D), 64), TILES=4, num_warps=4)
    elif channel_last:
        # two warps share a BT32 x BD64 tile (32 values per thread); one warp holding it all used 255
        # registers and spilled. Wider filters keep more tiles live: half the channels, one warp
        # (sweep in docs/PERF_NOTES.md, v4)
        config = dict(BT=min(_pow2(T, 16), 32), BD=min(_pow2(D, 16), 64 if W <= 4 else 32), TILES=16,
                      num_warps=2 if W <= 4 else 1)
    else:
        config = dict(BT=min(_pow2(T, 16), 128), BD=min(_pow2(D), 4), TILES=4, num_warps=2)
    return _override("conv_bwd_" + ("channel_last" if channel_last else "contiguous"), config)


@functools.lru_cache(maxsize=256)
def update_tiles(D: int, S: int, interpreted: bool) -> dict:
    if interpreted:
        config = dict(BD=min(_pow2(D), 128), BS=min(_pow2(S, 2), 64), num_warps=4)
    else:
        config = dict(BD=min(_pow2(D, 32), 256), BS=min(_pow2(S, 2), 16), num_warps=4)
    return _override("update", config)


def clear() -> None:
    """Forget cached configs (after changing OVERRIDES)."""
    conv_tiles.cache_clear()
    conv_bwd_tiles.cache_clear()
    update_tiles.cache_clear()

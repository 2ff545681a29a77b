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


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _override(name: str, config: dict) -> dict:
    extra = OVERRIDES.get(name)
    return {**config, **extra} if extra else config


@functools.lru_cache(maxsize=1024)
def conv_tiles(T: int, D: int, W: int, channel_last: bool, interpreted: bool, elem_bytes: int = 4) -> dict:
    """Tiles of the forward convolution kernels over `[T, D]`.

    A config with `R` selects the per-thread-run kernel (`kernels/conv_fwd_runs.py`), used only where it
    was measured faster on an H200 (16-bit inputs; docs/PERF_NOTES.md, v5); elsewhere `conv_fwd`.
    """
    runs = _runs_tiles(T, D, W, channel_last) if elem_bytes == 2 else None
    if interpreted:
        config = dict(BT=min(_pow2(T), 64), BD=min(_pow2(D), 64), num_warps=4)
        if runs is not None and config["BT"] >= runs["R"]:  # the same kernel choice as on a GPU
            config.update(R=runs["R"], HR=runs["HR"])
    elif runs is not None:
        config = runs
    elif channel_last:
        # D is contiguous: 128 channels give 256-byte rows in 16-bit types (16-byte vectors per thread).
        # Small tiles keep registers low (occupancy); wide filters re-load more rows per tap and prefer
        # taller tiles (sweep in docs/PERF_NOTES.md, v4)
        bt, bd, nw = (8, 128, 1) if W <= 4 else (16, 128, 2) if W <= 8 else (32, 64, 2)
        config = dict(BT=min(_pow2(T, 8), bt), BD=min(_pow2(D, 16), bd), num_warps=nw)
    else:
        # T is contiguous: long time tiles, a few channels
        bt, nw = (256, 4) if W <= 4 else (128, 2)
        config = dict(BT=min(_pow2(T, 16), bt), BD=min(_pow2(D), 8), num_warps=nw)
    return _override("conv_fwd_" + ("channel_last" if channel_last else "contiguous"), config)


def _runs_tiles(T: int, D: int, W: int, channel_last: bool) -> dict | None:
    """Per-thread-run tiles for 16-bit inputs where the H200 runs measured a gain (v5), else None.

    The R axis must lie inside each thread: in the contiguous layout a run is one 16-byte vector of 8
    steps and its halo the previous run (HR = R, so W - 1 <= 8); in channel-last one warp holds 256
    channels and each thread 4 rows of its 8 channels.
    """
    if channel_last:
        # measured with this tile: W4 fused 60.4 -> 65.2%, W8 32.1 -> 51.4%; W7 slower (15.4%), W2 even
        if W in (4, 8) and D % 256 == 0:
            return dict(BT=8, BD=256, R=4, HR=1, num_warps=1)
        return None
    if 2 <= W <= 7 and T % 8 == 0 and T >= 1024:  # W = 8 measured slower (39.8% against 54.3%)
        if W == 4:
            return dict(BT=1024, BD=min(_pow2(D), 4), R=8, HR=8, num_warps=4)
        return dict(BT=512, BD=min(_pow2(D), 8), R=8, HR=8, num_warps=4)
    return None


@functools.lru_cache(maxsize=1024)
def conv_bwd_tiles(T: int, D: int, W: int, channel_last: bool, interpreted: bool, elem_bytes: int = 4,
                   packed: bool = False, masked: bool = False) -> dict:
    """Tiles of the backward kernel; `TILES` T tiles per program bound the number of partial rows.

    A config with `R` selects the per-thread-run kernel (`kernels/conv_bwd_runs.py`): 16-bit inputs, no
    packed sequences, full D tiles, and only for the `(channel_last, W)` of `BWD_RUNS_MEASURED`;
    elsewhere `conv_bwd` (an override with `R` forces either kernel).
    """
    runs = None
    # an attention mask in the time-major layout: its [R, G, 1] tiles change layout in every run (SASS:
    # about 160 instructions per element), so only channel-last takes the run kernel with a mask
    eligible = elem_bytes == 2 and not packed and not (masked and not channel_last)
    if eligible and (channel_last, W) in BWD_RUNS_MEASURED:
        runs = bwd_runs_candidate(T, D, W, channel_last)
    if interpreted:
        config = dict(BT=min(_pow2(T), 64), BD=min(_pow2(D), 64), TILES=4, num_warps=4)
        if (runs is not None and D % config["BD"] == 0 and config["BT"] % runs["R"] == 0
                and config["BT"] >= runs["HR"]):  # the same kernel choice as on a GPU
            config.update(R=runs["R"], HR=runs["HR"], HF=runs["HF"], CARRY=False)
    elif runs is not None:
        config = runs
    elif channel_last:
        # two warps share a BT32 x BD64 tile (32 values per thread); one warp holding it all used 255
        # registers and spilled. Wider filters keep more tiles live: half the channels, one warp
        # (sweep in docs/PERF_NOTES.md, v4)
        config = dict(BT=min(_pow2(T, 16), 32), BD=min(_pow2(D, 16), 64 if W <= 4 else 32), TILES=16,
                      num_warps=2 if W <= 4 else 1)
    else:
        config = dict(BT=min(_pow2(T, 16), 128), BD=min(_pow2(D), 4), TILES=4, num_warps=2)
    config = _override("conv_bwd_" + ("channel_last" if channel_last else "contiguous"), config)
    if config.get("R") and (packed or D % config["BD"] != 0):  # an override cannot force what the kernel lacks
        config = {k: v for k, v in config.items() if k not in ("R", "HR", "HF", "CARRY")}
    return config


# The `(channel_last, W)` for which an H200 run measured the run-based backward (the tiles of
# `bwd_runs_candidate`) faster than `conv_bwd` (docs/PERF_NOTES.md, v6: bf16, backward alone, e.g. W = 4
# 0.359 -> 0.216 ms contiguous, 0.279 -> 0.230 ms channel-last); other widths stay on `conv_bwd` until timed
# (benchmarks/prototypes/v6_bench.py).
BWD_RUNS_MEASURED: frozenset[tuple[bool, int]] = frozenset(
    {(False, 3), (False, 4), (False, 8), (True, 3), (True, 4), (True, 8)})


def bwd_runs_candidate(T: int, D: int, W: int, channel_last: bool) -> dict | None:
    """Per-thread-run backward tiles for 16-bit inputs at this shape, else None (chosen from SASS counts
    with triton 3.6 and 3.9, then timed on an H200 at W = 3, 4 and 8: docs/PERF_NOTES.md, v6).

    The interior runs start at step HR and need HF steps after them, so HR and HF are at least W - 1;
    in the contiguous layout a run and each halo are one 16-byte vector of 8 steps (HR = HF = R = 8).
    """
    if W < 2:
        return None
    halo = _pow2(W - 1)
    if channel_last:
        # each thread walks its channels back in time, one run per tile, and hands the dpre of the run's
        # first rows to the tile before (`CARRY`); VEC channels per thread: 4 (one warp per 128 channels) up
        # to W = 4, 2 for W = 5..8, whose 8-step runs and halos spilled with 4 (SASS, triton 3.6)
        if W <= 4 and D % 128 == 0 and T >= 64:
            return dict(BT=4, BD=128, R=4, HR=halo, HF=halo, TILES=32, CARRY=True, VEC=4, num_warps=1)
        if W <= 8 and D % 64 == 0 and T >= 64:
            return dict(BT=8, BD=64, R=8, HR=halo, HF=halo, TILES=32, CARRY=True, VEC=2, num_warps=1)
        return None
    if W <= 9 and T % 8 == 0 and T >= 256 and D % 4 == 0:
        return dict(BT=128, BD=4, R=8, HR=8, HF=8, TILES=4, num_warps=2)
    return None


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

"""The test harness's own helpers that decide where tests run."""

from __future__ import annotations

from conftest import spread_worker


def test_xdist_workers_spread_over_every_gpu():
    """`-n` workers take GPUs round-robin (gw0 -> 0, gw1 -> 1, gw2 -> 0 on two); one GPU, or a run without
    xdist, leaves the current device alone."""
    assert [spread_worker(f"gw{i}", 2) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [spread_worker(f"gw{i}", 3) for i in range(4)] == [0, 1, 2, 0]
    assert spread_worker("gw7", 1) is None
    assert spread_worker(None, 2) is None
    assert spread_worker("master", 2) is None

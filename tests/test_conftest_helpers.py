"""The test harness's own helpers that decide where tests run."""

from __future__ import annotations

import pytest

from conftest import in_shard, parse_shard, slow_first, spread_worker


def test_xdist_workers_spread_over_every_gpu():
    """`-n` workers take GPUs round-robin (gw0 -> 0, gw1 -> 1, gw2 -> 0 on two); one GPU, or a run without
    xdist, leaves the current device alone."""
    assert [spread_worker(f"gw{i}", 2) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [spread_worker(f"gw{i}", 3) for i in range(4)] == [0, 1, 2, 0]
    assert spread_worker("gw7", 1) is None
    assert spread_worker(None, 2) is None
    assert spread_worker("master", 2) is None


def test_slow_tests_start_first_on_gpus_in_their_own_order():
    ids = ["tests/test_a.py::test_fast", "tests/test_fuzz.py::test_one",
           "tests/test_short_conv_fused.py::test_forward_backward_matches_oracle[triton-torch.float16-w_fp32-7]",
           "tests/test_b.py::test_fast", "tests/test_short_conv_fused.py::test_forward_backward_matches_oracle[reference-x]"]
    assert slow_first(ids) == [1, 2, 0, 3, 4]
    assert slow_first([]) == []


def test_shards_split_the_run_order_without_overlap_or_loss():
    """`--shard K/N`: the N parts together hold every test once, each part takes every N-th test of the run
    order (so the slow tests at its front are shared out), and malformed values are refused by name."""
    parts = [in_shard(7, (k, 3)) for k in (1, 2, 3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for part in parts for i in part) == list(range(7))
    assert in_shard(5, (1, 1)) == list(range(5))
    assert in_shard(0, (2, 2)) == []
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1", "a/b", "1/0", "-1/2", ""):
        with pytest.raises(pytest.UsageError, match="--shard: expected K/N"):
            parse_shard(bad)

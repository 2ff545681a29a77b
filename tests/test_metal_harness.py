"""Self-tests of metal_harness, the Linux harness that runs the shipped .metal kernels on the CPU.

The harness is only worth something if a wrong kernel fails through it: besides "correct kernels
match a reference exactly", these tests check that a missing barrier, a wrong lane index, an
implicit float-to-bfloat conversion and a divergent barrier are caught.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("metal_harness") is None:  # test-only package at the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metal_harness  # noqa: E402

pytestmark = pytest.mark.skipif(metal_harness.unavailable_reason() is not None,
                                reason=str(metal_harness.unavailable_reason()))

BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"

# Kernels whose correctness depends on threadgroup memory, barriers and lane indices.
SHARED_MEMORY_SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

// out[i] = x[i] + x[i - 1] within each threadgroup, the neighbour read through shared memory.
kernel void neighbour_sum(device const float* x [[buffer(0)]],
                          device float* out [[buffer(1)]],
                          constant long& n [[buffer(2)]],
                          uint gid [[thread_position_in_grid]],
                          uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float shared[256];
  const float v = gid < uint(n) ? x[gid] : 0.0f;
  shared[lid] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float left = lid > 0 ? shared[lid - 1] : 0.0f;
  if (gid < uint(n)) {
    out[gid] = v + left;
  }
}

// Two rounds of neighbour_sum reusing one shared array: the second barrier keeps round 2's
// write from overtaking round 1's read of the neighbour.
kernel void neighbour_sum_twice(device const float* x [[buffer(0)]],
                                device float* out [[buffer(1)]],
                                uint gid [[thread_position_in_grid]],
                                uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float shared[256];
  float v = x[gid];
  for (int round = 0; round < 2; ++round) {
    shared[lid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    v += lid > 0 ? shared[lid - 1] : 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[gid] = v;
}

// One sum per threadgroup of 256 threads, by a tree reduction in shared memory.
kernel void group_sums(device const float* x [[buffer(0)]],
                       device float* out [[buffer(1)]],
                       uint gid [[thread_position_in_grid]],
                       uint lid [[thread_position_in_threadgroup]],
                       uint group [[threadgroup_position_in_grid]]) {
  threadgroup float partial[256];
  partial[lid] = x[gid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = 128; s > 0; s /= 2) {
    if (lid < s) {
      partial[lid] += partial[lid + s];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (lid == 0) {
    out[group] = partial[0];
  }
}

// Reverses the values within each SIMD group of 32 lanes.
kernel void reverse_lanes(device const float* x [[buffer(0)]],
                          device float* out [[buffer(1)]],
                          uint gid [[thread_position_in_grid]],
                          uint lane [[thread_index_in_simdgroup]]) {
  out[gid] = simd_shuffle(x[gid], ushort(31 - lane));
}
"""


@pytest.fixture(scope="module")
def shared_lib():
    return metal_harness.compile_library(SHARED_MEMORY_SOURCE)


def neighbour_sum_reference(x: torch.Tensor, group: int) -> torch.Tensor:
    left = torch.cat([x.new_zeros(1), x[:-1]])
    left[::group] = 0
    return x + left


def test_threadgroup_array_with_barrier_matches_reference_exactly(shared_lib):
    x = torch.randn(1000)
    out = torch.full_like(x, float("nan"))
    shared_lib.neighbour_sum(x, out, x.numel(), threads=x.numel(), group_size=256)
    torch.testing.assert_close(out, neighbour_sum_reference(x, 256), rtol=0, atol=0)


ORDER_DEPENDENT = "depends on the order in which the threads of a threadgroup run"


def without_barrier(source: str, kernel: str, which: int = 0) -> str:
    """`source` with barrier number `which` of `kernel` removed."""
    at = source.index(BARRIER, source.index(f"kernel void {kernel}"))
    for _ in range(which):
        at = source.index(BARRIER, at + 1)
    return source[:at] + source[at + len(BARRIER):]


def test_missing_barrier_gives_a_wrong_result(monkeypatch):
    lib = metal_harness.compile_library(without_barrier(SHARED_MEMORY_SOURCE, "neighbour_sum"))
    x = torch.randn(1000)
    out = torch.zeros_like(x)
    monkeypatch.setenv("METAL_HARNESS_SCHEDULE", "alternate")  # one run: reverse order before the first barrier
    lib.neighbour_sum(x, out, x.numel(), threads=x.numel(), group_size=256)
    wrong = ~torch.isclose(out, neighbour_sum_reference(x, 256))
    assert wrong.sum() > 500, f"only {int(wrong.sum())} of 1000 outputs wrong without the barrier"
    monkeypatch.delenv("METAL_HARNESS_SCHEDULE")  # default: two opposite orders, compared
    with pytest.raises(RuntimeError, match=ORDER_DEPENDENT):
        lib.neighbour_sum(x, out, x.numel(), threads=x.numel(), group_size=256)


def test_missing_second_barrier_write_after_read_gives_a_wrong_result(shared_lib, monkeypatch):
    x = torch.randn(512)
    expected = neighbour_sum_reference(neighbour_sum_reference(x, 256), 256)
    out = torch.zeros_like(x)
    shared_lib.neighbour_sum_twice(x, out, group_size=256)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    lib = metal_harness.compile_library(without_barrier(SHARED_MEMORY_SOURCE, "neighbour_sum_twice", 1))
    monkeypatch.setenv("METAL_HARNESS_SCHEDULE", "alternate")  # forward order after the first barrier
    lib.neighbour_sum_twice(x, out, group_size=256)
    wrong = ~torch.isclose(out, expected)
    assert wrong.sum() > 100, f"only {int(wrong.sum())} of 512 outputs wrong without the second barrier"
    monkeypatch.delenv("METAL_HARNESS_SCHEDULE")
    with pytest.raises(RuntimeError, match=ORDER_DEPENDENT):
        lib.neighbour_sum_twice(x, out, group_size=256)


def test_missing_barrier_before_a_tree_reduction_is_caught(shared_lib, monkeypatch):
    x = torch.randn(1024)
    out = torch.zeros(4)
    shared_lib.group_sums(x, out, group_size=256)
    torch.testing.assert_close(out, x.view(4, 256).sum(1), rtol=1e-5, atol=1e-5)

    lib = metal_harness.compile_library(without_barrier(SHARED_MEMORY_SOURCE, "group_sums"))
    # Reverse order is a valid schedule for this mistake, so one run cannot see it; the comparison can.
    monkeypatch.setenv("METAL_HARNESS_SCHEDULE", "reverse")
    lib.group_sums(x, out, group_size=256)
    torch.testing.assert_close(out, x.view(4, 256).sum(1), rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("METAL_HARNESS_SCHEDULE")
    with pytest.raises(RuntimeError, match=ORDER_DEPENDENT):
        lib.group_sums(x, out, group_size=256)


def test_wrong_lane_index_gives_a_wrong_result(shared_lib):
    x = torch.randn(128)
    out = torch.zeros_like(x)
    shared_lib.reverse_lanes(x, out, group_size=64)
    torch.testing.assert_close(out, x.view(-1, 32).flip(1).reshape(-1), rtol=0, atol=0)

    lib = metal_harness.compile_library(SHARED_MEMORY_SOURCE.replace("31 - lane", "32 - lane"))
    lib.reverse_lanes(x, out, group_size=64)
    assert not torch.equal(out, x.view(-1, 32).flip(1).reshape(-1))
    assert out.view(-1, 32)[:, 0].isnan().all(), "lane 0 read lane 32, which does not exist: expected poison"


SIMD_SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

// Row k of `out` holds collective k for every thread.
kernel void simd_collectives(device const float* x [[buffer(0)]],
                             device float* out [[buffer(1)]],
                             constant long& n [[buffer(2)]],
                             uint gid [[thread_position_in_grid]],
                             uint lane [[thread_index_in_simdgroup]]) {
  const float v = x[gid];
  const float results[] = {
      simd_sum(v), simd_max(v), simd_min(v),
      simd_prefix_inclusive_sum(v), simd_prefix_exclusive_sum(v),
      simd_shuffle_down(v, ushort(1)), simd_shuffle_up(v, ushort(2)), simd_shuffle_xor(v, ushort(5)),
      simd_broadcast(v, ushort(3)), simd_broadcast_first(v),
      simd_is_first() ? 1.0f : 0.0f, simd_any(v > 2.0f) ? 1.0f : 0.0f, simd_all(v > -10.0f) ? 1.0f : 0.0f,
  };
  for (int k = 0; k < 13; ++k) {
    out[k * n + gid] = results[k];
  }
}
"""


def simd_reference(x: np.ndarray) -> np.ndarray:
    """The 13 rows of simd_collectives for full SIMD groups of 32 lanes."""
    g = x.reshape(-1, 32).astype(np.float64)
    lane = np.arange(32)

    def full(per_group: np.ndarray) -> np.ndarray:
        return np.broadcast_to(per_group[:, None], g.shape)

    inclusive = np.cumsum(g, axis=1)
    rows = [
        full(g.sum(1)), full(g.max(1)), full(g.min(1)), inclusive, inclusive - g,
        g[:, np.where(lane + 1 < 32, lane + 1, lane)], g[:, np.where(lane - 2 >= 0, lane - 2, lane)],
        g[:, lane ^ 5], full(g[:, 3]), full(g[:, 0]),
        np.broadcast_to((lane == 0).astype(np.float64), g.shape),
        full((g > 2).any(1).astype(np.float64)), full((g > -10).all(1).astype(np.float64)),
    ]
    return np.stack([r.reshape(-1) for r in rows])


def test_simd_collectives_match_numpy():
    lib = metal_harness.compile_library(SIMD_SOURCE)
    x = torch.randn(128)
    out = torch.zeros(13, 128)
    lib.simd_collectives(x, out, x.numel(), threads=128, group_size=64)
    np.testing.assert_allclose(out.numpy(), simd_reference(x.numpy()), rtol=1e-6, atol=1e-6)


def test_collectives_of_a_partial_simd_group_use_the_active_lanes_and_poison_the_rest():
    lib = metal_harness.compile_library(SIMD_SOURCE)
    x = torch.randn(40)  # one group of 40 threads: SIMD group 1 has 8 active lanes
    out = torch.zeros(13, 40)
    lib.simd_collectives(x, out, x.numel(), threads=40, group_size=40)
    tail = x[32:].double()
    torch.testing.assert_close(out[0, 32:].double(), tail.sum().expand(8), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[3, 32:].double(), tail.cumsum(0), rtol=1e-6, atol=1e-6)
    shuffled_down = out[5, 32:]
    torch.testing.assert_close(shuffled_down[:7], x[33:40], rtol=0, atol=0)
    assert shuffled_down[7].isnan(), "lane 7 read inactive lane 8 through simd_shuffle_down: expected poison"


CONVERSION_SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

template <typename T>
kernel void scale_shift(device const T* x [[buffer(0)]],
                        device T* out [[buffer(1)]],
                        constant float& scale [[buffer(2)]],
                        uint i [[thread_position_in_grid]]) {
  out[i] = static_cast<T>(float(x[i]) * scale + 1.0f);
}

// Arithmetic in the storage type: each operation rounds to T.
template <typename T>
kernel void multiply_add(device const T* a [[buffer(0)]],
                         device const T* b [[buffer(1)]],
                         device const T* c [[buffer(2)]],
                         device T* out [[buffer(3)]],
                         uint i [[thread_position_in_grid]]) {
  out[i] = a[i] * b[i] + c[i];
}

// An unsuffixed literal is a float in Metal (there is no double).
kernel void times_a_tenth(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                          uint i [[thread_position_in_grid]]) {
  out[i] = x[i] * 0.1;
}

// Vector constructors convert values: float4(int4) is not a bit cast.
kernel void vectors(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                    uint i [[thread_position_in_grid]]) {
  const float4 v = float4(x[4 * i], x[4 * i + 1], float2(x[4 * i + 2], x[4 * i + 3]));
  const int4 rounded = int4(v * 10.0f);
  const half4 h = half4(float4(rounded));
  const float4 back = float4(h) + float4(0.5f);
  for (int k = 0; k < 4; ++k) {
    out[4 * i + k] = back[k];
  }
}

#define INSTANTIATE(name, T) \
  template [[host_name(#name "_" #T)]] [[kernel]] decltype(scale_shift<T>) scale_shift<T>;
INSTANTIATE(scale_shift, float)
INSTANTIATE(scale_shift, half)
template [[host_name("scale_shift_bfloat")]] kernel void scale_shift<bfloat>(
    device const bfloat* x [[buffer(0)]], device bfloat* out [[buffer(1)]],
    constant float& scale [[buffer(2)]], uint i [[thread_position_in_grid]]);
template [[host_name("multiply_add_half")]] [[kernel]] decltype(multiply_add<half>) multiply_add<half>;
template [[host_name("multiply_add_bfloat")]] [[kernel]] decltype(multiply_add<bfloat>) multiply_add<bfloat>;
"""


@pytest.fixture(scope="module")
def conversion_lib():
    return metal_harness.compile_library(CONVERSION_SOURCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_template_instantiations_round_like_torch(conversion_lib, dtype):
    name = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}[dtype]
    x = torch.randn(4096).to(dtype)
    out = torch.empty_like(x)
    getattr(conversion_lib, f"scale_shift_{name}")(x, out, 1.0 / 3.0)
    expected = (x.float() * torch.tensor(1.0 / 3.0, dtype=torch.float32) + 1.0).to(dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out.view(bits), expected.view(bits))


def test_bfloat_conversion_rounds_to_nearest_even_like_torch(conversion_lib):
    # Exact ties between two bfloat16 values (to even: down, up, down), just below a tie, overflow, NaN.
    bits = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x7F7FFFFF, 0x7FC00001], dtype=np.uint32)
    values = torch.from_numpy(bits.view(np.float32))
    x = torch.ones(len(values), dtype=torch.bfloat16)
    out = torch.empty_like(x)
    # scale_shift computes float(x) * scale + 1: with x = 1 and scale = v - 1 the float is v exactly.
    for value in values:
        conversion_lib.scale_shift_bfloat(x[:1], out[:1], float(value) - 1.0)
        expected = (torch.tensor(float(value) - 1.0, dtype=torch.float32) + 1.0).to(torch.bfloat16)
        assert out[:1].view(torch.int16) == expected.view(torch.int16), f"{float(value)!r}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_type_arithmetic_rounds_after_each_operation(conversion_lib, dtype):
    name = {torch.float16: "half", torch.bfloat16: "bfloat"}[dtype]
    a, b, c = (torch.randn(4096).to(dtype) for _ in range(3))
    out = torch.empty_like(a)
    getattr(conversion_lib, f"multiply_add_{name}")(a, b, c, out)
    assert torch.equal(out, a * b + c)


def test_unsuffixed_literals_are_float(conversion_lib):
    x = torch.randn(100_000)
    out = torch.empty_like(x)
    conversion_lib.times_a_tenth(x, out)
    assert torch.equal(out, x * torch.tensor(0.1, dtype=torch.float32))


def test_vector_constructors_convert_values(conversion_lib):
    x = torch.randn(64) * 5
    out = torch.empty_like(x)
    conversion_lib.vectors(x, out, threads=16)
    expected = (x * 10).trunc().to(torch.int32).float().half().float() + 0.5
    assert torch.equal(out, expected)


LAUNCH_SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

// Records, for every thread, what it knows about its place in the grid.
kernel void positions(device uint* out [[buffer(0)]],
                      uint gid [[thread_position_in_grid]],
                      uint tg [[threadgroup_position_in_grid]],
                      uint tpg [[threads_per_threadgroup]],
                      uint dispatch_tpg [[dispatch_threads_per_threadgroup]],
                      uint groups [[threadgroups_per_grid]],
                      uint lane [[thread_index_in_simdgroup]],
                      uint simd [[simdgroup_index_in_threadgroup]]) {
  device uint* row = out + 7 * gid;
  row[0] = gid; row[1] = tg; row[2] = tpg; row[3] = dispatch_tpg; row[4] = groups; row[5] = lane; row[6] = simd;
}

kernel void grid_2d(device uint* out [[buffer(0)]], uint2 pos [[thread_position_in_grid]],
                    uint2 size [[threads_per_grid]]) {
  out[pos.y * size.x + pos.x] = pos.y * 1000 + pos.x;
}

kernel void arguments(device long* ints [[buffer(0)]],
                      device float* floats [[buffer(1)]],
                      constant long& big [[buffer(2)]],
                      constant float& scale [[buffer(3)]],
                      constant long* list [[buffer(4)]],
                      constant int& narrow [[buffer(5)]],
                      constant float* float_list [[buffer(6)]],
                      uint i [[thread_position_in_grid]]) {
  ints[0] = big; ints[1] = list[0]; ints[2] = list[1]; ints[3] = list[2]; ints[4] = narrow;
  floats[0] = scale; floats[1] = float_list[0]; floats[2] = float_list[1];
}

[[max_total_threads_per_threadgroup(128)]] kernel void small_groups(device float* out [[buffer(0)]],
                                                                    uint i [[thread_position_in_grid]]) {
  out[i] = 1.0f;
}

// Threads past n return before the barrier: undefined on Apple GPUs.
kernel void early_return_before_barrier(device float* out [[buffer(0)]], constant long& n [[buffer(1)]],
                                        uint gid [[thread_position_in_grid]],
                                        uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float shared[64];
  if (gid >= uint(n)) {
    return;
  }
  shared[lid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[gid] = shared[lid];
}

// Lanes past `active` return first: the collective runs over the remaining (active) lanes.
kernel void sum_of_active_lanes(device float* out [[buffer(0)]], constant long& active [[buffer(1)]],
                                uint lane [[thread_index_in_simdgroup]]) {
  if (lane >= uint(active)) {
    return;
  }
  out[lane] = simd_sum(1.0f);
}

// Half the lanes wait in a collective, the other half at a barrier.
kernel void collective_and_barrier(device float* out [[buffer(0)]], uint lane [[thread_index_in_simdgroup]]) {
  if (lane < 16) {
    out[lane] = simd_sum(1.0f);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

kernel void too_much_shared_memory(device float* out [[buffer(0)]], uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float shared[9000];
  shared[lid] = 1.0f;
  out[lid] = shared[lid];
}
"""


@pytest.fixture(scope="module")
def launch_lib():
    return metal_harness.compile_library(LAUNCH_SOURCE)


def test_partial_last_threadgroup(launch_lib):
    out = torch.zeros(1000, 7, dtype=torch.int32)
    launch_lib.positions(out, threads=1000, group_size=256)
    gid = torch.arange(1000)
    rows = out.long()
    assert torch.equal(rows[:, 0], gid)
    assert torch.equal(rows[:, 1], gid // 256)
    assert torch.equal(rows[:, 2], torch.where(gid < 768, 256, 1000 - 768)), "threads_per_threadgroup"
    assert (rows[:, 3] == 256).all(), "dispatch_threads_per_threadgroup"
    assert (rows[:, 4] == 4).all()
    assert torch.equal(rows[:, 5], gid % 256 % 32)
    assert torch.equal(rows[:, 6], gid % 256 // 32)


def test_two_dimensional_grid(launch_lib):
    out = torch.zeros(5, 37, dtype=torch.int32)
    launch_lib.grid_2d(out, threads=(37, 5), group_size=(16, 2))
    y, x = torch.meshgrid(torch.arange(5), torch.arange(37), indexing="ij")
    assert torch.equal(out.long(), y * 1000 + x)


def test_int_float_and_list_arguments_bind_like_compile_shader(launch_lib):
    ints = torch.zeros(5, dtype=torch.int64)
    floats = torch.zeros(3)
    launch_lib.arguments(ints, floats, 2**40 + 3, 1.5, [7, -8, 2**35], -5, [0.25, -2.0],
                         threads=1, arg_casts={5: "int32"})
    assert ints.tolist() == [2**40 + 3, 7, -8, 2**35, -5]
    assert floats.tolist() == [1.5, 0.25, -2.0]


def test_argument_mistakes_raise(launch_lib):
    ints, floats = torch.zeros(5, dtype=torch.int64), torch.zeros(3)
    with pytest.raises(TypeError, match="takes 7 buffer arguments"):
        launch_lib.arguments(ints, floats, 1, threads=1)
    with pytest.raises(TypeError, match="reads 32-bit integer elements"):  # an int64 into `constant int&`
        launch_lib.arguments(ints, floats, 1, 1.5, [1, 2, 3], -5, [0.25, 2.0], threads=1)
    with pytest.raises(TypeError, match="reads float elements but receives a torch.float16 tensor"):
        launch_lib.arguments(ints, floats.half(), 1, 1.5, [1, 2, 3], -5, [0.25, 2.0], threads=1,
                             arg_casts={5: "int32"})
    with pytest.raises(ValueError, match="argument 1 .*an empty tensor has no buffer"):  # nil on MPS
        launch_lib.arguments(ints, floats[:0], 1, 1.5, [1, 2, 3], -5, [0.25, 2.0], threads=1,
                             arg_casts={5: "int32"})


def test_too_large_group_size_raises(launch_lib):
    out = torch.zeros(4096)
    assert launch_lib.small_groups.max_threads_per_threadgroup == 128
    assert launch_lib.positions.max_threads_per_threadgroup == 1024
    with pytest.raises(ValueError, match="exceeds max_threads_per_threadgroup = 128"):
        launch_lib.small_groups(out, group_size=256)
    with pytest.raises(ValueError, match="exceeds max_threads_per_threadgroup = 1024"):
        launch_lib.positions(torch.zeros(4096, 7, dtype=torch.int32), threads=(64, 64), group_size=(64, 32))
    launch_lib.small_groups(out)  # the default group size respects the kernel's limit
    assert (out == 1).all()


def test_divergent_barrier_raises_instead_of_hanging(launch_lib):
    with pytest.raises(RuntimeError, match="divergent threadgroup_barrier"):
        launch_lib.early_return_before_barrier(torch.zeros(64), 40, threads=64, group_size=64)


def test_collective_after_early_return_uses_the_remaining_lanes(launch_lib):
    out = torch.zeros(32)
    launch_lib.sum_of_active_lanes(out, 20, threads=32, group_size=32)
    assert out.tolist() == [20.0] * 20 + [0.0] * 12


def test_divergent_collective_raises_instead_of_hanging(launch_lib):
    with pytest.raises(RuntimeError, match="divergent control flow"):
        launch_lib.collective_and_barrier(torch.zeros(32), threads=32, group_size=32)


def test_threadgroup_memory_beyond_32_kib_raises(launch_lib):
    with pytest.raises(RuntimeError, match="threadgroup memory exceeds"):
        launch_lib.too_much_shared_memory(torch.zeros(32), threads=32, group_size=32)


@pytest.mark.parametrize("snippet, message", [
    ("// caf\u00e9\n", "non-ASCII"),
    ("inline float f(float v) { return std::max(v, 0.0f); }\n", "std::"),
    ("#include <stdio.h>\n", "#include"),
    ("inline bfloat f(float v) { bfloat b = v * 2.0f; return b; }\n", "bfloat"),
    ("inline float f(double v) { return float(v); }\n", "double"),
])
def test_rejects_what_metal_rejects(snippet, message):
    source = "#include <metal_stdlib>\nusing namespace metal;\n" + snippet + (
        "kernel void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = 0.0f; }\n")
    with pytest.raises(SyntaxError, match=message):
        metal_harness.compile_library(source)


def test_explicit_bfloat_conversion_is_accepted():
    source = ("#include <metal_stdlib>\nusing namespace metal;\n"
              "kernel void k(device bfloat* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
              "  out[i] = static_cast<bfloat>(float(i) * 0.5f);\n}\n")
    out = torch.empty(8, dtype=torch.bfloat16)
    metal_harness.compile_library(source).k(out)
    assert torch.equal(out, torch.arange(8, dtype=torch.float32).mul(0.5).bfloat16())


OUT_OF_BOUNDS_SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

// Reads x[i + offset]: past the end of x for the last threads when offset > 0.
kernel void shifted_copy(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                         constant long& offset [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  out[i] = x[long(i) + offset];
}
"""


def test_out_of_bounds_read_raises_and_names_the_argument():
    lib = metal_harness.compile_library(OUT_OF_BOUNDS_SOURCE)
    x, out = torch.randn(4096), torch.zeros(4096)
    lib.shifted_copy(x, out, 0)
    assert torch.equal(out, x)
    with pytest.raises(RuntimeError, match=r"past the end of argument 0 \(device const float\* x\)"):
        lib.shifted_copy(x, out, 2048)
    with pytest.raises(RuntimeError, match=r"before the start of argument 0"):
        lib.shifted_copy(x, out, -1024)


def test_writing_one_element_past_the_end_raises():
    lib = metal_harness.compile_library(OUT_OF_BOUNDS_SOURCE)
    x = torch.randn(4096)
    out = torch.zeros(4095, dtype=torch.float32)  # 16380 bytes: the copy ends 4 bytes before its guard zone
    with pytest.raises(RuntimeError, match=r"a write 0 bytes past the end of argument 1 \(device float\* out\)"):
        lib.shifted_copy(x, out, 0, threads=4096)


def test_reading_past_a_list_argument_raises(launch_lib):
    ints, floats = torch.zeros(5, dtype=torch.int64), torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"past the end of argument 4 \(constant long\* list\)"):
        launch_lib.arguments(ints, floats, 1, 1.5, [7], -5, [0.25, -2.0], threads=1, arg_casts={5: "int32"})


def test_outputs_aliasing_inputs_share_memory():
    lib = metal_harness.compile_library(OUT_OF_BOUNDS_SOURCE)
    buffer = torch.arange(8, dtype=torch.float32)
    lib.shifted_copy(buffer[4:], buffer[:4], 0)  # two views of one storage
    assert buffer.tolist() == [4, 5, 6, 7, 4, 5, 6, 7]


def test_loaded_kernels_share_one_executor():
    """Each kernel is its own library; one fiber-stack pool serves them all (not 2000 mappings each)."""
    source = "#include <metal_stdlib>\nusing namespace metal;\n" + "".join(
        f"kernel void fill_{k}(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) "
        f"{{ out[i] = {k}.0f; }}\n" for k in range(6))
    lib = metal_harness.compile_library(source)
    out = torch.zeros(1024)
    lib.fill_0(out, group_size=1024)
    mappings_before = len(Path("/proc/self/maps").read_text().splitlines())
    for k in range(1, 6):
        getattr(lib, f"fill_{k}")(out, group_size=1024)
        assert (out == k).all()
    growth = len(Path("/proc/self/maps").read_text().splitlines()) - mappings_before
    assert growth < 5 * 100, f"{growth} new memory mappings for 5 kernels"

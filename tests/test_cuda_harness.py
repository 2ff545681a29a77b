"""Self-tests of cuda_harness, which runs CUDA C++ kernels on the CPU (fibers per GPU thread).

Each built-in is checked against an independent Python model of CUDA's semantics, the error
cases must raise (a harness that accepts a wrong kernel is worthless), and the two prototype
kernels of benchmarks/prototypes (`fwd_bdt`, `bwd_bdt`) are compared with a float64 reference.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("cuda_harness") is None:  # test-only package at the repository root
    sys.path.insert(0, str(ROOT))

import cuda_harness  # noqa: E402
from conftest import load_prototype  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_harness.unavailable_reason() is not None,
                                reason=str(cuda_harness.unavailable_reason()))

FULL = "0xFFFFFFFFu"

BUILTINS_SOURCE = r"""
// out[k][t] for thread t of each block: the four shuffles of x[t] (float) and of a 64-bit value.
extern "C" __global__ void shuffles(const float* __restrict__ x, float* __restrict__ out,
                                    long long* __restrict__ out64, int delta, int lane_mask, int src, int width) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x, n = gridDim.x * blockDim.x;
    const float v = x[t];
    const long long v64 = (long long)t * 8589934592LL + t;  // t * 2^33 + t: both halves matter
    out[0 * n + t] = __shfl_up_sync(FULL, v, delta, width);
    out[1 * n + t] = __shfl_down_sync(FULL, v, delta, width);
    out[2 * n + t] = __shfl_xor_sync(FULL, v, lane_mask, width);
    out[3 * n + t] = __shfl_sync(FULL, v, src, width);
    out64[0 * n + t] = __shfl_up_sync(FULL, v64, delta, width);
    out64[1 * n + t] = __shfl_down_sync(FULL, v64, delta, width);
    out64[2 * n + t] = __shfl_xor_sync(FULL, v64, lane_mask, width);
    out64[3 * n + t] = __shfl_sync(FULL, v64, src, width);
}

// Votes: ballot of (x > 0), any, all, after a __syncwarp.
extern "C" __global__ void votes(const float* __restrict__ x, unsigned int* __restrict__ out) {
    const int t = threadIdx.x, n = blockDim.x;
    __syncwarp();
    out[t] = __ballot_sync(FULL, x[t] > 0.f);
    out[n + t] = __any_sync(FULL, x[t] > 0.f);
    out[2 * n + t] = __all_sync(FULL, x[t] > 0.f);
}

// One sum per block of a 3-D block (warps are 32 consecutive linear ids), by a tree reduction in a
// 2-D shared array, then a warp reduction through __shfl_xor_sync.
extern "C" __global__ void __launch_bounds__(256) block_sums(const float* __restrict__ x, float* __restrict__ out) {
    __shared__ float partial[2][128];
    const int tid = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    partial[tid / 128][tid % 128] = x[block * 256 + tid];
    __syncthreads();
    for (int s = 128; s >= 32; s /= 2) {
        if (tid < s) {
            (&partial[0][0])[tid] += (&partial[0][0])[tid + s];
        }
        __syncthreads();
    }
    if (tid < 32) {
        float v = partial[0][tid];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL, v, off);
        if (tid == 0) out[block] = v;
    }
}

// block_sums without the barrier after filling shared memory: threads read slots not yet written.
extern "C" __global__ void racy_sums(const float* __restrict__ x, float* __restrict__ out) {
    __shared__ float partial[64];
    const int tid = threadIdx.x;
    partial[tid] = x[blockIdx.x * 64 + tid];
    if (tid < 32) partial[tid] += partial[tid + 32];
    __syncthreads();
    if (tid == 0) {
        float s = 0.f;
        for (int i = 0; i < 32; ++i) s += partial[i];
        out[blockIdx.x] = s;
    }
}

// Every built-in position variable of every thread of a 3-D grid of 3-D blocks.
extern "C" __global__ void positions(unsigned int* __restrict__ out) {
    const unsigned int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned int g = block * blockDim.x * blockDim.y * blockDim.z + tid;
    const uint3 t = threadIdx, b = blockIdx;
    const dim3 bd = blockDim, gd = gridDim;
    unsigned int* o = out + 12 * g;
    o[0] = t.x; o[1] = t.y; o[2] = t.z; o[3] = b.x; o[4] = b.y; o[5] = b.z;
    o[6] = bd.x; o[7] = bd.y; o[8] = bd.z; o[9] = gd.x; o[10] = gd.y; o[11] = gd.z + 0 * warpSize;
}

// Vector loads and stores, make_*, bit casts and the math built-ins.
extern "C" __global__ void vectors(const uint4* __restrict__ u4, const float4* __restrict__ f4,
                                   const uint2* __restrict__ u2, const float2* __restrict__ f2,
                                   uint4* __restrict__ out_u4, float4* __restrict__ out_f4,
                                   float* __restrict__ out_f, int* __restrict__ out_i) {
    const int t = threadIdx.x;
    const uint4 a = u4[t];
    out_u4[t] = make_uint4(a.w, a.z ^ 0xFFFFu, a.y >> 16, a.x + 1u);
    const float4 b = f4[t];
    const uint2 c = u2[t];
    const float2 d = f2[t];
    out_f4[t] = make_float4(b.x + d.x, b.y * d.y, __uint_as_float(c.x), __int_as_float((int)c.y));
    float* f = out_f + 8 * t;
    f[0] = fmaf(b.x, b.y, b.z);
    f[1] = __expf(d.x);
    f[2] = expf(d.y);
    f[3] = __fdividef(b.z, 3.f);
    f[4] = rsqrtf(fabsf(b.w) + 1.f);
    f[5] = (float)__float_as_uint(b.x);  // exact below 2^24: only the low bits matter here
    f[6] = __uint_as_float(__float_as_uint(b.y));
    f[7] = (float)min((int)c.x, 7) + (float)max(-3, (int)c.y) + (float)min(2u, c.x);
    out_i[t] = __float_as_int(b.w);
}

// Each scalar parameter type, written back as long long / double.
extern "C" __global__ void scalars(long long* __restrict__ out_i, double* __restrict__ out_f, int a,
                                   unsigned int b, long long c, unsigned long long d, short e, bool f,
                                   float g, double h) {
    out_i[0] = a; out_i[1] = b; out_i[2] = c; out_i[3] = (long long)d; out_i[4] = e; out_i[5] = f;
    out_f[0] = g; out_f[1] = h;
}

// Dynamic shared memory (`extern __shared__`, sized by shared_mem): reverses each block.
// Also a 16-byte aligned static array read as float4.
extern "C" __global__ void reverse_blocks(const float* __restrict__ x, float* __restrict__ out) {
    extern __shared__ float buffer[];
    __shared__ float pad[1];  // 4 bytes: without __align__, the next array would be only 4-byte aligned
    __shared__ __align__(16) float aligned[33];
    const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
    buffer[t] = x[base + t];
    pad[0] = 0.f;
    aligned[t] = 0.f;
    __syncthreads();
    out[base + t] = buffer[n - 1 - t] + reinterpret_cast<const float4*>(aligned)[t / 4].x;
    if ((unsigned long long)aligned % 16 != 0) out[base + t] = -1.f;
}

// 47 KiB of static shared memory: dynamic shared memory above 1 KiB exceeds the 48 KiB limit.
extern "C" __global__ void too_much_shared(float* __restrict__ out) {
    __shared__ float big[47 * 256];
    extern __shared__ float more[];
    big[threadIdx.x] = 1.f;
    more[threadIdx.x] = 2.f;
    out[threadIdx.x] = big[threadIdx.x] + more[threadIdx.x];
}

// Reads x[n] and writes out[n] for the thread with index n (one past the end).
extern "C" __global__ void read_past_end(const float* __restrict__ x, float* __restrict__ out, int n) {
    const int t = threadIdx.x;
    out[t] = x[t + (t == n - 1 ? 1024 : 0)];
}
extern "C" __global__ void write_past_end(const float* __restrict__ x, float* __restrict__ out, int n) {
    const int t = threadIdx.x;
    out[t + (t == n - 1 ? 1 : 0)] = x[t];
}

// Thread t writes s[t + shift] of a shared array of 32 floats.
extern "C" __global__ void shared_out_of_bounds(const float* __restrict__ x, float* __restrict__ out, int shift) {
    __shared__ float s[32];
    const int t = threadIdx.x;
    if (t + shift >= -4 && t + shift < 48) s[t + shift] = x[t];
    __syncthreads();
    out[t] = s[t];
}

// Threads past n return before a full-mask shuffle or a __syncthreads.
extern "C" __global__ void early_return_shuffle(const float* __restrict__ x, float* __restrict__ out, int n) {
    const int t = threadIdx.x;
    if (t >= n) return;
    out[t] = __shfl_down_sync(FULL, x[t], 1);
}
extern "C" __global__ void early_return_barrier(const float* __restrict__ x, float* __restrict__ out, int n) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    if (t >= n) return;
    s[t] = x[t];
    __syncthreads();
    out[t] = s[n - 1 - t];
}
// Half of a warp shuffles up while the other half shuffles down.
extern "C" __global__ void split_shuffle(const float* __restrict__ x, float* __restrict__ out) {
    const int t = threadIdx.x;
    out[t] = t < 16 ? __shfl_up_sync(FULL, x[t], 1) : __shfl_down_sync(FULL, x[t], 1);
}
// A shuffle whose mask leaves out a lane that takes part.
extern "C" __global__ void partial_mask(const float* __restrict__ x, float* __restrict__ out) {
    const int t = threadIdx.x;
    out[t] = __shfl_down_sync(0x7FFFFFFFu, x[t], 1);
}
""".replace("FULL", FULL)


@pytest.fixture(scope="module")
def lib():
    return cuda_harness.compile_source(BUILTINS_SOURCE)


# ---------------------------------------------------------------- a model of CUDA's shuffles
def shuffle_sources(kind: str, arg: int, width: int) -> list[int]:
    """For each lane of a warp, the lane whose value __shfl_<kind>_sync returns (CUDA's rules)."""
    sources = []
    for lane in range(32):
        base, j = lane & ~(width - 1), lane & (width - 1)
        if kind == "up":
            sources.append(lane - arg if j >= arg else lane)
        elif kind == "down":
            sources.append(lane + arg if j + arg < width else lane)
        elif kind == "xor":
            target = lane ^ arg
            sources.append(target if target < base + width else lane)
        else:
            sources.append(base + (arg & (width - 1)))
    return sources


@pytest.mark.parametrize("delta,lane_mask,src,width", [
    (1, 1, 0, 32), (3, 16, 31, 32), (31, 31, -1, 32), (0, 0, 37, 32), (2, 5, 6, 8), (1, 8, 3, 4), (1, 1, 0, 1)])
def test_shuffles_follow_cuda_semantics(lib, delta, lane_mask, src, width):
    blocks, threads = 2, 64
    n = blocks * threads
    x = torch.randn(n)
    out = torch.full((4, n), float("nan"))
    out64 = torch.zeros(4, n, dtype=torch.int64)
    lib.shuffles(grid=(blocks, 1, 1), block=(threads, 1, 1), args=[x, out, out64, delta, lane_mask, src, width])
    for k, (kind, arg) in enumerate((("up", delta), ("down", delta), ("xor", lane_mask), ("idx", src))):
        sources = torch.tensor([(t - t % 32) + shuffle_sources(kind, arg, width)[t % 32] for t in range(n)])
        assert torch.equal(out[k], x[sources]), kind
        assert torch.equal(out64[k], sources * 2**33 + sources), kind


def test_votes(lib):
    x = torch.randn(64)
    x[32:] = x[32:].abs() + 1  # warp 1: all positive
    out = torch.zeros(3, 64, dtype=torch.int32)
    lib.votes(grid=(1, 1, 1), block=(64, 1, 1), args=[x, out.view(torch.int32)])
    bits = (x > 0).view(2, 32).to(torch.int64)
    ballots = (bits << torch.arange(32)).sum(1)
    got = out.to(torch.int64) & 0xFFFFFFFF
    assert got[0].tolist() == [ballots[0].item()] * 32 + [ballots[1].item()] * 32
    assert got[1].tolist() == [int(bits[0].any())] * 32 + [1] * 32
    assert got[2].tolist() == [int(bits[0].all())] * 32 + [1] * 32


def test_syncthreads_and_shared_memory_in_3d_blocks_and_grid(lib):
    grid = (2, 3, 2)
    x = torch.randn(12 * 256)
    out = torch.full((12,), float("nan"))
    lib.block_sums(grid=grid, block=(8, 4, 8), args=[x, out])
    torch.testing.assert_close(out.double(), x.double().view(12, 256).sum(1), rtol=1e-5, atol=1e-5)


def test_missing_syncthreads_is_reported(lib):
    with pytest.raises(RuntimeError, match=r"depends on the order .* a __syncthreads is missing"):
        lib.racy_sums(grid=(2, 1, 1), block=(64, 1, 1), args=[torch.randn(128), torch.zeros(2)])


def test_positions_in_a_3d_grid(lib):
    grid, block = (3, 2, 2), (4, 3, 2)
    n = 12 * 24
    out = torch.zeros(n, 12, dtype=torch.int32)
    lib.positions(grid=grid, block=block, args=[out])
    want = []
    for bz in range(2):
        for by in range(2):
            for bx in range(3):
                for tz in range(2):
                    for ty in range(3):
                        for tx in range(4):
                            want.append([tx, ty, tz, bx, by, bz, *block, *grid])
    assert out.tolist() == want


def test_vector_types_bit_casts_and_math(lib):
    n = 5
    g = torch.Generator().manual_seed(1)
    u4 = torch.randint(0, 2**31, (n, 4), generator=g, dtype=torch.int64).to(torch.int32)
    f4 = torch.randn(n, 4, generator=g)
    u2 = torch.randint(0, 2**20, (n, 2), generator=g, dtype=torch.int64).to(torch.int32)
    f2 = torch.randn(n, 2, generator=g)
    out_u4 = torch.zeros(n, 4, dtype=torch.int32)
    out_f4 = torch.zeros(n, 4)
    out_f = torch.zeros(n, 8)
    out_i = torch.zeros(n, dtype=torch.int32)
    lib.vectors(grid=(1, 1, 1), block=(n, 1, 1), args=[u4, f4, u2, f2, out_u4, out_f4, out_f, out_i])
    u = u4.to(torch.int64) & 0xFFFFFFFF
    want_u4 = torch.stack([u[:, 3], u[:, 2] ^ 0xFFFF, u[:, 1] >> 16, (u[:, 0] + 1) & 0xFFFFFFFF], 1)
    assert torch.equal(out_u4.to(torch.int64) & 0xFFFFFFFF, want_u4)
    assert torch.equal(out_f4[:, 0], f4[:, 0] + f2[:, 0])
    assert torch.equal(out_f4[:, 1], f4[:, 1] * f2[:, 1])
    assert torch.equal(out_f4[:, 2:].view(torch.int32), u2)
    f = out_f.double()
    torch.testing.assert_close(f[:, 0], f4[:, 0].double() * f4[:, 1].double() + f4[:, 2].double())
    torch.testing.assert_close(f[:, 1], f2[:, 0].double().exp(), rtol=1e-6, atol=0)
    torch.testing.assert_close(f[:, 2], f2[:, 1].double().exp(), rtol=1e-6, atol=0)
    torch.testing.assert_close(f[:, 3], f4[:, 2].double() / 3, rtol=1e-6, atol=0)
    torch.testing.assert_close(f[:, 4], (f4[:, 3].double().abs() + 1).rsqrt(), rtol=1e-6, atol=0)
    assert torch.equal(out_f[:, 5], (f4[:, 0].view(torch.int32).to(torch.int64) & 0xFFFFFFFF).to(torch.float32))
    assert torch.equal(out_f[:, 6], f4[:, 1])
    c = u2.to(torch.int64)
    assert torch.equal(f[:, 7], (c[:, 0].clamp(max=7) + c[:, 1].clamp(min=-3) + c[:, 0].clamp(max=2)).double())
    assert torch.equal(out_i, f4[:, 3].view(torch.int32))


def test_scalar_arguments_take_the_declared_types(lib):
    out_i = torch.zeros(6, dtype=torch.int64)
    out_f = torch.zeros(2, dtype=torch.float64)
    args = [out_i, out_f, -2**31, 2**32 - 1, -2**63, 2**64 - 1, -32768, True, 0.1, 0.1]
    lib.scalars(grid=(1, 1, 1), block=(1, 1, 1), args=args)
    assert out_i.tolist() == [-2**31, 2**32 - 1, -2**63, -1, -32768, 1]
    assert out_f[0].item() == torch.tensor(0.1, dtype=torch.float32).item() and out_f[1].item() == 0.1


@pytest.mark.parametrize("index,value,error,message", [
    (2, 2**31, OverflowError, r"argument 2 \(int a\): 2147483648 does not fit .* signed 32-bit"),
    (3, -1, OverflowError, r"argument 3 \(unsigned int b\): -1 does not fit .* unsigned 32-bit"),
    (2, 1.0, TypeError, r"argument 2 \(int a\): expected a Python int"),
    (8, 1, TypeError, r"argument 8 \(float g\): expected a Python float"),
    (0, 5, TypeError, r"argument 0 \(long long\* __restrict__ out_i\): expected a tensor"),
    (2, torch.zeros(1), TypeError, r"argument 2 \(int a\): a tensor was given"),
])
def test_bad_scalar_arguments_are_refused(lib, index, value, error, message):
    args = [torch.zeros(6, dtype=torch.int64), torch.zeros(2, dtype=torch.float64), 0, 0, 0, 0, 0, False, 0.0, 0.0]
    args[index] = value
    with pytest.raises(error, match=message):
        lib.scalars(grid=(1, 1, 1), block=(1, 1, 1), args=args)


def test_launch_errors(lib):
    out = torch.zeros(4)
    with pytest.raises(TypeError, match=r"takes 2 arguments .* 1 were given"):
        lib.racy_sums(grid=(1, 1, 1), block=(64, 1, 1), args=[out])
    with pytest.raises(ValueError, match=r"block \(512, 1, 1\) has 512 threads, more than 256"):
        lib.block_sums(grid=(1, 1, 1), block=(512, 1, 1), args=[torch.zeros(512), out])
    with pytest.raises(ValueError, match=r"grid must be a tuple of 3 ints"):
        lib.block_sums(grid=(1, 1), block=(256, 1, 1), args=[torch.zeros(256), out])
    with pytest.raises(ValueError, match=r"block \(1, 1, 65\) is outside CUDA's limits"):
        lib.block_sums(grid=(1, 1, 1), block=(1, 1, 65), args=[torch.zeros(256), out])
    with pytest.raises(ValueError, match=r"misaligned"):  # uint4* needs 16-byte alignment
        buf = torch.zeros(40, dtype=torch.int32)
        lib.vectors(grid=(1, 1, 1), block=(1, 1, 1), args=[buf[1:], buf, buf, buf, buf, buf, buf, buf])
    with pytest.raises(ValueError, match=r"empty tensor"):
        lib.racy_sums(grid=(1, 1, 1), block=(64, 1, 1), args=[torch.zeros(0), out])


def test_dynamic_shared_memory(lib):
    x = torch.randn(96)
    out = torch.zeros(96)
    lib.reverse_blocks(grid=(3, 1, 1), block=(32, 1, 1), args=[x, out], shared_mem=32 * 4)
    assert torch.equal(out, x.view(3, 32).flip(1).reshape(-1))
    with pytest.raises(RuntimeError, match=r"shared memory exceeds the 49152 bytes a block may use"):
        lib.too_much_shared(grid=(1, 1, 1), block=(32, 1, 1), args=[out], shared_mem=2048)
    lib.too_much_shared(grid=(1, 1, 1), block=(32, 1, 1), args=[out], shared_mem=1024)  # 1 KiB fits
    with pytest.raises(RuntimeError, match=r"Kernel requires 65536 bytes of shared memory"):
        lib.reverse_blocks(grid=(1, 1, 1), block=(32, 1, 1), args=[x, out], shared_mem=65536)
    lib.too_much_shared.set_shared_memory_config(65536)
    lib.too_much_shared(grid=(1, 1, 1), block=(32, 1, 1), args=[out], shared_mem=65536)


def test_out_of_bounds_read_is_caught(lib):
    with pytest.raises(RuntimeError, match=r"bytes past the end of argument 0 \(const float\* __restrict__ x\)"):
        lib.read_past_end(grid=(1, 1, 1), block=(8, 1, 1), args=[torch.zeros(8), torch.zeros(8), 8])


def test_out_of_bounds_write_is_caught(lib):
    x, out = torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"bytes past the end of argument 1 \(float\* __restrict__ out\)"):
        lib.write_past_end(grid=(1, 1, 1), block=(8, 1, 1), args=[x, out, 8])
    lib.write_past_end(grid=(1, 1, 1), block=(8, 1, 1), args=[x, torch.zeros(9), 8])  # in bounds: no error


def test_shared_memory_out_of_bounds_is_caught(lib):
    x, out = torch.randn(32), torch.zeros(32)
    lib.shared_out_of_bounds(grid=(1, 1, 1), block=(32, 1, 1), args=[x, out, 0])
    assert torch.equal(out, x)
    with pytest.raises(RuntimeError, match=r"a write 0 bytes past the end of shared memory 's' \(128 bytes\) in block "
                                           r"\(0,0,0\)"):
        lib.shared_out_of_bounds(grid=(1, 1, 1), block=(32, 1, 1), args=[x, out, 1])
    with pytest.raises(RuntimeError, match=r"a write 4 bytes before the start of shared memory 's'"):
        lib.shared_out_of_bounds(grid=(1, 1, 1), block=(32, 1, 1), args=[x, out, -1])


def test_shuffle_naming_a_returned_lane_is_reported(lib):
    x, out = torch.randn(32), torch.zeros(32)
    with pytest.raises(RuntimeError, match=r"__shfl_down_sync in the warp of thread .*: the mask 0xffffffff names "
                                           r"lane 20, which has returned"):
        lib.early_return_shuffle(grid=(1, 1, 1), block=(32, 1, 1), args=[x, out, 20])
    lib.early_return_shuffle(grid=(1, 1, 1), block=(32, 1, 1), args=[x, out, 32])
    assert torch.equal(out, torch.cat([x[1:], x[31:]]))


def test_divergent_shuffles_are_reported(lib):
    x, out = torch.randn(32), torch.zeros(32)
    with pytest.raises(RuntimeError, match=r"divergent warp-level calls: .* calls __shfl_\w+_sync while .* calls "
                                           r"__shfl_\w+_sync"):
        lib.split_shuffle(grid=(1, 1, 1), block=(32, 1, 1), args=[x, out])
    with pytest.raises(RuntimeError, match=r"lane 31 takes part but the mask 0x7fffffff does not name it"):
        lib.partial_mask(grid=(1, 1, 1), block=(32, 1, 1), args=[x, out])


def test_divergent_syncthreads_is_reported(lib):
    x, out = torch.randn(64), torch.zeros(64)
    with pytest.raises(RuntimeError, match=r"divergent __syncthreads: thread \(\d+,0,0\) of block \(0,0,0\) returned"):
        lib.early_return_barrier(grid=(1, 1, 1), block=(64, 1, 1), args=[x, out, 40])


def test_compile_error_names_the_line():
    source = "extern \"C\" __global__ void broken(float* out) {\n    out[threadIdx.x] = undeclared_value;\n}\n"
    with pytest.raises(cuda_harness.CudaSourceError) as info:
        cuda_harness.compile_source(source, "broken.cu")
    message = str(info.value)
    assert re.search(r"broken\.cu:2:\d+: error: use of undeclared identifier 'undeclared_value'", message), message
    assert "out[threadIdx.x] = undeclared_value;" in message


def test_kernels_in_an_extern_c_block():
    source = ('extern "C" {\n__global__ void twice(float* out) {\n  __shared__ float s[4];\n'
              '  s[threadIdx.x] = 2.f * out[threadIdx.x];\n  __syncthreads();\n'
              '  out[threadIdx.x] = s[threadIdx.x];\n}\n}\n')
    out = torch.arange(4.0)
    cuda_harness.compile_source(source).twice(grid=(1, 1, 1), block=(4, 1, 1), args=[out])
    assert out.tolist() == [0.0, 2.0, 4.0, 6.0]
    with pytest.raises(cuda_harness.CudaSourceError, match=r"kernels\.cu:2:1: error: .*__shared__ variables declared "
                                                           r"inside a kernel or device function only"):
        cuda_harness.compile_source('extern "C" {\n__shared__ float s[4];\n'
                                    '__global__ void k(float* o) { o[0] = s[0]; }\n}\n')


def test_source_without_kernels_is_refused():
    with pytest.raises(cuda_harness.CudaSourceError, match="no `__global__` kernel"):
        cuda_harness.compile_source("__device__ float f(float x) { return x; }\n")


# ---------------------------------------------------------------- the prototype kernels
def _prototypes():
    return load_prototype("cuda_fwd"), load_prototype("cuda_bwd")


def _inputs(B: int, D: int, T: int, W: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    bf16 = torch.bfloat16
    w = (torch.randn(D, W, generator=g) * W ** -0.5).to(bf16)
    bias = (torch.randn(D, generator=g) * 0.5).to(bf16)
    x = torch.randn(B, D, T, generator=g).to(bf16)
    dout = torch.randn(B, D, T, generator=g).to(bf16)
    return x, w, bias, dout


def _assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within 2 bf16 units in the last place of the float64 reference (the kernel computes in float32)."""
    ulp = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(2.0 ** -10))) - 7)
    excess = (got.double() - want).abs() - 2 * ulp
    assert excess.max() <= 0, f"worst element {excess.argmax().item()}: {got.flatten()[excess.argmax()]} vs " \
                               f"{want.flatten()[excess.argmax()]}"


@pytest.mark.parametrize("B,D,T", [(2, 3, 8 * 150), (1, 1, 8)])
def test_prototype_fwd_bdt(B, D, T):
    cuda_fwd, cuda_bwd = _prototypes()
    W = 4
    lib = cuda_harness.compile_source(cuda_fwd.source("bdt", W))
    x, w, bias, _ = _inputs(B, D, T, W, seed=T)
    out = torch.full_like(x, float("nan"))
    lib.fwd_bdt(grid=((T // 8 + 127) // 128, D, B), block=(128, 1, 1), args=[x, w, bias, out, T, D])
    ref = cuda_bwd.reference(x, w, bias, None, False, torch.ones_like(x))[0]
    _assert_bf16_close(out, ref)


@pytest.mark.parametrize("B,D,T", [(2, 3, 8 * 150), (1, 2, 16)])
def test_prototype_bwd_bdt(B, D, T):
    cuda_fwd, cuda_bwd = _prototypes()
    W = 4
    lib = cuda_harness.compile_source(cuda_bwd.source("bdt", W))
    x, w, bias, dout = _inputs(B, D, T, W, seed=T + 1)
    dx = torch.full_like(x, float("nan"))
    part = torch.full((B, D, W + 1), float("nan"))
    lib.bwd_bdt(grid=(D, B, 1), block=(128, 1, 1), args=[x, w, bias, dout, dx, part, T, D])
    _, want_dx, want_dw, want_db = cuda_bwd.reference(x, w, bias, None, False, dout)
    _assert_bf16_close(dx, want_dx)
    total = part.double().sum(0)
    torch.testing.assert_close(total[:, :W], want_dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total[:, W], want_db, rtol=1e-5, atol=1e-5)


def test_compile_kernel_refuses_what_torchs_launcher_passes_wrongly():
    lib = cuda_harness.compile_source(BUILTINS_SOURCE)
    scalars = cuda_harness.compile_kernel(BUILTINS_SOURCE, "scalars")
    args = [torch.zeros(6, dtype=torch.int64), torch.zeros(2, dtype=torch.float64), 0, 0, 0, 0, 0, False, 0.0, 0.0]
    lib.scalars(grid=(1, 1, 1), block=(1, 1, 1), args=args)  # the library converts to each declared type
    with pytest.raises(TypeError, match=r"argument 4 \(long long c\): torch.cuda._compile_kernel passes a Python int "
                                        r"as a 4-byte C int"):
        scalars(grid=(1, 1, 1), block=(1, 1, 1), args=args)
    shuffles = cuda_harness.compile_kernel(BUILTINS_SOURCE, "shuffles")  # int parameters only: accepted
    shuffles(grid=(1, 1, 1), block=(32, 1, 1), args=[torch.zeros(32), torch.zeros(4, 32),
                                                      torch.zeros(4, 32, dtype=torch.int64), 1, 1, 0, 32])
    with pytest.raises(TypeError, match=r"argument 2 \(T factor\): .* passes a Python float as a C double"):
        cuda_harness.compile_kernel(TEMPLATE_SOURCE, "scale<1, float>")(
            grid=(1, 1, 1), block=(1, 1, 1), args=[torch.zeros(1), torch.zeros(1), 1.0])


def test_compile_kernel_mirrors_torch():
    cuda_fwd, _ = _prototypes()
    kernel = cuda_harness.compile_kernel(cuda_fwd.source("bdt", 4), "fwd_bdt", nvcc_options=["--use_fast_math"])
    assert kernel.name == "fwd_bdt" and kernel.max_threads_per_block == 128
    with pytest.raises(cuda_harness.CudaSourceError, match=r"no kernel named 'fwd' .*\['fwd_bdt'\]"):
        cuda_harness.compile_kernel(cuda_fwd.source("bdt", 4), "fwd")


TEMPLATE_SOURCE = r"""
template <int N, typename T>
__global__ void __launch_bounds__(64) scale(const T* __restrict__ x, T* __restrict__ out, T factor) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = x[i] * factor + (T)N;
}
template <typename T>
__global__ void broken(T* out) { out[threadIdx.x] = T::missing; }  // an error only once instantiated
"""


def test_template_kernels_are_instantiated_by_name():
    lib = cuda_harness.compile_source(TEMPLATE_SOURCE)
    x = torch.randn(128, dtype=torch.float64)
    out = torch.zeros_like(x)
    lib.get_function("scale<3, double>")(grid=(2, 1, 1), block=(64, 1, 1), args=[x, out, 0.5])
    assert torch.equal(out, x * 0.5 + 3)
    kernel = cuda_harness.compile_kernel(TEMPLATE_SOURCE, "scale<2, double>")
    assert kernel.max_threads_per_block == 64
    kernel(grid=(2, 1, 1), block=(64, 1, 1), args=[x, out, 2.0])
    assert torch.equal(out, x * 2 + 2)
    with pytest.raises(AttributeError, match=r"kernel 'scale' is a template: .*get_function\('scale<...>'\)"):
        lib.scale
    with pytest.raises(cuda_harness.CudaSourceError, match=r"kernels\.cu:8:\d+: error"):
        lib.get_function("broken<float>")(grid=(1, 1, 1), block=(1, 1, 1), args=[out.float()])


@pytest.mark.parametrize("B,D,T", [(2, 24, 100), (1, 8, 3)])
def test_prototype_btd_kernels_with_mask_and_residual(B, D, T):
    """The channel-last prototypes (fwd_btd, bwd_btd) with an HF-style left-padding mask and the residual."""
    cuda_fwd, cuda_bwd = _prototypes()
    W, L = 4, 128
    x, w, bias, dout = _inputs(B, D, T, W, seed=T + 2)
    mask = torch.ones(B, T)
    mask[0, : T // 8 + 1] = 0
    x[0, :, 0] = float("nan")  # masked out: must not reach any output but its own (residual)
    xl, dl = x.transpose(1, 2).contiguous(), dout.transpose(1, 2).contiguous()
    fwd = cuda_harness.compile_source(cuda_fwd.source("btd", W, 16))
    out = torch.full_like(xl, float("nan"))
    fwd.fwd_btd(grid=((D // 8 + 63) // 64, (T + 15) // 16, B), block=(64, 1, 1),
                args=[xl, w, bias, mask, out, T, D, 1, 1])
    bwd = cuda_harness.compile_source(cuda_bwd.source("btd", W))
    dx = torch.full_like(xl, float("nan"))
    part = torch.full((B * ((T + L - 1) // L), D, W + 1), float("nan"))
    bwd.bwd_btd(grid=((D // 4 + 63) // 64, (T + L - 1) // L, B), block=(64, 1, 1),
                args=[xl, w, bias, mask, dl, dx, part, T, D, 1, 1])
    x[0, :, 0] = 0.0  # the reference multiplies: give it the value the selection makes of the masked NaN
    want_out, want_dx, want_dw, want_db = cuda_bwd.reference(x, w, bias, mask, True, dout)
    out = out.transpose(1, 2).clone()
    assert out[0, :, 0].isnan().all()  # the residual carries x's own NaN
    out[0, :, 0] = want_out[0, :, 0] = 0.0
    _assert_bf16_close(out, want_out)
    _assert_bf16_close(dx.transpose(1, 2), want_dx)
    total = part.double().sum(0)
    torch.testing.assert_close(total[:, :W], want_dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total[:, W], want_db, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the harness against a GPU
def _gpu_cases():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12 * 256, generator=g)
    ints = torch.randint(0, 2**31, (5, 4), generator=g, dtype=torch.int64).to(torch.int32)
    small = torch.randint(0, 2**20, (5, 2), generator=g, dtype=torch.int64).to(torch.int32)
    f4, f2 = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
    cases = [("shuffles", (2, 1, 1), (64, 1, 1), [x[:128], torch.zeros(4, 128), torch.zeros(4, 128, dtype=torch.int64),
                                                  d, m, s, w], 0)
             for d, m, s, w in ((1, 1, 0, 32), (3, 16, 31, 32), (31, 31, -1, 32), (2, 5, 6, 8), (1, 8, 3, 4))]
    cases += [
        ("votes", (1, 1, 1), (64, 1, 1), [x[:64], torch.zeros(3, 64, dtype=torch.int32)], 0),
        ("block_sums", (2, 3, 2), (8, 4, 8), [x, torch.zeros(12)], 0),
        ("positions", (3, 2, 2), (4, 3, 2), [torch.zeros(12 * 24, 12, dtype=torch.int32)], 0),
        ("vectors", (1, 1, 1), (5, 1, 1), [ints, f4, small, f2, torch.zeros(5, 4, dtype=torch.int32), torch.zeros(5, 4),
                                           torch.zeros(5, 8), torch.zeros(5, dtype=torch.int32)], 0),
        ("reverse_blocks", (3, 1, 1), (32, 1, 1), [x[:96], torch.zeros(96)], 128),
    ]
    return cases


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the harness with a GPU run: needs CUDA")
@pytest.mark.parametrize("case", range(10))
def test_harness_matches_the_gpu(lib, case):
    """The same kernels through torch.cuda._compile_kernel on the GPU: integer results must be equal,
    float results within float32 rounding (the GPU contracts a*b+c into FMAs; __expf is approximate)."""
    name, grid, block, args, shared_mem = _gpu_cases()[case]
    cpu_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    getattr(lib, name)(grid=grid, block=block, args=cpu_args, shared_mem=shared_mem)
    kernel = torch.cuda._compile_kernel(BUILTINS_SOURCE, name)
    gpu_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    kernel(grid=grid, block=block, args=gpu_args, shared_mem=shared_mem)
    torch.cuda.synchronize()
    for i, (c, g) in enumerate(zip(cpu_args, gpu_args)):
        if isinstance(c, torch.Tensor):
            if c.dtype.is_floating_point:
                torch.testing.assert_close(g.cpu(), c, rtol=2e-6, atol=1e-6, msg=f"{name}, argument {i}")
            else:
                assert torch.equal(g.cpu(), c), f"{name}, argument {i}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the harness with a GPU run: needs CUDA")
def test_prototypes_match_the_gpu():
    cuda_fwd, cuda_bwd = _prototypes()
    B, D, T, W = 2, 3, 8 * 150, 4
    x, w, bias, dout = _inputs(B, D, T, W, seed=7)
    for source, name, grid, make_args in (
            (cuda_fwd.source("bdt", W), "fwd_bdt", ((T // 8 + 127) // 128, D, B),
             lambda t: [t(x), t(w), t(bias), t(torch.zeros_like(x)), T, D]),
            (cuda_bwd.source("bdt", W), "bwd_bdt", (D, B, 1),
             lambda t: [t(x), t(w), t(bias), t(dout), t(torch.zeros_like(x)), t(torch.zeros(B, D, W + 1)), T, D])):
        cpu_args = make_args(lambda a: a.clone())
        cuda_harness.compile_source(source).get_function(name)(grid=grid, block=(128, 1, 1), args=cpu_args)
        gpu_args = make_args(lambda a: a.cuda())
        torch.cuda._compile_kernel(source, name)(grid=grid, block=(128, 1, 1), args=gpu_args)
        torch.cuda.synchronize()
        for c, g in zip(cpu_args, gpu_args):
            if isinstance(c, torch.Tensor):
                # bf16 outputs may differ by one unit where float32 FMAs round differently
                torch.testing.assert_close(g.cpu().float(), c.float(), rtol=2 ** -7, atol=1e-5, msg=name)

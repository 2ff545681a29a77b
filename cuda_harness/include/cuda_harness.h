// The CUDA device-code subset that cuda_harness compiles as C++ (clang >= 16) and runs on the CPU
// through metal_harness's executor: every GPU thread is a fiber, so __syncthreads and the warp
// shuffles are exact. Included before the kernel source (already macro-expanded by the harness).
// See docs/CUDA_HARNESS.md for the supported subset.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

#include "mh_runtime.h"

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ const

// ---------------------------------------------------------------- vector types
// Plain structs with CUDA's alignment (no arithmetic operators, as in CUDA's vector_types.h).
#define CH_VECTOR_TYPES(T, name, align2, align4)                                        \
  struct name##1 { T x; };                                                              \
  struct __attribute__((aligned(align2))) name##2 { T x, y; };                          \
  struct name##3 { T x, y, z; };                                                        \
  struct __attribute__((aligned(align4))) name##4 { T x, y, z, w; };                    \
  inline name##1 make_##name##1(T x) { return name##1{x}; }                             \
  inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }                     \
  inline name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }             \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }
CH_VECTOR_TYPES(signed char, char, 2, 4)
CH_VECTOR_TYPES(unsigned char, uchar, 2, 4)
CH_VECTOR_TYPES(short, short, 4, 8)
CH_VECTOR_TYPES(unsigned short, ushort, 4, 8)
CH_VECTOR_TYPES(int, int, 8, 16)
CH_VECTOR_TYPES(unsigned int, uint, 8, 16)
CH_VECTOR_TYPES(long long, longlong, 16, 16)
CH_VECTOR_TYPES(unsigned long long, ulonglong, 16, 16)
CH_VECTOR_TYPES(float, float, 8, 16)
CH_VECTOR_TYPES(double, double, 16, 16)
#undef CH_VECTOR_TYPES

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---------------------------------------------------------------- built-in variables
// Read from the executor for the fiber that runs now (all fibers share one OS thread).
namespace ch {
inline uint3 to_uint3(const uint32_t* v) { return uint3{v[0], v[1], v[2]}; }
inline uint3 thread_idx() { return to_uint3(::mh::rt_current_context()->thread_position_in_threadgroup); }
inline uint3 block_idx() { return to_uint3(::mh::rt_current_context()->threadgroup_position_in_grid); }
inline dim3 block_dim() { return to_uint3(::mh::rt_current_context()->dispatch_threads_per_threadgroup); }
inline dim3 grid_dim() { return to_uint3(::mh::rt_current_context()->threadgroups_per_grid); }
inline unsigned int lane_id() { return ::mh::rt_current_context()->thread_index_in_simdgroup; }
}  // namespace ch
#define threadIdx (::ch::thread_idx())
#define blockIdx (::ch::block_idx())
#define blockDim (::ch::block_dim())
#define gridDim (::ch::grid_dim())
static constexpr int warpSize = 32;

// ---------------------------------------------------------------- synchronisation
inline void __syncthreads() { ::mh::rt_threadgroup_barrier(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---------------------------------------------------------------- warp-level calls
namespace ch {
namespace detail {

// What every lane passes to a warp-level call besides its value: the mask, the width, and the
// lane, delta or lane mask (the collective's `arg`).
struct WarpCall {
  unsigned int mask;
  int width;
};

template <class T>
const T& lane_in(::mh::LaneSlot* l, int i) { return *static_cast<const T*>(l[i].in); }
template <class T>
T& lane_out(::mh::LaneSlot* l, int i) { return *static_cast<T*>(l[i].out); }
inline const WarpCall& call_of(::mh::LaneSlot* l, int i) { return *static_cast<const WarpCall*>(l[i].in2); }

// The checks CUDA's rules imply: one mask for all lanes, that names every lane that takes part
// and no lane that returned (or does not exist) - the harness is stricter than CUDA here, which
// allows exited lanes in a mask - and a width that is a power of two up to 32.
inline const char* check_call(::mh::LaneSlot* l, uint32_t active, bool check_width) {
  static thread_local char message[300];
  int first = __builtin_ctz(active);
  const WarpCall& c0 = call_of(l, first);
  for (int i = 0; i < 32; ++i) {
    if (!(active >> i & 1)) continue;
    const WarpCall& c = call_of(l, i);
    if (c.mask != c0.mask) {
      snprintf(message, sizeof message, "lanes %d and %d pass different masks (0x%08x and 0x%08x)", first, i,
               c0.mask, c.mask);
      return message;
    }
    if (check_width && (c.width < 1 || c.width > 32 || (c.width & (c.width - 1)) != 0)) {
      snprintf(message, sizeof message, "lane %d passes width %d (must be a power of two from 1 to 32)", i,
               c.width);
      return message;
    }
  }
  if (uint32_t outside = active & ~c0.mask) {
    snprintf(message, sizeof message, "lane %d takes part but the mask 0x%08x does not name it",
             __builtin_ctz(outside), c0.mask);
    return message;
  }
  if (uint32_t missing = c0.mask & ~active) {
    snprintf(message, sizeof message,
             "the mask 0x%08x names lane %d, which has returned or does not exist (active lanes: 0x%08x)", c0.mask,
             __builtin_ctz(missing), active);
    return message;
  }
  return nullptr;
}

enum class Shuffle { Index, Up, Down, Xor };

// CUDA's shuffles within segments of `width` lanes. Up: lanes below `delta` in their segment
// keep their value; down: lanes whose source passes the segment's end keep theirs; xor: a
// source in a later segment keeps the lane's own value. A source lane outside the mask reads
// all-ones bytes (undefined in CUDA).
template <class T, Shuffle kind>
const char* shuffle(::mh::LaneSlot* l, uint32_t active) {
  if (const char* misuse = check_call(l, active, true)) return misuse;
  for (int i = 0; i < 32; ++i) {
    if (!(active >> i & 1)) continue;
    const int width = call_of(l, i).width;
    const int base = i & ~(width - 1), in_segment = i & (width - 1);
    const uint32_t arg = l[i].arg;
    int source = i;
    switch (kind) {
      case Shuffle::Index: source = base + int(arg & uint32_t(width - 1)); break;
      case Shuffle::Up: source = arg <= uint32_t(in_segment) ? i - int(arg) : i; break;
      case Shuffle::Down: source = uint32_t(in_segment) + arg < uint32_t(width) ? i + int(arg) : i; break;
      case Shuffle::Xor: {
        const uint32_t target = uint32_t(i) ^ arg;
        source = target < uint32_t(base + width) ? int(target) : i;
        break;
      }
    }
    if (source >= 0 && source < 32 && (active >> source & 1)) {
      lane_out<T>(l, i) = lane_in<T>(l, source);
    } else {
      __builtin_memset(&lane_out<T>(l, i), 0xFF, sizeof(T));
    }
  }
  return nullptr;
}

enum class Vote { Ballot, Any, All };

template <Vote kind>
const char* vote(::mh::LaneSlot* l, uint32_t active) {
  if (const char* misuse = check_call(l, active, false)) return misuse;
  unsigned int ballot = 0;
  for (int i = 0; i < 32; ++i)
    if ((active >> i & 1) && lane_in<int>(l, i) != 0) ballot |= 1u << i;
  const unsigned int result = kind == Vote::Ballot ? ballot : kind == Vote::Any ? ballot != 0 : ballot == active;
  for (int i = 0; i < 32; ++i)
    if (active >> i & 1) lane_out<unsigned int>(l, i) = result;
  return nullptr;
}

template <class T, Shuffle kind>
T shuffle_call(const char* what, unsigned int mask, T var, uint32_t arg, int width) {
  static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "the harness shuffles 4- and 8-byte arithmetic values (int, unsigned, long long, float, double, "
                "...); shuffle the halves of a vector type one by one");
  const WarpCall call{mask, width};
  T out;
  ::mh::rt_simd_collective(&shuffle<T, kind>, what, &var, &call, &out, arg);
  return out;
}

template <Vote kind>
unsigned int vote_call(const char* what, unsigned int mask, int predicate) {
  const WarpCall call{mask, 32};
  unsigned int out;
  ::mh::rt_simd_collective(&vote<kind>, what, &predicate, &call, &out, 0);
  return out;
}

inline const char* sync_warp(::mh::LaneSlot* l, uint32_t active) { return check_call(l, active, false); }

}  // namespace detail
}  // namespace ch

template <class T>
inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize) {
  return ::ch::detail::shuffle_call<T, ::ch::detail::Shuffle::Index>("__shfl_sync", mask, var, uint32_t(src_lane),
                                                                      width);
}
template <class T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  return ::ch::detail::shuffle_call<T, ::ch::detail::Shuffle::Up>("__shfl_up_sync", mask, var, delta, width);
}
template <class T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  return ::ch::detail::shuffle_call<T, ::ch::detail::Shuffle::Down>("__shfl_down_sync", mask, var, delta, width);
}
template <class T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize) {
  return ::ch::detail::shuffle_call<T, ::ch::detail::Shuffle::Xor>("__shfl_xor_sync", mask, var,
                                                                    uint32_t(lane_mask), width);
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  return ::ch::detail::vote_call<::ch::detail::Vote::Ballot>("__ballot_sync", mask, predicate);
}
inline int __any_sync(unsigned int mask, int predicate) {
  return int(::ch::detail::vote_call<::ch::detail::Vote::Any>("__any_sync", mask, predicate));
}
inline int __all_sync(unsigned int mask, int predicate) {
  return int(::ch::detail::vote_call<::ch::detail::Vote::All>("__all_sync", mask, predicate));
}
inline void __syncwarp(unsigned int mask = 0xFFFFFFFFu) {
  const ::ch::detail::WarpCall call{mask, 32};
  ::mh::rt_simd_collective(&::ch::detail::sync_warp, "__syncwarp", nullptr, &call, nullptr, 0);
}

// ---------------------------------------------------------------- bit casts and math
inline float __uint_as_float(unsigned int v) { return __builtin_bit_cast(float, v); }
inline unsigned int __float_as_uint(float v) { return __builtin_bit_cast(unsigned int, v); }
inline float __int_as_float(int v) { return __builtin_bit_cast(float, v); }
inline int __float_as_int(float v) { return __builtin_bit_cast(int, v); }
inline double __longlong_as_double(long long v) { return __builtin_bit_cast(double, v); }
inline long long __double_as_longlong(double v) { return __builtin_bit_cast(long long, v); }

// The fast intrinsics are the host's libm functions here (on the GPU they are approximations).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }

// min/max: CUDA's overloads (mixed signedness compares as unsigned, as CUDA's do).
#define CH_MIN_MAX(A, B, R)                                                  \
  inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); } \
  inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); }
CH_MIN_MAX(int, int, int)
CH_MIN_MAX(unsigned int, unsigned int, unsigned int)
CH_MIN_MAX(int, unsigned int, unsigned int)
CH_MIN_MAX(unsigned int, int, unsigned int)
CH_MIN_MAX(long, long, long)
CH_MIN_MAX(unsigned long, unsigned long, unsigned long)
CH_MIN_MAX(long long, long long, long long)
CH_MIN_MAX(unsigned long long, unsigned long long, unsigned long long)
CH_MIN_MAX(long long, unsigned long long, unsigned long long)
CH_MIN_MAX(unsigned long long, long long, unsigned long long)
#undef CH_MIN_MAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------- memory
template <class T>
inline T __ldg(const T* p) { return *p; }

// Atomics are plain read-modify-writes: one fiber runs at a time.
template <class T>
inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T>
inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <class T>
inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T>
inline T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }
template <class T>
inline T atomicMax(T* p, T v) { T old = *p; *p = v > old ? v : old; return old; }
template <class T>
inline T atomicCAS(T* p, T compare, T v) { T old = *p; if (old == compare) *p = v; return old; }

// ---------------------------------------------------------------- kernel entries
namespace ch {

template <int I, class... A>
struct nth_type;
template <class A0, class... A>
struct nth_type<0, A0, A...> { using type = A0; };
template <int I, class A0, class... A>
struct nth_type<I, A0, A...> { using type = typename nth_type<I - 1, A...>::type; };
template <class F, int I>
struct function_param;
template <class... A, int I>
struct function_param<void (*)(A...), I> { using type = typename nth_type<I, A...>::type; };
// The type of parameter I of the kernel pointer type F.
template <class F, int I>
using param_t = typename function_param<F, I>::type;

// How the Python side packs an argument for a parameter: kind, size and (pointers) the
// alignment of the element type, which a tensor's address must respect as on the GPU.
enum ParamKind : int { kPointer = 0, kSigned = 1, kUnsigned = 2, kFloating = 3, kBool = 4, kOther = 5 };
struct ParamInfo {
  int kind;
  int size;
  int align;
};
template <class P>
constexpr ParamInfo param_info() {
  if constexpr (std::is_pointer_v<P>) {
    using E = std::remove_cv_t<std::remove_pointer_t<P>>;
    if constexpr (std::is_void_v<E>) return {kPointer, int(sizeof(P)), 1};
    else return {kPointer, int(sizeof(P)), int(alignof(E))};
  } else if constexpr (std::is_same_v<P, bool>) {
    return {kBool, 1, 1};
  } else if constexpr (std::is_integral_v<P>) {
    return {std::is_signed_v<P> ? kSigned : kUnsigned, int(sizeof(P)), int(alignof(P))};
  } else if constexpr (std::is_floating_point_v<P>) {
    return {kFloating, int(sizeof(P)), int(alignof(P))};
  } else {
    return {kOther, int(sizeof(P)), int(alignof(P))};
  }
}

}  // namespace ch

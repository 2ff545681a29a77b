// CPU executor for Metal compute kernels compiled as C++ by metal_harness.
//
// Threadgroups run one after another. Inside a group every simulated GPU thread is a fiber
// with its own stack; a fiber runs until it reaches a threadgroup_barrier, a SIMD collective
// or its end, then hands control back to the scheduler here. That makes barriers and SIMD
// collectives exact, and the order in which fibers run is chosen to expose missing barriers:
// by default each barrier phase runs the threads in the opposite order of the previous one
// (reverse first), so a read of a neighbour's slot that is not separated from its write by a
// barrier sees stale or poisoned data.
#include "mh_runtime.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(MH_USE_UCONTEXT)
#define MH_UCONTEXT 1
#include <ucontext.h>
#endif

namespace {

// ---------------------------------------------------------------- context switching
#if !MH_UCONTEXT
// Saves the callee-saved registers and the floating-point control words on the current stack,
// stores the stack pointer into *save_sp, and resumes the context whose stack is load_sp.
// About 20 instructions: swapcontext would make a system call on every switch.
asm(R"(
  .text
  .p2align 4
  .type mh_switch_context,@function
mh_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mh_switch_context, .-mh_switch_context
  .section .note.GNU-stack,"",@progbits
  .text
)");
extern "C" void mh_switch_context(void** save_sp, void* load_sp);

struct Context {
  void* sp = nullptr;
};

extern "C" void mh_fiber_entry();

void context_init(Context* c, char* stack_top) {
  uint32_t mxcsr;
  uint16_t fpu_cw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t(15));
  *--sp = 0;  // return address of mh_fiber_entry: it never returns
  *--sp = reinterpret_cast<uint64_t>(&mh_fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
  --sp;
  memcpy(sp, &mxcsr, 4);
  memcpy(reinterpret_cast<char*>(sp) + 4, &fpu_cw, 2);
  c->sp = sp;
}

inline void context_switch(Context* from, Context* to) { mh_switch_context(&from->sp, to->sp); }
#else
struct Context {
  ucontext_t uc;
};

extern "C" void mh_fiber_entry();

void context_init(Context* c, char* stack_top, size_t stack_size) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack_top - stack_size;
  c->uc.uc_stack.ss_size = stack_size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, mh_fiber_entry, 0);
}

inline void context_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
#endif

// ---------------------------------------------------------------- fiber stacks
constexpr size_t kStackSize = 256 * 1024;  // kernel frames are small; pages are committed lazily
constexpr size_t kGuardSize = 4096;        // an overflow faults instead of corrupting a neighbour

class StackPool {
 public:
  ~StackPool() {
    if (base_) munmap(base_, count_ * stride());
  }
  // Returns false when the memory cannot be reserved.
  bool reserve(size_t n) {
    if (n <= count_) return true;
    if (base_) munmap(base_, count_ * stride());
    base_ = nullptr;
    count_ = 0;
    void* p = mmap(nullptr, n * stride(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    base_ = static_cast<char*>(p);
    count_ = n;
    for (size_t i = 0; i < n; ++i) mprotect(base_ + i * stride(), kGuardSize, PROT_NONE);
    return true;
  }
  char* top(size_t i) const { return base_ + (i + 1) * stride(); }

 private:
  static size_t stride() { return kStackSize + kGuardSize; }
  char* base_ = nullptr;
  size_t count_ = 0;
};

// ---------------------------------------------------------------- one threadgroup
enum class State : uint8_t { Runnable, AtBarrier, AtSimd, Done };

struct Fiber {
  Context context;
  State state = State::Runnable;
  mh::ThreadContext pos;
  mh::LaneSlot slot;
  mh::CombineFn combine = nullptr;
  const char* what = nullptr;
};

// The words of error messages and the limits, in the vocabulary of the language the kernel is
// written in: the executor also runs CUDA kernels for cuda_harness (blocks, warps, __syncthreads).
struct Dialect {
  const char* group;         // "threadgroup" / "block"
  const char* barrier;       // the barrier's name
  const char* simd;          // "SIMD group" / "warp"
  const char* collective;    // "SIMD collective" / "warp-level call"
  const char* barrier_rule;  // why a divergent barrier is an error
  const char* simd_rule;     // why divergent collectives are an error
  const char* memory;        // "threadgroup memory" / "shared memory"
  const char* memory_limit;  // where the limit comes from
};

const Dialect kMetal = {
    "threadgroup", "threadgroup_barrier", "SIMD group", "SIMD collective",
    "on Apple GPUs every thread of a threadgroup must reach each barrier",
    "every active lane of a SIMD group must reach the same collective",
    "threadgroup memory", "Apple GPUs provide"};
const Dialect kCuda = {
    "block", "__syncthreads", "warp", "warp-level call",
    "every thread of a block must reach each __syncthreads (undefined behaviour in CUDA)",
    "every lane of a warp that has not returned must reach the same __shfl_*_sync/__syncwarp call",
    "shared memory", "a block may use (48 KiB static + dynamic; more needs set_shared_memory_config)"};

// Metal: 32 KiB per threadgroup. CUDA: up to 227 KiB per block (sm_90) with the opt-in.
constexpr size_t kThreadgroupMemoryMax = 227 * 1024;
// Poisoned bytes before and after every threadgroup array (not counted against the limit): a read
// just outside an array gets NaN / -1, a write there is reported when the group ends.
constexpr size_t kCanaryBytes = 64;
constexpr size_t kMaxAllocations = 64;
constexpr size_t kArenaBytes = kThreadgroupMemoryMax + (kMaxAllocations + 1) * (kCanaryBytes + 64);

struct ThreadgroupAllocation {
  const void* key;
  void* ptr;
  size_t size;
  const char* name;
};

struct Group {
  bool in_kernel = false;        // a fiber runs (a fault now is the kernel's)
  uintptr_t fault_address = 0;   // set when a kernel's memory access faulted
  std::vector<Fiber> fibers;
  uint32_t n = 0;
  uint32_t n_runnable = 0, n_barrier = 0, n_simd = 0, n_done = 0;
  Context scheduler;
  Fiber* current = nullptr;
  mh_entry_fn entry = nullptr;
  void* const* args = nullptr;
  bool failed = false;
  std::string error;
  std::vector<ThreadgroupAllocation> allocations;
  size_t arena_used = 0;         // bytes of the arena in use, canaries included
  size_t payload_used = 0;       // the same without the canaries: what counts against the limit
  size_t arena_limit = 0;        // bytes of threadgroup/shared memory a group may use
  size_t dynamic_shared = 0;     // CUDA: bytes of `extern __shared__` memory of the launch
  const Dialect* dialect = &kMetal;
  alignas(64) unsigned char arena[kArenaBytes];
};

thread_local Group* g_group = nullptr;

std::string position_of(const Fiber& f) {
  char buf[160];
  snprintf(buf, sizeof buf, "thread (%u,%u,%u) of %s (%u,%u,%u)",
           f.pos.thread_position_in_threadgroup[0], f.pos.thread_position_in_threadgroup[1],
           f.pos.thread_position_in_threadgroup[2], g_group->dialect->group,
           f.pos.threadgroup_position_in_grid[0], f.pos.threadgroup_position_in_grid[1], f.pos.threadgroup_position_in_grid[2]);
  return buf;
}

void fail_group(Group* g, const std::string& message) {
  if (!g->failed) {
    g->failed = true;
    g->error = message;
  }
}

// Called in fiber context: suspends the current fiber until the scheduler resumes it.
void yield_to_scheduler(Group* g) {
  Fiber* f = g->current;
  context_switch(&f->context, &g->scheduler);
}

// Completes the pending collective of SIMD group `sg` if every lane that has not returned is
// waiting in it. Lanes that returned are inactive, as on the GPU.
void try_complete_simd(Group* g, uint32_t sg) {
  const uint32_t begin = sg * mh::kSimdWidth;
  const uint32_t end = begin + mh::kSimdWidth < g->n ? begin + mh::kSimdWidth : g->n;
  uint32_t mask = 0;
  Fiber* first = nullptr;
  for (uint32_t i = begin; i < end; ++i) {
    Fiber& f = g->fibers[i];
    if (f.state == State::Done) continue;
    if (f.state != State::AtSimd) return;  // still running, or at a barrier (reported if stuck)
    if (!first) {
      first = &f;
    } else if (f.combine != first->combine) {
      fail_group(g, std::string("divergent ") + g->dialect->collective + "s: " + position_of(*first) +
                        " calls " + first->what + " while " + position_of(f) + " calls " + f.what + " (" +
                        g->dialect->simd_rule + ")");
      return;
    }
    mask |= 1u << (i - begin);
  }
  if (!first) return;
  mh::LaneSlot slots[mh::kSimdWidth] = {};
  for (uint32_t i = begin; i < end; ++i)
    if (mask & (1u << (i - begin))) slots[i - begin] = g->fibers[i].slot;
  if (const char* misuse = first->combine(slots, mask)) {
    fail_group(g, std::string(first->what) + " in the " + g->dialect->simd + " of " + position_of(*first) +
                      ": " + misuse);
    return;
  }
  for (uint32_t i = begin; i < end; ++i) {
    if (!(mask & (1u << (i - begin)))) continue;
    g->fibers[i].state = State::Runnable;
    g->n_simd--;
    g->n_runnable++;
  }
}

std::string describe_stuck(Group* g) {
  const Fiber* at_barrier = nullptr;
  const Fiber* at_simd = nullptr;
  const Fiber* done = nullptr;
  for (const Fiber& f : g->fibers) {
    if (f.state == State::AtBarrier && !at_barrier) at_barrier = &f;
    if (f.state == State::AtSimd && !at_simd) at_simd = &f;
    if (f.state == State::Done && !done) done = &f;
  }
  const Dialect& d = *g->dialect;
  char counts[240];
  snprintf(counts, sizeof counts, " (%u of %u threads wait at %s, %u wait in a %s, %u returned)",
           g->n_barrier, g->n, d.barrier, g->n_simd, d.collective, g->n_done);
  if (at_barrier && done && !at_simd)
    return std::string("divergent ") + d.barrier + ": " + position_of(*done) + " returned while " +
           position_of(*at_barrier) + " waits at " + d.barrier + "; " + d.barrier_rule + counts;
  if (at_simd && at_barrier)
    return "divergent control flow: " + position_of(*at_simd) + " waits in " + at_simd->what +
           " while " + position_of(*at_barrier) + " of the same " + d.simd + " waits at " + d.barrier +
           counts;
  if (at_simd && done)
    return std::string("divergent ") + d.collective + ": " + position_of(*at_simd) + " waits in " +
           at_simd->what + " while other threads of its " + d.simd + " neither returned nor reached it" +
           counts;
  return std::string("threadgroup cannot make progress") + counts;
}

bool reverse_order(int schedule, uint32_t phase) {
  switch (schedule) {
    case 1: return phase % 2 == 1;  // alternate, forward first
    case 2: return false;           // forward
    case 3: return true;            // reverse
    default: return phase % 2 == 0; // alternate, reverse first
  }
}

// Runs every fiber of the group to completion. Returns false (with g->error) on failure.
bool run_group(Group* g, int schedule) {
  uint32_t phase = 0;
  for (;;) {
    const bool reverse = reverse_order(schedule, phase);
    for (uint32_t k = 0; k < g->n; ++k) {
      Fiber* f = &g->fibers[reverse ? g->n - 1 - k : k];
      if (f->state != State::Runnable) continue;
      g->current = f;
      g->in_kernel = true;
      context_switch(&g->scheduler, &f->context);
      g->in_kernel = false;
      if (g->failed) return false;
    }
    if (g->n_done == g->n) return true;
    if (g->n_runnable > 0) continue;
    if (g->n_barrier == g->n) {
      for (Fiber& f : g->fibers) f.state = State::Runnable;
      g->n_barrier = 0;
      g->n_runnable = g->n;
      ++phase;
      continue;
    }
    fail_group(g, describe_stuck(g));
    return false;
  }
}

}  // namespace

extern "C" void mh_fiber_entry() {
  Group* g = g_group;
  Fiber* f = g->current;
  g->entry(g->args, &f->pos);
  f->state = State::Done;
  g->n_runnable--;
  g->n_done++;
  try_complete_simd(g, f->pos.simdgroup_index_in_threadgroup);
  yield_to_scheduler(g);
  __builtin_unreachable();
}

namespace mh {

void rt_threadgroup_barrier() {
  Group* g = g_group;
  g->current->state = State::AtBarrier;
  g->n_runnable--;
  g->n_barrier++;
  yield_to_scheduler(g);
}

void rt_simd_collective(CombineFn fn, const char* what, const void* in, const void* in2, void* out,
                        uint32_t arg) {
  Group* g = g_group;
  Fiber* f = g->current;
  f->slot = LaneSlot{in, in2, out, arg};
  f->combine = fn;
  f->what = what;
  f->state = State::AtSimd;
  g->n_runnable--;
  g->n_simd++;
  try_complete_simd(g, f->pos.simdgroup_index_in_threadgroup);
  if (f->state != State::Runnable || g->failed) yield_to_scheduler(g);
}

namespace {
const char* combine_nothing(LaneSlot*, uint32_t) { return nullptr; }
}  // namespace

void rt_simdgroup_barrier() {
  rt_simd_collective(&combine_nothing, "simdgroup_barrier", nullptr, nullptr, nullptr, 0);
}

void* rt_threadgroup_storage(const void* key, size_t size, size_t align, const char* name) {
  Group* g = g_group;
  for (const ThreadgroupAllocation& a : g->allocations)
    if (a.key == key) return a.ptr;
  const size_t payload = (g->payload_used + align - 1) / align * align + size;
  if (payload > g->arena_limit) {
    char buf[300];
    snprintf(buf, sizeof buf, "%s exceeds the %zu bytes %s (%zu requested)", g->dialect->memory,
             g->arena_limit, g->dialect->memory_limit, payload);
    rt_fail(buf);
  }
  if (g->allocations.size() == kMaxAllocations || align > 64) rt_fail("too many or too aligned threadgroup arrays");
  const size_t start = g->arena_used;
  const size_t offset = (start + kCanaryBytes + align - 1) / align * align;
  void* ptr = g->arena + offset;
  // Poison: all-ones bytes are NaN for float, half and bfloat and -1 for integers, so a kernel
  // that reads shared memory nobody wrote in this threadgroup gets a visibly wrong result. The
  // canaries around the array get the same bytes.
  memset(g->arena + start, 0xFF, offset + size + kCanaryBytes - start);
  g->arena_used = offset + size;
  g->payload_used = payload;
  g->allocations.push_back(ThreadgroupAllocation{key, ptr, size, name});
  return ptr;
}

const ThreadContext* rt_current_context() { return &g_group->current->pos; }

namespace {
char g_dynamic_shared_key;
}  // namespace

void* rt_dynamic_shared() {
  return rt_threadgroup_storage(&g_dynamic_shared_key, g_group->dynamic_shared, 16, "extern __shared__ array");
}

void rt_fail(const char* message) {
  Group* g = g_group;
  fail_group(g, position_of(*g->current) + ": " + message);
  yield_to_scheduler(g);
  __builtin_unreachable();
}

}  // namespace mh

namespace {

// ---------------------------------------------------------------- memory faults
// While a dispatch runs, a segmentation fault in kernel code (an access past a guarded buffer,
// a fiber stack overflow) ends the dispatch with an error instead of the process: the handler
// runs on an alternate stack, records the address and switches to the scheduler for good.
struct FaultHandler {
  struct sigaction previous_segv, previous_bus;
  stack_t previous_stack;
  bool installed = false;
};

thread_local unsigned char g_signal_stack[64 * 1024];

void on_fault(int sig, siginfo_t* info, void*) {
  Group* g = g_group;
  if (!g || !g->in_kernel) {  // not ours: let the default action happen
    signal(sig, SIG_DFL);
    return;
  }
  g->fault_address = reinterpret_cast<uintptr_t>(info->si_addr);
  char buf[96];
  snprintf(buf, sizeof buf, "invalid memory access at address %p", info->si_addr);
  fail_group(g, position_of(*g->current) + ": " + buf);
  sigset_t unblock;
  sigemptyset(&unblock);
  sigaddset(&unblock, sig);
  pthread_sigmask(SIG_UNBLOCK, &unblock, nullptr);
  g->in_kernel = false;
  Context abandoned;
  context_switch(&abandoned, &g->scheduler);
}

void install_fault_handler(FaultHandler* h) {
  stack_t stack = {};
  stack.ss_sp = g_signal_stack;
  stack.ss_size = sizeof g_signal_stack;
  sigaltstack(&stack, &h->previous_stack);
  struct sigaction action = {};
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &h->previous_segv);
  sigaction(SIGBUS, &action, &h->previous_bus);
  h->installed = true;
}

void remove_fault_handler(FaultHandler* h) {
  if (!h->installed) return;
  sigaction(SIGSEGV, &h->previous_segv, nullptr);
  sigaction(SIGBUS, &h->previous_bus, nullptr);
  sigaltstack(&h->previous_stack, nullptr);
}

// After a group ran: the poisoned bytes around its threadgroup arrays must be intact.
bool check_canaries(Group* g) {
  const unsigned char* previous_end = g->arena;
  for (size_t i = 0; i <= g->allocations.size(); ++i) {
    const bool last = i == g->allocations.size();
    const unsigned char* begin = previous_end;
    const unsigned char* end = last ? previous_end + (g->allocations.empty() ? 0 : kCanaryBytes)
                                    : static_cast<const unsigned char*>(g->allocations[i].ptr);
    for (const unsigned char* p = begin; p < end; ++p) {
      if (*p == 0xFF) continue;
      char buf[400];
      if (i > 0 && (last || p - begin < end - p)) {
        const ThreadgroupAllocation& a = g->allocations[i - 1];
        snprintf(buf, sizeof buf, "a write %zu bytes past the end of %s '%s' (%zu bytes) in %s (%u,%u,%u)",
                 size_t(p - begin), g->dialect->memory, a.name, a.size, g->dialect->group,
                 g->fibers[0].pos.threadgroup_position_in_grid[0], g->fibers[0].pos.threadgroup_position_in_grid[1],
                 g->fibers[0].pos.threadgroup_position_in_grid[2]);
      } else {
        const ThreadgroupAllocation& a = g->allocations[i];
        snprintf(buf, sizeof buf, "a write %zu bytes before the start of %s '%s' (%zu bytes) in %s (%u,%u,%u)",
                 size_t(end - p), g->dialect->memory, a.name, a.size, g->dialect->group,
                 g->fibers[0].pos.threadgroup_position_in_grid[0], g->fibers[0].pos.threadgroup_position_in_grid[1],
                 g->fibers[0].pos.threadgroup_position_in_grid[2]);
      }
      fail_group(g, buf);
      return false;
    }
    if (!last) previous_end = static_cast<const unsigned char*>(g->allocations[i].ptr) + g->allocations[i].size;
  }
  return true;
}

uint32_t ceil_div(uint64_t a, uint64_t b) { return static_cast<uint32_t>((a + b - 1) / b); }

void copy_message(const std::string& s, char* err, size_t errlen) {
  if (!err || errlen == 0) return;
  size_t n = s.size() < errlen - 1 ? s.size() : errlen - 1;
  memcpy(err, s.data(), n);
  err[n] = '\0';
}

}  // namespace

// Runs `entry` over a grid of grid[0..2] threads in threadgroups of group[0..2] threads, the way
// dispatchThreads does (the last group along each axis may be partial; only in-grid threads exist).
// schedule: 0 alternate (reverse first), 1 alternate (forward first), 2 forward, 3 reverse.
// dialect: 0 Metal (messages, 32 KiB of threadgroup memory), 1 CUDA (messages; `shared_limit`
// bytes of shared memory, of which `dynamic_shared` for `extern __shared__`).
// Returns 0 on success, 1 with a message in err on failure; *fault_address is the faulting
// address when a memory access faulted, else 0.
extern "C" int mh_dispatch(mh_entry_fn entry, void* const* args, const uint64_t* grid,
                           const uint64_t* group, int schedule, int dialect, size_t shared_limit,
                           size_t dynamic_shared, char* err, size_t errlen, uint64_t* fault_address) {
  static thread_local StackPool stacks;
  const uint64_t group_threads = group[0] * group[1] * group[2];
  if (!stacks.reserve(group_threads)) {
    copy_message("cannot reserve fiber stacks", err, errlen);
    return 1;
  }
  Group* g = new Group();
  g->entry = entry;
  g->args = args;
  g->fibers.resize(group_threads);
  g->dialect = dialect == 1 ? &kCuda : &kMetal;
  g->arena_limit = dialect == 1 ? shared_limit : 32 * 1024;
  if (g->arena_limit > kThreadgroupMemoryMax) g->arena_limit = kThreadgroupMemoryMax;
  g->dynamic_shared = dynamic_shared;
  Group* previous = g_group;
  g_group = g;
  FaultHandler faults;
  install_fault_handler(&faults);
  uint32_t groups[3];
  for (int d = 0; d < 3; ++d) groups[d] = ceil_div(grid[d], group[d]);
  bool ok = true;
  for (uint32_t gz = 0; gz < groups[2] && ok; ++gz)
    for (uint32_t gy = 0; gy < groups[1] && ok; ++gy)
      for (uint32_t gx = 0; gx < groups[0] && ok; ++gx) {
        const uint32_t gpos[3] = {gx, gy, gz};
        uint32_t size[3];
        for (int d = 0; d < 3; ++d) {
          uint64_t origin = uint64_t(gpos[d]) * group[d];
          size[d] = static_cast<uint32_t>(grid[d] - origin < group[d] ? grid[d] - origin : group[d]);
        }
        g->n = size[0] * size[1] * size[2];
        g->n_runnable = g->n;
        g->n_barrier = g->n_simd = g->n_done = 0;
        g->allocations.clear();
        g->arena_used = g->payload_used = 0;
        const uint32_t simdgroups = ceil_div(g->n, mh::kSimdWidth);
        for (uint32_t i = 0; i < g->n; ++i) {
          Fiber& f = g->fibers[i];
          f.state = State::Runnable;
          mh::ThreadContext& p = f.pos;
          const uint32_t local[3] = {i % size[0], (i / size[0]) % size[1], i / (size[0] * size[1])};
          for (int d = 0; d < 3; ++d) {
            p.thread_position_in_threadgroup[d] = local[d];
            p.threadgroup_position_in_grid[d] = gpos[d];
            p.thread_position_in_grid[d] = static_cast<uint32_t>(gpos[d] * group[d] + local[d]);
            p.threads_per_grid[d] = static_cast<uint32_t>(grid[d]);
            p.threads_per_threadgroup[d] = size[d];
            p.dispatch_threads_per_threadgroup[d] = static_cast<uint32_t>(group[d]);
            p.threadgroups_per_grid[d] = groups[d];
          }
          p.thread_index_in_threadgroup = i;
          p.thread_index_in_simdgroup = i % mh::kSimdWidth;
          p.simdgroup_index_in_threadgroup = i / mh::kSimdWidth;
          p.simdgroups_per_threadgroup = simdgroups;
          p.dispatch_simdgroups_per_threadgroup = ceil_div(group_threads, mh::kSimdWidth);
          p.threads_per_simdgroup = mh::kSimdWidth;
#if !MH_UCONTEXT
          context_init(&f.context, stacks.top(i));
#else
          context_init(&f.context, stacks.top(i), kStackSize);
#endif
        }
        ok = run_group(g, schedule) && check_canaries(g);
      }
  remove_fault_handler(&faults);
  if (!ok) copy_message(g->error, err, errlen);
  *fault_address = g->fault_address;
  g_group = previous;
  delete g;
  return ok ? 0 : 1;
}

// A buffer of `bytes` that ends at most 15 bytes before an inaccessible zone of `guard` bytes and
// starts less than a page after another one. Its start is congruent to `phase` modulo 16, the alignment of the memory
// it copies, so vector loads behave as on the original. The harness copies each tensor's storage
// into one, so a kernel reading or writing outside faults (and the fault becomes an error) instead
// of silently using neighbouring memory. Returns the buffer's start, or nullptr.
extern "C" void* mh_guarded_alloc(size_t bytes, size_t phase, size_t guard, void** mapping,
                                  size_t* mapping_size) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t body = (bytes + 16 + page - 1) / page * page;
  guard = (guard + page - 1) / page * page;
  const size_t total = body + 2 * guard;
  void* p = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  char* base = static_cast<char*>(p);
  if (mprotect(base + guard, body, PROT_READ | PROT_WRITE) != 0) {
    munmap(p, total);
    return nullptr;
  }
  *mapping = p;
  *mapping_size = total;
  uintptr_t start = reinterpret_cast<uintptr_t>(base + guard + body - bytes);
  start -= (start - phase) % 16;
  // Whole pages below the start join the leading inaccessible zone.
  const uintptr_t first_page = start / page * page;
  mprotect(base + guard, first_page - reinterpret_cast<uintptr_t>(base + guard), PROT_NONE);
  return reinterpret_cast<void*>(start);
}

extern "C" void mh_guarded_free(void* mapping, size_t mapping_size) { munmap(mapping, mapping_size); }

// A small CPU emulation of the CUDA execution model, so the unchanged kernels of csrc/cuda compile
// with g++ and run on CPU in the tests (ARCHITECTURE.md section 4). Test infrastructure only: it
// proves indexing, tails, reductions, barriers and warp exchanges, never speed.
//
// Model: blocks run one after another; the threads of a block run as cooperative fibers
// (one 64 KiB stack per live thread, reused across blocks and launches; a register-only stack
// switch on x86-64, ucontext elsewhere) that
// switch only at __syncthreads, __syncwarp and the __shfl_*_sync family. The schedule (threads and
// blocks in order, reversed, or shuffled with a seed) is a switch, so a kernel relying on an
// unsynchronised order differs between modes. Static __shared__ memory lives in one linker
// section and, like dynamic shared memory, is filled with a mode-dependent poison at every block
// start. Divergent barriers, warp operations with a lane that exited or a partial mask, and
// deadlocks fail the launch with a message (cudaErrorLaunchFailure).
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <stdlib.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if FLT_EVAL_METHOD != 0
#error "the CUDA emulation needs float arithmetic in float (SSE or equivalent, FLT_EVAL_METHOD 0)"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Every static __shared__ variable lands in this section, whose bounds the linker provides, so the
// runtime can poison all of them at each block start.
#define __shared__ __attribute__((section("nk_emu_shared"))) static

// Launch: the nvcc build spells it kernel<<<grid, block, shmem, stream>>>(args) (csrc/cuda/common.cuh).
#define NK_LAUNCH(grid, block, shmem, stream, ...) \
  ::cuda_emulation::launch(grid, block, shmem, stream, __VA_ARGS__)

// ---- vector types and the runtime API the launchers call -------------------------------------

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

namespace cuda_emulation {

enum class Schedule : int { kInOrder = 0, kReversed = 1, kShuffled = 2 };

namespace detail {

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;
constexpr size_t kStackBytes = 64 * 1024;

// What a blocked thread waits for; warp operations of one generation must all be of one kind.
enum class Sync : uint8_t { kNone, kBlock, kShuffle, kSyncwarp };
enum class State : uint8_t { kNotStarted, kRunning, kBlocked, kDone };

struct Thread {
  State state;
  Sync wait;
  uint64_t wait_gen;  // the barrier generation it waits to see completed
  int fiber;
};

struct Warp {
  uint32_t lanes;    // lanes that exist (a partial last warp has fewer)
  uint32_t exited;   // lanes that returned
  int arrived;
  Sync kind;         // kind of the generation in progress
  uint64_t gen;      // completed generations
  uint64_t slot[2][kWarpSize];  // shuffle values, double-buffered by generation parity
};

// A suspended execution context. On x86-64 a stack switch saves only the callee-saved registers
// (glibc's swapcontext also saves the signal mask, a system call per switch, which made barrier-heavy
// kernels ~30x slower); elsewhere ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp;
};

// Saves the callee-saved registers on the current stack and its pointer in from->sp, then resumes
// `to` (saved by an earlier call, or prepared by make_context).
__attribute__((naked, noinline)) inline void switch_context(Context* /*from*/, Context* /*to*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "movq %rsp, (%rdi)\n\tmovq (%rsi), %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}

// A context that starts `entry` (which never returns) on the stack [stack, stack + size).
inline void make_context(Context* c, void* stack, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top - 16);  // entry starts as if called: rsp % 16 == 8
  *sp = reinterpret_cast<void*>(entry);
  sp -= 6;  // the six registers switch_context pops
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  c->sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};

inline void switch_context(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }

inline void make_context(Context* c, void* stack, size_t size, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  void* stack;
  bool fresh;  // needs make_context before use (new, or abandoned by a failed launch)
};

struct Runtime {
  std::mutex mutex;  // one launch at a time (shared memory and the fibers are process-wide)
  Schedule schedule = Schedule::kInOrder;
  uint64_t seed = 0;
  std::mt19937_64 rng;
  cudaError_t last_error = cudaSuccess;
  std::string message;  // why the last failed launch failed

  // The launch and block in progress.
  void (*invoke)(const void*) = nullptr;
  const void* args = nullptr;
  int nthreads = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<int> order;
  size_t cursor = 0;
  int current = -1;
  int exited = 0;
  int block_arrived = 0;
  uint64_t block_gen = 0;
  bool failed = false;
  std::vector<unsigned char> dynamic_shared;
  unsigned char poison = 0xFF;

  std::vector<Fiber> fibers;
  std::vector<int> free_fibers;
  Context main_ctx;
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

// The built-in index variables of the running thread and block.
inline uint3 g_thread_idx, g_block_idx;
inline dim3 g_block_dim, g_grid_dim;

}  // namespace detail

// Threads and blocks in order, reversed, or shuffled (a fresh permutation per block and launch,
// from `seed`). Also picks the shared-memory poison: 0xFF bytes (NaN, -1), 0x7F bytes (large
// finite floats) or seeded random bytes.
inline void set_schedule(Schedule schedule, uint64_t seed) {
  detail::Runtime& r = detail::runtime();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.schedule = schedule;
  r.seed = seed;
  r.rng.seed(seed);
}

// The message of the last launch that failed (empty if none did).
inline std::string last_failure() {
  detail::Runtime& r = detail::runtime();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.message;
}

// The dynamic shared memory of the running block (the launch's shmem bytes). The emulated build
// rewrites `extern __shared__ T name[];` into a pointer initialised from this.
inline void* dynamic_shared_memory() { return detail::runtime().dynamic_shared.data(); }

namespace detail {

extern "C" unsigned char __start_nk_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_nk_emu_shared[] __attribute__((weak, visibility("hidden")));

inline void set_thread(Runtime& r, int t) {
  r.current = t;
  const unsigned bx = g_block_dim.x, by = g_block_dim.y;
  g_thread_idx = uint3{t % bx, (t / bx) % by, t / (bx * by)};
}

[[noreturn]] inline void fail(const std::string& what) {
  Runtime& r = runtime();
  if (!r.failed) {
    r.failed = true;
    r.message = what + " (block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) +
                "," + std::to_string(g_block_idx.z) + "), thread " + std::to_string(r.current) + ")";
  }
  Context abandoned;
  switch_context(&abandoned, &r.main_ctx);
  __builtin_unreachable();
}

inline bool runnable(const Runtime& r, int i) {
  const Thread& t = r.threads[i];
  if (t.state == State::kNotStarted) return true;
  if (t.state != State::kBlocked) return false;
  if (t.wait == Sync::kBlock) return r.block_gen > t.wait_gen;
  return r.warps[i / kWarpSize].gen > t.wait_gen;
}

// The next runnable thread after the cursor in schedule order, or -1 when none is.
inline int pick_next(Runtime& r) {
  const size_t n = r.order.size();
  for (size_t step = 1; step <= n; ++step) {
    const size_t at = (r.cursor + step) % n;
    const int t = r.order[at];
    if (runnable(r, t)) {
      r.cursor = at;
      return t;
    }
  }
  return -1;
}

inline std::string waiting_summary(const Runtime& r) {
  int block = 0, warp = 0;
  for (const Thread& t : r.threads) {
    if (t.state != State::kBlocked) continue;
    (t.wait == Sync::kBlock ? block : warp) += 1;
  }
  return std::to_string(block) + " threads wait at __syncthreads, " + std::to_string(warp) +
         " at a warp operation, " + std::to_string(r.exited) + " exited";
}

void fiber_main();

inline int acquire_fiber(Runtime& r) {
  if (r.free_fibers.empty()) {
    Fiber f{};
    const size_t page = 4096;
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      fprintf(stderr, "cuda_emulation: cannot allocate a fiber stack\n");
      abort();
    }
    mprotect(mem, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    f.stack = static_cast<unsigned char*>(mem) + page;
    f.fresh = true;
    r.fibers.push_back(f);
    r.free_fibers.push_back(static_cast<int>(r.fibers.size()) - 1);
  }
  const int id = r.free_fibers.back();
  r.free_fibers.pop_back();
  Fiber& f = r.fibers[id];
  if (f.fresh) {
    make_context(&f.ctx, f.stack, kStackBytes, fiber_main);
    f.fresh = false;
  }
  return id;
}

// Leaves fiber `self` (blocked, or free when its thread is done) for the next runnable thread, or
// for the launch when the block is complete; fails on a deadlock. Returns when `self` is resumed,
// with r.current the thread it is to run (its own, or a new one when it was free).
inline void switch_next(Runtime& r, int self, bool self_free) {
  const int t = pick_next(r);
  if (t < 0) {
    if (r.exited != r.nthreads) fail("deadlock: " + waiting_summary(r));
    if (self_free) r.free_fibers.push_back(self);
    switch_context(&r.fibers[self].ctx, &r.main_ctx);
    return;
  }
  Thread& next = r.threads[t];
  set_thread(r, t);
  const bool start = next.state == State::kNotStarted;
  next.state = State::kRunning;
  next.wait = Sync::kNone;
  if (start && self_free) {  // run it on this fiber, no switch
    next.fiber = self;
    return;
  }
  if (start) next.fiber = acquire_fiber(r);
  if (self_free) r.free_fibers.push_back(self);
  if (next.fiber != self) switch_context(&r.fibers[self].ctx, &r.fibers[next.fiber].ctx);
}

inline void fiber_main() {
  Runtime& r = runtime();
  for (;;) {
    const int t = r.current;
    r.invoke(r.args);
    Thread& me = r.threads[t];
    me.state = State::kDone;
    ++r.exited;
    Warp& w = r.warps[t / kWarpSize];
    w.exited |= 1u << (t % kWarpSize);
    if (r.block_arrived > 0) fail("a thread exited while others wait at __syncthreads (divergent barrier)");
    if (w.arrived > 0) fail("a lane exited while its warp waits in a warp operation");
    switch_next(r, me.fiber, /*self_free=*/true);
  }
}

// Blocks the running thread until the barrier generation `gen` of its kind completes.
inline void block_on(Runtime& r, Sync kind, uint64_t gen) {
  Thread& me = r.threads[r.current];
  me.state = State::kBlocked;
  me.wait = kind;
  me.wait_gen = gen;
  const int self = me.fiber;
  switch_next(r, self, /*self_free=*/false);
  // Resumed: runnable() held, so the generation completed. The scheduler set r.current to us.
}

inline void syncthreads() {
  Runtime& r = runtime();
  if (r.exited > 0) fail("__syncthreads after " + std::to_string(r.exited) + " threads of the block exited (divergent barrier)");
  const uint64_t gen = r.block_gen;
  if (++r.block_arrived == r.nthreads) {
    r.block_arrived = 0;
    ++r.block_gen;
  }
  block_on(r, Sync::kBlock, gen);
}

// A warp-wide rendezvous of kind `kind`; stores `bits` as this lane's value and returns the
// generation's buffer index once every lane has arrived.
inline int warp_sync(Sync kind, uint32_t mask, uint64_t bits) {
  Runtime& r = runtime();
  const int lane = r.current % kWarpSize;
  Warp& w = r.warps[r.current / kWarpSize];
  if ((mask & w.lanes) != w.lanes)
    fail("warp operation with a partial mask (only full warps are emulated)");
  if (w.exited) fail("warp operation while a lane of the warp has exited");
  if (w.arrived > 0 && w.kind != kind) fail("lanes of a warp in different warp operations");
  const uint64_t gen = w.gen;
  const int buf = static_cast<int>(gen & 1);
  w.kind = kind;
  w.slot[buf][lane] = bits;
  if (++w.arrived == __builtin_popcount(w.lanes)) {
    w.arrived = 0;
    ++w.gen;
  }
  block_on(r, kind, gen);
  return buf;
}

template <typename T>
inline T shuffle(uint32_t mask, T v, int width, int (*source)(int lane, int arg, int width), int arg) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a 1-8 byte value");
  if (width <= 0 || width > kWarpSize || (width & (width - 1)))
    fail("shuffle width must be a power of two in [1, 32]");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  const int buf = warp_sync(Sync::kShuffle, mask, bits);
  Runtime& r = runtime();
  const int lane = r.current % kWarpSize;
  const int src = source(lane, arg, width);
  const Warp& w = r.warps[r.current / kWarpSize];
  if (!(w.lanes >> src & 1u)) fail("shuffle from a lane that does not exist");
  T out;
  memcpy(&out, &w.slot[buf][src], sizeof(T));
  return out;
}

inline void poison_shared(Runtime& r) {
  unsigned char* lo = __start_nk_emu_shared;
  unsigned char* hi = __stop_nk_emu_shared;
  if (r.schedule == Schedule::kShuffled) {
    for (unsigned char* p = lo; p && p < hi; ++p) *p = static_cast<unsigned char>(r.rng());
    for (unsigned char& b : r.dynamic_shared) b = static_cast<unsigned char>(r.rng());
  } else {
    if (lo) memset(lo, r.poison, static_cast<size_t>(hi - lo));
    memset(r.dynamic_shared.data(), r.poison, r.dynamic_shared.size());
  }
}

// Runs one block to completion (or failure).
inline void run_block(Runtime& r) {
  for (Thread& t : r.threads) t = Thread{State::kNotStarted, Sync::kNone, 0, -1};
  for (size_t w = 0; w < r.warps.size(); ++w) {
    const int n = std::min<int>(kWarpSize, r.nthreads - static_cast<int>(w) * kWarpSize);
    r.warps[w] = Warp{};
    r.warps[w].lanes = n == kWarpSize ? 0xFFFFFFFFu : ((1u << n) - 1u);
  }
  if (r.schedule == Schedule::kShuffled) std::shuffle(r.order.begin(), r.order.end(), r.rng);
  r.cursor = r.order.size() - 1;  // pick_next starts at order[0]
  r.exited = 0;
  r.block_arrived = 0;
  r.block_gen = 0;
  poison_shared(r);
  const int t = pick_next(r);
  Thread& first = r.threads[t];
  set_thread(r, t);
  first.state = State::kRunning;
  first.fiber = acquire_fiber(r);
  switch_context(&r.main_ctx, &r.fibers[first.fiber].ctx);
}

inline cudaError_t run(dim3 grid, dim3 block, size_t shmem, void (*invoke)(const void*), const void* args) {
  Runtime& r = runtime();
  std::lock_guard<std::mutex> lock(r.mutex);
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535 ||
      nthreads == 0 || nthreads > kMaxThreadsPerBlock || block.z > 64 || shmem > kMaxSharedBytes) {
    r.message = "invalid launch configuration";
    return r.last_error = cudaErrorInvalidConfiguration;
  }
  r.invoke = invoke;
  r.args = args;
  r.nthreads = static_cast<int>(nthreads);
  r.threads.assign(nthreads, Thread{});
  r.warps.assign((nthreads + kWarpSize - 1) / kWarpSize, Warp{});
  r.order.resize(nthreads);
  for (int i = 0; i < r.nthreads; ++i) {
    r.order[i] = r.schedule == Schedule::kReversed ? r.nthreads - 1 - i : i;
  }
  r.dynamic_shared.assign(shmem, 0);
  r.poison = r.schedule == Schedule::kReversed ? 0x7F : 0xFF;
  r.failed = false;
  g_block_dim = block;
  g_grid_dim = grid;

  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> block_order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) block_order[b] = r.schedule == Schedule::kReversed ? blocks - 1 - b : b;
  if (r.schedule == Schedule::kShuffled) std::shuffle(block_order.begin(), block_order.end(), r.rng);
  for (const uint64_t b : block_order) {
    g_block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                        static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    run_block(r);
    if (r.failed) break;
  }
  r.invoke = nullptr;
  if (!r.failed) return cudaSuccess;
  // The fibers of a failed launch were abandoned mid-kernel: rebuild them before reuse.
  r.free_fibers.clear();
  for (size_t i = 0; i < r.fibers.size(); ++i) {
    r.fibers[i].fresh = true;
    r.free_fibers.push_back(static_cast<int>(i));
  }
  return r.last_error = cudaErrorLaunchFailure;
}

template <typename... P>
struct Launch {
  dim3 grid, block;
  size_t shmem;
  void (*kernel)(P...);

  // kernel<<<...>>>(args): arguments convert to the parameter types as at a real launch; every
  // thread calls the kernel with its own copies.
  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    struct Call {
      void (*kernel)(P...);
      std::tuple<P...> args;
    } call{kernel, std::tuple<P...>(std::forward<A>(a)...)};
    run(grid, block, shmem, [](const void* c) {
      const Call& k = *static_cast<const Call*>(c);
      std::apply(k.kernel, k.args);
    }, &call);
  }
};

}  // namespace detail

template <typename... P>
detail::Launch<P...> launch(dim3 grid, dim3 block, size_t shmem, cudaStream_t, void (*kernel)(P...)) {
  return detail::Launch<P...>{grid, block, shmem, kernel};
}

}  // namespace cuda_emulation

#define threadIdx (static_cast<const uint3&>(::cuda_emulation::detail::g_thread_idx))
#define blockIdx (static_cast<const uint3&>(::cuda_emulation::detail::g_block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_emulation::detail::g_block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_emulation::detail::g_grid_dim))
constexpr int warpSize = 32;

inline cudaError_t cudaGetLastError() {
  auto& r = ::cuda_emulation::detail::runtime();
  std::lock_guard<std::mutex> lock(r.mutex);
  const cudaError_t e = r.last_error;
  r.last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

// Streams are in order and the emulation is synchronous: async calls complete before returning.
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes && !p) return cudaErrorInvalidValue;
  memset(p, value, bytes);
  return cudaSuccess;
}

// ---- synchronisation and warp intrinsics ---------------------------------------------------

inline void __syncthreads() { ::cuda_emulation::detail::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  ::cuda_emulation::detail::warp_sync(::cuda_emulation::detail::Sync::kSyncwarp, mask, 0);
}

// Source lanes as CUDA documents them for each mode and width: idx wraps within the lane's
// segment of `width` lanes; up, down and xor read their own value instead of a later segment's.
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  return ::cuda_emulation::detail::shuffle(mask, v, width, [](int lane, int s, int w) {
    return (lane & ~(w - 1)) + (s & (w - 1));
  }, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::cuda_emulation::detail::shuffle(mask, v, width, [](int lane, int d, int w) {
    return (lane & (w - 1)) >= d ? lane - d : lane;
  }, static_cast<int>(delta));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::cuda_emulation::detail::shuffle(mask, v, width, [](int lane, int d, int w) {
    return (lane & (w - 1)) + d < w ? lane + d : lane;
  }, static_cast<int>(delta));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return ::cuda_emulation::detail::shuffle(mask, v, width, [](int lane, int m, int w) {
    const int src = lane ^ m;
    return src < (lane & ~(w - 1)) + w ? src : lane;
  }, lane_mask);
}

// ---- atomics: fibers switch only at barriers, so a read-modify-write is atomic here --------

#define NK_EMU_ATOMIC(name, T, expr) \
  inline T name(T* address, T val) {   \
    const T old = *address;            \
    *address = (expr);                 \
    return old;                        \
  }
NK_EMU_ATOMIC(atomicAdd, int, old + val)
NK_EMU_ATOMIC(atomicAdd, unsigned int, old + val)
NK_EMU_ATOMIC(atomicAdd, unsigned long long, old + val)
NK_EMU_ATOMIC(atomicAdd, float, old + val)
NK_EMU_ATOMIC(atomicAdd, double, old + val)
NK_EMU_ATOMIC(atomicMin, int, val < old ? val : old)
NK_EMU_ATOMIC(atomicMin, unsigned int, val < old ? val : old)
NK_EMU_ATOMIC(atomicMin, long long, val < old ? val : old)
NK_EMU_ATOMIC(atomicMin, unsigned long long, val < old ? val : old)
NK_EMU_ATOMIC(atomicMax, int, val > old ? val : old)
NK_EMU_ATOMIC(atomicMax, unsigned int, val > old ? val : old)
NK_EMU_ATOMIC(atomicMax, long long, val > old ? val : old)
NK_EMU_ATOMIC(atomicMax, unsigned long long, val > old ? val : old)
NK_EMU_ATOMIC(atomicExch, int, val)
NK_EMU_ATOMIC(atomicExch, unsigned int, val)
NK_EMU_ATOMIC(atomicExch, float, val)
#undef NK_EMU_ATOMIC

#define NK_EMU_ATOMIC_CAS(T)                                 \
  inline T atomicCAS(T* address, T compare, T val) {         \
    const T old = *address;                                  \
    *address = old == compare ? val : old;                   \
    return old;                                              \
  }
NK_EMU_ATOMIC_CAS(int)
NK_EMU_ATOMIC_CAS(unsigned int)
NK_EMU_ATOMIC_CAS(unsigned long long)
#undef NK_EMU_ATOMIC_CAS

// ---- arithmetic intrinsics (the build has -ffp-contract=off: nothing fuses) -----------------

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned int>(i)); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }

// ---- half and bfloat16: storage types with round-to-nearest-even conversions ----------------

namespace cuda_emulation::detail {

// float -> binary16, round to nearest even; NaN -> the quiet NaN 0x7E00 (sign kept).
inline uint16_t float_to_half_bits(float f) {
  uint32_t x = __float_as_uint(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint32_t o;
  if (x >= 0x47800000u) {  // >= 65536, inf or NaN
    o = x > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (x < 0x38800000u) {  // below the smallest normal half: align the mantissa by an add
    const uint32_t magic = (127u - 15u + 23u - 10u + 1u) << 23;
    o = __float_as_uint(__uint_as_float(x) + __uint_as_float(magic)) - magic;
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    x += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + odd;  // rebias, round half to even
    o = x >> 13;  // a carry out of the mantissa correctly reaches inf
  }
  return static_cast<uint16_t>((sign >> 16) | o);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return __uint_as_float(sign | 0x7F800000u | (m << 13));
  if (e == 0) return __uint_as_float(sign | __float_as_uint(static_cast<float>(m) * 5.9604644775390625e-8f));
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// float -> bfloat16, round to nearest even; NaN stays a quiet NaN.
inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace cuda_emulation::detail

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(::cuda_emulation::detail::float_to_half_bits(f)) {}
  operator float() const { return ::cuda_emulation::detail::half_bits_to_float(__x); }
};

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(::cuda_emulation::detail::float_to_bfloat16_bits(f)) {}
  operator float() const { return __uint_as_float(static_cast<uint32_t>(__x) << 16); }
};

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

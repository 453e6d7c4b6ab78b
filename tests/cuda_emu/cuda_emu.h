// A CPU stand-in for the small part of CUDA that csrc/attention_cuda.cu uses, so that the
// kernels' own source can run (slowly) on machines without a GPU.
//
// csrc/attention_cuda.cu includes this file instead of the CUDA runtime headers when it is
// compiled by a host compiler with -DSEEKR_CUDA_EMULATE='"cuda_emu.h"' (see
// tests/test_native_cuda.py). A launch runs the grid's blocks one after another; a block's
// 128 CUDA threads are either
//   * fibers (default): ucontext coroutines on the calling thread, switched at every
//     __syncthreads() and warp shuffle, so the run is deterministic and cheap even on a busy
//     machine; or
//   * OS threads (-DSEEKR_EMU_THREADS): truly concurrent between barriers (std::barrier), so
//     ThreadSanitizer sees a missing __syncthreads() as a data race (race_check.cpp).
// Either way __syncthreads() is a barrier of the block's threads and a warp shuffle exchanges
// values through a barrier of the warp's 32 threads, so the kernels' synchronisation is
// exercised as written. __shared__ variables become function statics (one block runs at a
// time); dynamic shared memory is a heap buffer filled with 0xFF bytes (NaN, -1) before each
// block, so reads of data no thread wrote show up. "Device" memory is host memory: the
// pointers are CPU tensors' data pointers.
//
// What it cannot show: compilation for real GPUs (nvcc does that), timing, coalescing, bank
// conflicts, and behaviour that depends on real warp scheduling.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <ucontext.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

// The CUDA headers define these for their own host/device split; give them host meanings.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

namespace seekr_emu {

constexpr int kMaxThreads = 1024;

inline thread_local uint3 t_thread{0, 0, 0};
inline thread_local uint3 t_block{0, 0, 0};

struct State {
  int nthreads = 0;
  unsigned char slots[kMaxThreads][8];   // shuffle exchange, one slot per thread
  unsigned char* dyn = nullptr;
#ifdef SEEKR_EMU_THREADS
  std::barrier<>* block_bar = nullptr;
  std::vector<std::barrier<>*> warp_bars;
#else
  // Fibers: a barrier is (arrivals, generation); a waiting fiber yields to the scheduler
  // until the generation moves on.
  ucontext_t sched;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<char> done;
  int current = 0;
  int block_count = 0;
  unsigned block_gen = 0;
  int warp_count[kMaxThreads / 32] = {};
  unsigned warp_gen[kMaxThreads / 32] = {};
  unsigned long progress = 0;
#endif
};

inline State& state() {
  static State s;
  return s;
}

#ifndef SEEKR_EMU_THREADS
inline void fiber_barrier(int& count, unsigned& gen, int n) {
  State& s = state();
  const unsigned mine = gen;
  ++s.progress;
  if (++count == n) {   // the last arrival releases the others and runs on
    count = 0;
    ++gen;
    return;
  }
  while (gen == mine) swapcontext(&s.ctx[s.current], &s.sched);
}
#endif

inline void block_barrier() {
  State& s = state();
#ifdef SEEKR_EMU_THREADS
  s.block_bar->arrive_and_wait();
#else
  fiber_barrier(s.block_count, s.block_gen, s.nthreads);
#endif
}

inline void warp_barrier(int warp) {
  State& s = state();
#ifdef SEEKR_EMU_THREADS
  s.warp_bars[warp]->arrive_and_wait();
#else
  fiber_barrier(s.warp_count[warp], s.warp_gen[warp], 32);
#endif
}

}  // namespace seekr_emu

// CUDA builtins as thread-local variables of the emulating threads (set on every fiber switch).
#define threadIdx (::seekr_emu::t_thread)
#define blockIdx (::seekr_emu::t_block)

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline void __syncthreads() { seekr_emu::block_barrier(); }

inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

namespace seekr_emu {
template <class T>
T shfl_from(T v, int src_lane, bool in_range) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  State& s = state();
  const int tid = static_cast<int>(t_thread.x);
  const int warp = tid / 32;
  std::memcpy(s.slots[tid], &v, sizeof(T));
  warp_barrier(warp);
  T r = v;
  if (in_range) std::memcpy(&r, s.slots[warp * 32 + src_lane], sizeof(T));
  warp_barrier(warp);   // nobody overwrites a slot before it is read
  return r;
}
}  // namespace seekr_emu

template <class T>
T __shfl_xor_sync(unsigned, T v, int o) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  return seekr_emu::shfl_from(v, lane ^ o, true);
}

template <class T>
T __shfl_up_sync(unsigned, T v, unsigned o) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int src = lane - static_cast<int>(o);
  return seekr_emu::shfl_from(v, src < 0 ? lane : src, src >= 0);
}

// x86 tolerates misaligned vector loads, a GPU does not ("misaligned address"): check them.
#define SEEKR_CHECK_ALIGNED(ptr, bytes)                                                      \
  do {                                                                                       \
    if (reinterpret_cast<std::uintptr_t>(ptr) % (bytes) != 0) {                              \
      std::fprintf(stderr, "cuda_emu: misaligned %d-byte vector load at %p (%s:%d)\n",        \
                   static_cast<int>(bytes), static_cast<const void*>(ptr), __FILE__, __LINE__); \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

inline unsigned __ballot_sync(unsigned, bool pred) {
  seekr_emu::State& s = seekr_emu::state();
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  s.slots[tid][0] = pred ? 1 : 0;
  seekr_emu::warp_barrier(warp);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (s.slots[warp * 32 + l][0]) r |= 1u << l;
  seekr_emu::warp_barrier(warp);
  return r;
}

inline int __ffs(int x) { return __builtin_ffs(x); }

#define SEEKR_DYNAMIC_SMEM(name) unsigned char* name = ::seekr_emu::state().dyn

// ---- runtime API ----------------------------------------------------------------------------

// Types and enums (cudaError_t, cudaStream_t, cudaFuncAttributes, ...) come from the
// toolkit's driver_types.h, which cuda_fp16.h includes; only the functions are stand-ins.
namespace seekr_emu {
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
// The emulated GPU: an H100-sized shared-memory limit, so the host-side checks match.
constexpr int kOptinSmem = 227 * 1024;
}  // namespace seekr_emu

inline const char* cudaGetErrorString(cudaError_t e) { return e ? "emulated CUDA error" : "no error"; }
inline const char* cudaGetErrorName(cudaError_t e) { return e ? "cudaErrorEmulated" : "cudaSuccess"; }
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = seekr_emu::last_error();
  seekr_emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = seekr_emu::kOptinSmem;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F*) { a->sharedSizeBytes = 4096; return cudaSuccess; }
template <class F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int v) {
  return v <= seekr_emu::kOptinSmem ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaMalloc(void* p, std::size_t n) {
  *static_cast<void**>(p) = std::calloc(1, n);
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, std::size_t n, cudaStream_t) {
  // Garbage, like real fresh device memory: the kernels must write before they read.
  *p = std::malloc(n ? n : 1);
  std::memset(*p, 0xFF, n);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, std::size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, std::size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return cudaSuccess; }

namespace seekr_emu {

inline bool bad_launch(int block, std::size_t smem) {
  if (block < 32 || block % 32 != 0 || block > kMaxThreads || smem > static_cast<std::size_t>(kOptinSmem)) {
    last_error() = cudaErrorInvalidValue;
    return true;
  }
  return false;
}

// Shared memory of a fresh block: garbage (0xFF bytes: NaN for floats, -1 for ints), so the
// tests catch reads of data no thread wrote for this block.
inline void poison(std::size_t smem) { std::memset(state().dyn, 0xFF, smem); }

#ifdef SEEKR_EMU_THREADS

// Run kernel(arg) over the grid: blocks in order, `block` OS threads each.
template <class Arg>
void launch(void (*kernel)(Arg), dim3 grid, int block, std::size_t smem, const Arg& arg) {
  if (bad_launch(block, smem)) return;
  State& s = state();
  std::barrier<> block_bar(block);
  std::vector<std::barrier<>*> warps;
  for (int w = 0; w < block / 32; ++w) warps.push_back(new std::barrier<>(32));
  std::vector<unsigned char> dyn(smem + 16);
  s.nthreads = block;
  s.block_bar = &block_bar;
  s.warp_bars = warps;
  s.dyn = dyn.data() + (16 - reinterpret_cast<std::uintptr_t>(dyn.data()) % 16) % 16;
  auto body = [&](int tid) {
    t_thread = uint3{static_cast<unsigned>(tid), 0, 0};
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        if (tid == 0) poison(smem);
        block_bar.arrive_and_wait();
        t_block = uint3{bx, by, 0};
        kernel(arg);
        block_bar.arrive_and_wait();
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < block; ++t) threads.emplace_back(body, t);
  for (auto& t : threads) t.join();
  for (auto* w : warps) delete w;
  s.block_bar = nullptr;
}

#else

struct FiberJob {
  void (*run)(const void* job);
  const void* job;
};
inline FiberJob& fiber_job() {
  static FiberJob j;
  return j;
}

inline void fiber_main(int tid) {
  State& s = state();
  t_thread = uint3{static_cast<unsigned>(tid), 0, 0};
  fiber_job().run(fiber_job().job);
  s.done[tid] = 1;
  // Returning resumes uc_link, the scheduler.
}

// Run kernel(arg) over the grid: blocks in order, `block` fibers each, scheduled round robin
// from this thread. A round in which no fiber arrives at a barrier or finishes is a deadlock
// (e.g. a __syncthreads() that not every thread reaches): abort with a message.
template <class Arg>
void launch(void (*kernel)(Arg), dim3 grid, int block, std::size_t smem, const Arg& arg) {
  if (bad_launch(block, smem)) return;
  State& s = state();
  constexpr std::size_t kStack = 256 * 1024;
  std::vector<unsigned char> dyn(smem + 16);
  s.nthreads = block;
  s.dyn = dyn.data() + (16 - reinterpret_cast<std::uintptr_t>(dyn.data()) % 16) % 16;
  s.ctx.assign(block, ucontext_t{});
  s.stacks.resize(block);
  for (auto& st : s.stacks) st.resize(kStack);
  s.done.assign(block, 0);
  struct Job {
    void (*kernel)(Arg);
    const Arg* arg;
  } job{kernel, &arg};
  fiber_job() = FiberJob{[](const void* j) {
                           const Job* jb = static_cast<const Job*>(j);
                           jb->kernel(*jb->arg);
                         },
                         &job};
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      poison(smem);
      t_block = uint3{bx, by, 0};
      s.block_count = 0;
      for (auto& c : s.warp_count) c = 0;
      for (int t = 0; t < block; ++t) {
        s.done[t] = 0;
        getcontext(&s.ctx[t]);
        s.ctx[t].uc_stack.ss_sp = s.stacks[t].data();
        s.ctx[t].uc_stack.ss_size = kStack;
        s.ctx[t].uc_link = &s.sched;
        makecontext(&s.ctx[t], reinterpret_cast<void (*)()>(&fiber_main), 1, t);
      }
      for (;;) {
        bool all_done = true;
        const unsigned long before = s.progress;
        int finished = 0;
        for (int t = 0; t < block; ++t) {
          if (s.done[t]) continue;
          s.current = t;
          t_thread = uint3{static_cast<unsigned>(t), 0, 0};
          swapcontext(&s.sched, &s.ctx[t]);
          if (s.done[t]) ++finished;
          else all_done = false;
        }
        if (all_done) break;
        if (s.progress == before && finished == 0) {
          std::fprintf(stderr, "cuda_emu: deadlock in block (%u, %u): threads wait on barriers "
                               "that not every thread reaches\n", bx, by);
          std::abort();
        }
      }
    }
  }
}

#endif

}  // namespace seekr_emu

#define SEEKR_LAUNCH(kernel, grid, block, smem, stream, arg) ::seekr_emu::launch(kernel, grid, block, smem, arg)

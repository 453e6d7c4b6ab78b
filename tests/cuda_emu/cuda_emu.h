// A CPU stand-in for the small part of CUDA that csrc/attention_cuda.cu uses, so that the
// kernels' own source can run (slowly) on machines without a GPU.
//
// csrc/attention_cuda.cu includes this file instead of the CUDA runtime headers when it is
// compiled by a host compiler with -DSEEKR_CUDA_EMULATE='"cuda_emu.h"' (see
// tests/test_native_cuda.py). Each launch runs the grid's blocks one after another on
// 128 OS threads (one per CUDA thread): __syncthreads() is a barrier of the block's
// threads and warp shuffles exchange values through a barrier of the warp's 32 threads,
// so the kernels' synchronisation is exercised as written. __shared__ variables become
// function statics (one block runs at a time), dynamic shared memory is a heap buffer that
// is poisoned with NaN/garbage before each block so reads of never-written data show up.
// "Device" memory is host memory: pointers are CPU tensors' data pointers.
//
// What it cannot show: compilation for real GPUs (nvcc does that), timing, coalescing, bank
// conflicts, and races between threads that the barriers happen to order here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

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

struct State {
  int nthreads = 0;
  std::barrier<>* block_bar = nullptr;
  std::vector<std::barrier<>*> warp_bars;
  unsigned char slots[kMaxThreads][8];   // shuffle exchange, one slot per thread
  unsigned char* dyn = nullptr;
};

inline State& state() {
  static State s;
  return s;
}

inline thread_local uint3 t_thread{0, 0, 0};
inline thread_local uint3 t_block{0, 0, 0};

}  // namespace seekr_emu

// CUDA builtins as thread-local variables of the emulating threads.
#define threadIdx (::seekr_emu::t_thread)
#define blockIdx (::seekr_emu::t_block)

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline void __syncthreads() { seekr_emu::state().block_bar->arrive_and_wait(); }

inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

namespace seekr_emu {
template <class T>
T shfl_from(T v, int src_lane, bool in_range) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  State& s = state();
  const int tid = static_cast<int>(t_thread.x);
  const int warp = tid / 32;
  std::memcpy(s.slots[tid], &v, sizeof(T));
  s.warp_bars[warp]->arrive_and_wait();
  T r = v;
  if (in_range) std::memcpy(&r, s.slots[warp * 32 + src_lane], sizeof(T));
  s.warp_bars[warp]->arrive_and_wait();   // nobody overwrites a slot before it is read
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
  s.warp_bars[warp]->arrive_and_wait();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (s.slots[warp * 32 + l][0]) r |= 1u << l;
  s.warp_bars[warp]->arrive_and_wait();
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

// Run kernel(arg) over the grid: blocks in order, `block` threads each.
template <class Arg>
void launch(void (*kernel)(Arg), dim3 grid, int block, std::size_t smem, const Arg& arg) {
  if (block < 32 || block % 32 != 0 || block > kMaxThreads || smem > static_cast<std::size_t>(kOptinSmem)) {
    last_error() = cudaErrorInvalidValue;
    return;
  }
  State& s = state();
  std::barrier<> block_bar(block);
  std::vector<std::barrier<>*> warps;
  for (int w = 0; w < block / 32; ++w) warps.push_back(new std::barrier<>(32));
  std::vector<unsigned char> dyn(smem + 16);
  s.nthreads = block;
  s.block_bar = &block_bar;
  s.warp_bars = warps;
  s.dyn = dyn.data() + (16 - reinterpret_cast<std::uintptr_t>(dyn.data()) % 16) % 16;
  std::mutex err_mu;
  std::exception_ptr err;
  auto body = [&](int tid) {
    t_thread = uint3{static_cast<unsigned>(tid), 0, 0};
    try {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          if (tid == 0) {
            // Garbage (0xFF bytes: NaN for floats, -1 for ints) in shared memory, so the
            // tests catch reads of data no thread wrote for this block.
            std::memset(s.dyn, 0xFF, smem);
          }
          block_bar.arrive_and_wait();
          t_block = uint3{bx, by, 0};
          kernel(arg);
          block_bar.arrive_and_wait();
        }
      }
    } catch (...) {
      std::lock_guard<std::mutex> g(err_mu);
      if (!err) err = std::current_exception();
      std::abort();   // other threads would wait on the barriers forever
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < block; ++t) threads.emplace_back(body, t);
  for (auto& t : threads) t.join();
  for (auto* w : warps) delete w;
  s.block_bar = nullptr;
}

}  // namespace seekr_emu

#define SEEKR_LAUNCH(kernel, grid, block, smem, stream, arg) ::seekr_emu::launch(kernel, grid, block, smem, arg)

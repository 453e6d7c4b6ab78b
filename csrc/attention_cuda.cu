// CUDA C++ kernels of the fused attention ops (DESIGN.md §2): attention-KL forward and
// backward, and teacher capture (attention_probs). Plain CUDA (SIMT FMAs, shared-memory
// tiles, warp shuffles); no tensor cores, so fp32 inputs get exact fp32 products.
//
// Notation. Row r = (b, s, qi): head h = heads[b, s] (-1 = empty slot), query position
// i = queries[b, qi], z_j = scale * q[b, h, i] . k[b, h / G, j], valid keys
// V = {j <= i, key_mask[b, j] = 1}. A row is active iff h >= 0 and key_mask[b, i] = 1.
//
//   forward   lse = log sum_V exp z_j,  T = sum_V t_j,
//             KL  = sum_{V, t>0} t log t - sum_V t z + T lse          (teacher given)
//             KL  = tmass_in * lse                                     (no teacher)
//   backward  dz_j = g (T p_j - t_j), p_j = exp(z_j - lse)
//             dq[b,h,i]    = scale sum_rows-at-(h,i) sum_j dz_j k_j
//             dk[b,h/G,j]  = scale sum_rows-of-the-group dz_j q_row
//
// Kernels (128 threads = 4 warps; a row tile is kBM = 32 rows, 8 per warp; a thread holds
// a micro-tile of its warp's 8 rows x (one key per lane, or two for 64-key tiles)):
//
// * kl_fwd / probs: one block per (b*S + s, tile of 32 selected rows). Key tiles of 64 are
//   staged in shared memory up to the tile's last active query position (causal skip).
//   Each lane keeps its own online max/sum per row (and the teacher sums); lanes are merged
//   with shuffles once at the end, so the hot loop has no cross-lane traffic. probs makes a
//   second pass that writes exp(z - lse), and writes zeros past the horizon without compute.
// * kl_dqrows: same grid as the forward; recomputes p = exp(z - lse) tile by tile and writes
//   each row's dq (scale * sum_j dz_j k_j, accumulated in shared memory) to a [B, S, Q, D]
//   workspace. Row tiles follow the selected rows, so sparse query subsets cost what dense
//   ones do per row.
// * kl_dqgather: one block per (b*H + h, 32 positions) owns dq for those positions outright:
//   it scans queries[b, :] of the slots holding head h in q order and adds the rows whose
//   position falls in its tile (repeated positions add up in a fixed order); heads nobody
//   selected get zeros. No atomics.
// * kl_dk: one block per (b*Hkv + kvh, key tile of 32). It loops over the sample's slots whose
//   head reads kvh and over their row tiles that can see the key tile (max position >= first
//   key), accumulating dk in shared memory. Each dk element is owned by one block: no atomics.
//
// Determinism: every output element is written by exactly one thread, and every reduction
// runs in a fixed order, so results are bitwise reproducible run to run.
//
// Index checks: heads, queries and key_mask live on the device. The kernels check every value
// they read (heads in [-1, H), queries in [0, L), mask in {0, 1}); a bad value is never used
// to address memory (the row is treated as inactive) and sets a bit in a 4-byte device flag.
// The host clears the flag before the launches, copies it back after them and synchronises
// the stream once, then throws std::invalid_argument naming the argument. (The alternative,
// copying heads/queries/mask to the host before launching, would stall before any work
// starts and copy O(B*L) ints; the flag costs one 4-byte copy after the work.)

#include "attention_cuda.cuh"

#ifdef SEEKR_CUDA_EMULATE
// tests/cuda_emu: the same source compiled by a host compiler and run on CPU threads, so the
// kernels' logic is tested on machines without a GPU. It defines the two macros below.
#include SEEKR_CUDA_EMULATE
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SEEKR_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define SEEKR_LAUNCH(kernel, grid, block, smem, stream, arg) kernel<<<grid, block, smem, stream>>>(arg)
#define SEEKR_CHECK_ALIGNED(ptr, bytes) ((void)0)   // the emulation checks vector alignment
#endif

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace seekr_cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 32;               // rows per row tile (one per lane of warp 0 in setup)
constexpr int kRW = kBM / kWarps;     // rows per warp
constexpr int kDzS = kBM + 4;         // row stride of the dz tile: float4-aligned
constexpr int kFwdBN = 64;            // key tile of the forward / probs kernels
constexpr int kBwdBN = 32;            // key tile of the backward kernels (smaller smem)
static_assert(kBM == 32 && kRW == 8, "setup_rows and load8 assume 32-row tiles, 8 per warp");

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };
enum Flag : int { kBadHeads = 1, kBadQueries = 2, kBadMask = 4 };

struct Params {
  const void* q;
  const void* k;
  const void* teacher;   // nullptr: no teacher
  int tcode;
  const void* tm_in;     // forward without teacher: tmass per row (ACC)
  const int* heads;
  const int* queries;
  const int* kmask;
  void* rows;            // forward outputs (ACC)
  void* lse;
  void* tout;
  const void* lse_in;    // backward inputs (ACC)
  const void* t_in;
  const void* grad;
  void* dq;              // backward outputs (ACC)
  void* dk;
  void* ws;              // backward workspace: per-row dq [B, S, Q, D] (ACC)
  void* out;             // probs output, dtype code ocode
  int ocode;
  int B, H, Hkv, L, D, S, Q, G;
  int QS;                // row stride of the staged q tile: D rounded up to 8
  double scale;
  int* flag;
};

// ---- small device helpers ---------------------------------------------------------------

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double widen(double v) { return v; }

template <class ACC, class T>
__device__ __forceinline__ ACC load_in(const T* p, int64_t i) {
  return static_cast<ACC>(widen(p[i]));
}

// The teacher may have any float dtype (it is not converted, to save memory); the switch
// is uniform across the grid.
template <class ACC>
__device__ __forceinline__ ACC load_code(const void* p, int code, int64_t i) {
  switch (code) {
    case kF16: return static_cast<ACC>(__half2float(static_cast<const __half*>(p)[i]));
    case kBF16: return static_cast<ACC>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case kF64: return static_cast<ACC>(static_cast<const double*>(p)[i]);
    default: return static_cast<ACC>(static_cast<const float*>(p)[i]);
  }
}

__device__ __forceinline__ void store_code(void* p, int code, int64_t i, float v) {
  switch (code) {
    case kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case kF64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// From double directly (no double rounding through float), like torch's .to().
__device__ __forceinline__ void store_code(void* p, int code, int64_t i, double v) {
  switch (code) {
    case kF16: static_cast<__half*>(p)[i] = __double2half(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __double2bfloat16(v); break;
    case kF64: static_cast<double*>(p)[i] = v; break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v); break;
  }
}

// Accurate (not __expf) versions: the results are compared with the fp32 torch reference.
__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }

template <class ACC>
__device__ __forceinline__ ACC neg_inf() { return -static_cast<ACC>(INFINITY); }

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Four consecutive values from 16-byte-aligned shared memory (one or two vector loads).
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  SEEKR_CHECK_ALIGNED(p, 16);
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  SEEKR_CHECK_ALIGNED(p, 16);
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 c = *reinterpret_cast<const double2*>(p + 2);
  v[0] = a.x; v[1] = a.y; v[2] = c.x; v[3] = c.y;
}
template <class ACC>
__device__ __forceinline__ void load8(const ACC* p, ACC (&v)[8]) {
  ACC a[4], c[4];
  load4(p, a);
  load4(p + 4, c);
#pragma unroll
  for (int e = 0; e < 4; ++e) { v[e] = a[e]; v[e + 4] = c[e]; }
}

// Online log-sum-exp of one element: (m, l) represents l * exp(m). One exp per element;
// starts from m = -inf, l = 0 (exp(-inf) = 0, so no NaN).
template <class ACC>
__device__ __forceinline__ void online_add(ACC z, ACC& m, ACC& l) {
  if (z > m) {
    l = l * ex(m - z) + static_cast<ACC>(1);
    m = z;
  } else {
    l += ex(z - m);
  }
}

// Merge the lanes' (m, l) of one row into lse; every lane gets the result. Only called
// for active rows, whose own diagonal key is always valid (l > 0 somewhere).
template <class ACC>
__device__ __forceinline__ ACC warp_lse(ACC m, ACC l) {
  const ACC M = warp_max(m);
  const ACC part = (m == neg_inf<ACC>()) ? static_cast<ACC>(0) : l * ex(m - M);
  const ACC sum = warp_sum(part);
  return (sum > static_cast<ACC>(0)) ? M + lg(sum) : static_cast<ACC>(0);
}

__host__ __device__ constexpr int round4(int n) { return (n + 3) & ~3; }

// Rows m0..m0+31 of one slot (warp 0, one row per lane): position, active flag, and the
// tile's causal horizon hi = 1 + max active position (0: nothing to compute). Validates
// every query position and mask value it reads. Callers __syncthreads() afterwards.
__device__ __forceinline__ void setup_rows(const Params& p, int b, int h, int m0, int* s_pos,
                                           int* s_act, int* s_hi) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  const int qi = m0 + lane;
  int pos = 0, act = 0;
  if (qi < p.Q) {
    const int v = p.queries[static_cast<int64_t>(b) * p.Q + qi];
    if (v < 0 || v >= p.L) {
      atomicOr(p.flag, kBadQueries);
    } else {
      pos = v;
      if (h >= 0) {
        const int m = p.kmask[static_cast<int64_t>(b) * p.L + pos];
        if (m != 0 && m != 1) atomicOr(p.flag, kBadMask);
        act = (m != 0);
      }
    }
  }
  s_pos[lane] = pos;
  s_act[lane] = act;
  const int hi = warp_max(act ? pos + 1 : 0);
  if (lane == 0) *s_hi = hi;
}

// Head of slot bs, validated: out-of-range values raise the flag and read as -1 (empty).
__device__ __forceinline__ int slot_head(const Params& p, int bs) {
  const int h = p.heads[bs];
  if (h < -1 || h >= p.H) {
    if (threadIdx.x == 0) atomicOr(p.flag, kBadHeads);
    return -1;
  }
  return h;
}

// Stage the q rows of a row tile in natural layout Qn[r * QS + d] (zeros for inactive rows
// and for the padding d in [D, QS)). Global reads are coalesced along d.
template <class TIN, class ACC>
__device__ __forceinline__ void load_q_tile(const Params& p, int b, int h, const int* s_pos,
                                            const int* s_act, ACC* Qn) {
  const TIN* qb = static_cast<const TIN*>(p.q) +
                  (static_cast<int64_t>(b) * p.H + h) * p.L * static_cast<int64_t>(p.D);
  const int QS = p.QS;
  for (int idx = threadIdx.x; idx < kBM * QS; idx += kThreads) {
    const int r = idx / QS;
    const int d = idx - r * QS;
    ACC v = static_cast<ACC>(0);
    if (d < p.D && s_act[r]) v = load_in<ACC>(qb, static_cast<int64_t>(s_pos[r]) * p.D + d);
    Qn[idx] = v;
  }
}

// Stage keys n0..n0+BN-1 of kv head kvh transposed, Kt[d * (BN + 1) + j]: the odd row
// stride makes both the transposed stores and the per-lane reads bank-conflict free.
// Rows d >= D and keys past L are zeros; s_kok[j] = key is a real token.
template <class TIN, class ACC, int BN>
__device__ __forceinline__ void load_k_tile(const Params& p, int b, int kvh, int n0, ACC* Kt,
                                            int* s_kok) {
  constexpr int KS = BN + 1;
  const TIN* kb = static_cast<const TIN*>(p.k) +
                  (static_cast<int64_t>(b) * p.Hkv + kvh) * p.L * static_cast<int64_t>(p.D);
  const int QS = p.QS;
  for (int idx = threadIdx.x; idx < BN * QS; idx += kThreads) {
    const int j = idx / QS;
    const int d = idx - j * QS;
    const int n = n0 + j;
    ACC v = static_cast<ACC>(0);
    if (d < p.D && n < p.L) v = load_in<ACC>(kb, static_cast<int64_t>(n) * p.D + d);
    Kt[d * KS + j] = v;
  }
  if (threadIdx.x < BN) {
    const int n = n0 + threadIdx.x;
    int ok = 0;
    if (n < p.L) {
      const int m = p.kmask[static_cast<int64_t>(b) * p.L + n];
      if (m != 0 && m != 1) atomicOr(p.flag, kBadMask);
      ok = (m != 0);
    }
    s_kok[threadIdx.x] = ok;
  }
}

// Unscaled scores of the thread's micro-tile: rows warp*8 + i, keys lane + 32 * jj.
// Per 4 d: 8 broadcast float4 loads of q and 4*KL conflict-free loads of k for 32*KL FMAs.
template <class ACC, int KL>
__device__ __forceinline__ void tile_scores(const ACC* Qn, const ACC* Kt, int QS,
                                            ACC (&z)[kRW][KL]) {
  constexpr int KS = 32 * KL + 1;
  const int w = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kRW; ++i)
#pragma unroll
    for (int jj = 0; jj < KL; ++jj) z[i][jj] = static_cast<ACC>(0);
  const ACC* qrow = Qn + w * kRW * QS;
  for (int d = 0; d < QS; d += 4) {
    ACC kv[4][KL];
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int jj = 0; jj < KL; ++jj) kv[e][jj] = Kt[(d + e) * KS + lane + 32 * jj];
#pragma unroll
    for (int i = 0; i < kRW; ++i) {
      ACC qv[4];
      load4(qrow + i * QS + d, qv);
#pragma unroll
      for (int e = 0; e < 4; ++e)
#pragma unroll
        for (int jj = 0; jj < KL; ++jj) z[i][jj] += qv[e] * kv[e][jj];
    }
  }
}

// dKL/dz of one element (valid key): g * (T * exp(z - lse) - t).
template <class ACC>
__device__ __forceinline__ ACC dz_value(const Params& p, ACC zs, ACC lse, ACC T, ACC g,
                                        int64_t tidx) {
  ACC d = T * ex(zs - lse);
  if (p.teacher != nullptr) d -= load_code<ACC>(p.teacher, p.tcode, tidx);
  return g * d;
}

// ---- forward ---------------------------------------------------------------------------

template <class TIN, class ACC>
__global__ void __launch_bounds__(kThreads) kl_fwd_kernel(const Params p) {
  constexpr int BN = kFwdBN;
  constexpr int KL = BN / 32;
  SEEKR_DYNAMIC_SMEM(smem_raw);
  ACC* Qn = reinterpret_cast<ACC*>(smem_raw);   // kBM * QS
  ACC* Kt = Qn + kBM * p.QS;                    // QS * (BN + 1)
  __shared__ int s_pos[kBM], s_act[kBM], s_kok[BN], s_hi;

  const int bs = blockIdx.x;
  const int m0 = blockIdx.y * kBM;
  const int b = bs / p.S;
  const int h = slot_head(p, bs);
  setup_rows(p, b, h, m0, s_pos, s_act, &s_hi);
  __syncthreads();
  const int hi = s_hi;
  const int hh = h < 0 ? 0 : h;
  if (hi > 0) load_q_tile<TIN, ACC>(p, b, hh, s_pos, s_act, Qn);

  const int w = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const bool has_t = p.teacher != nullptr;
  const ACC scale = static_cast<ACC>(p.scale);
  // First teacher element of the warp's first row; row i adds i * L.
  const int64_t trow0 = (static_cast<int64_t>(bs) * p.Q + m0 + w * kRW) * p.L;
  int pos[kRW];
  bool act[kRW];
  ACC m[kRW], l[kRW], ts[kRW], tz[kRW], tl[kRW];
#pragma unroll
  for (int i = 0; i < kRW; ++i) {
    const int r = w * kRW + i;
    pos[i] = s_pos[r];
    act[i] = s_act[r] != 0;
    m[i] = neg_inf<ACC>();
    l[i] = ts[i] = tz[i] = tl[i] = static_cast<ACC>(0);
  }

  for (int n0 = 0; n0 < hi; n0 += BN) {
    __syncthreads();   // previous key tile fully consumed (and Qn stored, first time)
    load_k_tile<TIN, ACC, BN>(p, b, hh / p.G, n0, Kt, s_kok);
    __syncthreads();
    ACC z[kRW][KL];
    tile_scores<ACC, KL>(Qn, Kt, p.QS, z);
#pragma unroll
    for (int jj = 0; jj < KL; ++jj) {
      const int j = lane + 32 * jj;
      const int n = n0 + j;
      const bool kok = s_kok[j] != 0;
#pragma unroll
      for (int i = 0; i < kRW; ++i) {
        if (act[i] && kok && n <= pos[i]) {
          const ACC zs = z[i][jj] * scale;
          online_add(zs, m[i], l[i]);
          if (has_t) {
            const ACC t = load_code<ACC>(p.teacher, p.tcode, trow0 + static_cast<int64_t>(i) * p.L + n);
            ts[i] += t;
            tz[i] += t * zs;
            if (t > static_cast<ACC>(0)) tl[i] += t * lg(t);
          }
        }
      }
    }
  }

  ACC* rows = static_cast<ACC*>(p.rows);
  ACC* lse_out = static_cast<ACC*>(p.lse);
  ACC* tout = static_cast<ACC*>(p.tout);
  const ACC* tm_in = static_cast<const ACC*>(p.tm_in);
#pragma unroll
  for (int i = 0; i < kRW; ++i) {
    // Shuffles: every lane takes part; lane i then writes row i of the warp.
    const ACC lse = warp_lse(m[i], l[i]);
    const ACC T = warp_sum(ts[i]);
    const ACC TZ = warp_sum(tz[i]);
    const ACC TL = warp_sum(tl[i]);
    const int qi = m0 + w * kRW + i;
    if (lane == i && qi < p.Q) {
      const int64_t o = static_cast<int64_t>(bs) * p.Q + qi;
      ACC row = static_cast<ACC>(0), lo = static_cast<ACC>(0), mass = static_cast<ACC>(0);
      if (act[i]) {
        lo = lse;
        mass = has_t ? T : tm_in[o];
        row = has_t ? TL - TZ + mass * lse : mass * lse;
      }
      rows[o] = row;
      lse_out[o] = lo;
      tout[o] = mass;
    }
  }
}

// ---- attention_probs --------------------------------------------------------------------

template <class TIN, class ACC>
__global__ void __launch_bounds__(kThreads) probs_kernel(const Params p) {
  constexpr int BN = kFwdBN;
  constexpr int KL = BN / 32;
  SEEKR_DYNAMIC_SMEM(smem_raw);
  ACC* Qn = reinterpret_cast<ACC*>(smem_raw);
  ACC* Kt = Qn + kBM * p.QS;
  __shared__ int s_pos[kBM], s_act[kBM], s_kok[BN], s_hi;

  const int bs = blockIdx.x;
  const int m0 = blockIdx.y * kBM;
  const int b = bs / p.S;
  const int h = slot_head(p, bs);
  setup_rows(p, b, h, m0, s_pos, s_act, &s_hi);
  __syncthreads();
  const int hi = s_hi;
  const int hh = h < 0 ? 0 : h;
  if (hi > 0) load_q_tile<TIN, ACC>(p, b, hh, s_pos, s_act, Qn);

  const int w = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const ACC scale = static_cast<ACC>(p.scale);
  int pos[kRW];
  bool act[kRW];
  ACC m[kRW], l[kRW];
#pragma unroll
  for (int i = 0; i < kRW; ++i) {
    pos[i] = s_pos[w * kRW + i];
    act[i] = s_act[w * kRW + i] != 0;
    m[i] = neg_inf<ACC>();
    l[i] = static_cast<ACC>(0);
  }

  // Pass 1: lse per row.
  for (int n0 = 0; n0 < hi; n0 += BN) {
    __syncthreads();
    load_k_tile<TIN, ACC, BN>(p, b, hh / p.G, n0, Kt, s_kok);
    __syncthreads();
    ACC z[kRW][KL];
    tile_scores<ACC, KL>(Qn, Kt, p.QS, z);
#pragma unroll
    for (int jj = 0; jj < KL; ++jj) {
      const int n = n0 + lane + 32 * jj;
      const bool kok = s_kok[lane + 32 * jj] != 0;
#pragma unroll
      for (int i = 0; i < kRW; ++i)
        if (act[i] && kok && n <= pos[i]) online_add(z[i][jj] * scale, m[i], l[i]);
    }
  }
  ACC lse[kRW];
#pragma unroll
  for (int i = 0; i < kRW; ++i) lse[i] = warp_lse(m[i], l[i]);

  // Pass 2: recompute the scores and write p = exp(z - lse) (0 on invalid keys).
  for (int n0 = 0; n0 < hi; n0 += BN) {
    __syncthreads();
    load_k_tile<TIN, ACC, BN>(p, b, hh / p.G, n0, Kt, s_kok);
    __syncthreads();
    ACC z[kRW][KL];
    tile_scores<ACC, KL>(Qn, Kt, p.QS, z);
#pragma unroll
    for (int jj = 0; jj < KL; ++jj) {
      const int n = n0 + lane + 32 * jj;
      const bool kok = s_kok[lane + 32 * jj] != 0;
#pragma unroll
      for (int i = 0; i < kRW; ++i) {
        const int qi = m0 + w * kRW + i;
        if (qi < p.Q && n < p.L) {
          const bool valid = act[i] && kok && n <= pos[i];
          const ACC v = valid ? ex(z[i][jj] * scale - lse[i]) : static_cast<ACC>(0);
          store_code(p.out, p.ocode, (static_cast<int64_t>(bs) * p.Q + qi) * p.L + n, v);
        }
      }
    }
  }
  // Past the horizon (all of it for tiles without an active row): zeros, no compute.
  const int start = ((hi + BN - 1) / BN) * BN;
#pragma unroll
  for (int i = 0; i < kRW; ++i) {
    const int qi = m0 + w * kRW + i;
    if (qi >= p.Q) continue;
    const int64_t base = (static_cast<int64_t>(bs) * p.Q + qi) * p.L;
    for (int n = start + lane; n < p.L; n += 32) store_code(p.out, p.ocode, base + n, static_cast<ACC>(0));
  }
}

// ---- backward: dq ------------------------------------------------------------------------

// Per-row dq, ws[(bs * Q + qi) * D + d] = scale * sum_j dz_j k_j (zeros for inactive rows):
// one block per (b*S + s, tile of 32 selected rows), like the forward.
template <class TIN, class ACC>
__global__ void __launch_bounds__(kThreads) kl_dqrows_kernel(const Params p) {
  constexpr int BN = kBwdBN;
  constexpr int KS = BN + 1;
  SEEKR_DYNAMIC_SMEM(smem_raw);
  __shared__ int s_pos[kBM], s_act[kBM], s_kok[BN], s_hi;
  __shared__ ACC s_lse[kBM], s_T[kBM], s_g[kBM];
  const int QS = p.QS;
  const int D = p.D;
  ACC* Qn = reinterpret_cast<ACC*>(smem_raw);   // kBM * QS
  ACC* Kt = Qn + kBM * QS;                      // round4(QS * KS)
  ACC* dzs = Kt + round4(QS * KS);              // BN * kDzS, dz transposed: dzs[j * kDzS + r]
  ACC* accr = dzs + BN * kDzS;                  // kBM * D

  const int bs = blockIdx.x;
  const int m0 = blockIdx.y * kBM;
  const int b = bs / p.S;
  const int tid = threadIdx.x;
  const int w = tid >> 5;
  const int lane = tid & 31;
  const int h = slot_head(p, bs);
  setup_rows(p, b, h, m0, s_pos, s_act, &s_hi);
  if (tid < 32) {
    const int qi = m0 + tid;
    ACC lse = 0, T = 0, g = 0;
    if (qi < p.Q) {
      const int64_t o = static_cast<int64_t>(bs) * p.Q + qi;
      lse = static_cast<const ACC*>(p.lse_in)[o];
      T = static_cast<const ACC*>(p.t_in)[o];
      g = static_cast<const ACC*>(p.grad)[o];
    }
    s_lse[tid] = lse;
    s_T[tid] = T;
    s_g[tid] = g;
  }
  for (int idx = tid; idx < kBM * D; idx += kThreads) accr[idx] = static_cast<ACC>(0);
  __syncthreads();
  const int hi = s_hi;
  const int hh = h < 0 ? 0 : h;
  if (hi > 0) load_q_tile<TIN, ACC>(p, b, hh, s_pos, s_act, Qn);

  const ACC scale = static_cast<ACC>(p.scale);
  const int64_t trow0 = (static_cast<int64_t>(bs) * p.Q + m0 + w * kRW) * p.L;
  int pos[kRW];
  bool act[kRW];
  ACC lse[kRW], T[kRW], g[kRW];
#pragma unroll
  for (int i = 0; i < kRW; ++i) {
    const int r = w * kRW + i;
    pos[i] = s_pos[r];
    act[i] = s_act[r] != 0;
    lse[i] = s_lse[r];
    T[i] = s_T[r];
    g[i] = s_g[r];
  }
  for (int n0 = 0; n0 < hi; n0 += BN) {
    __syncthreads();   // Kt / dzs free again (and Qn stored, first time)
    load_k_tile<TIN, ACC, BN>(p, b, hh / p.G, n0, Kt, s_kok);
    __syncthreads();
    ACC z[kRW][1];
    tile_scores<ACC, 1>(Qn, Kt, QS, z);
    const int nk = n0 + lane;
    const bool kok = s_kok[lane] != 0;
#pragma unroll
    for (int i = 0; i < kRW; ++i) {
      ACC dz = static_cast<ACC>(0);
      if (act[i] && kok && nk <= pos[i])
        dz = dz_value(p, z[i][0] * scale, lse[i], T[i], g[i], trow0 + static_cast<int64_t>(i) * p.L + nk);
      dzs[lane * kDzS + w * kRW + i] = dz;
    }
    __syncthreads();
    // accr[r][d] += sum_j dz[r][j] k[j][d]; thread: its warp's 8 rows, d = lane + 32c, so
    // each accr element has one owner and needs no barrier between key tiles.
    for (int d = lane; d < D; d += 32) {
      ACC a[kRW];
#pragma unroll
      for (int i = 0; i < kRW; ++i) a[i] = accr[(w * kRW + i) * D + d];
#pragma unroll 4
      for (int j = 0; j < BN; ++j) {
        const ACC kd = Kt[d * KS + j];
        ACC dv[8];
        load8(dzs + j * kDzS + w * kRW, dv);
#pragma unroll
        for (int i = 0; i < kRW; ++i) a[i] += dv[i] * kd;
      }
#pragma unroll
      for (int i = 0; i < kRW; ++i) accr[(w * kRW + i) * D + d] = a[i];
    }
  }
  __syncthreads();
  ACC* ws = static_cast<ACC*>(p.ws);
  const int nrows = min(kBM, p.Q - m0);
  const int64_t base = (static_cast<int64_t>(bs) * p.Q + m0) * D;
  for (int idx = tid; idx < nrows * D; idx += kThreads) ws[base + idx] = scale * accr[idx];
}

// dq [B, H, L, D] from the per-row gradients: one block per (b*H + h, 32 positions
// p0..p0+31) owns those dq rows outright. It scans queries[b, :] of the slots holding head h
// in q order and adds each row whose position falls in its tile, so repeated positions add
// up in a fixed order (deterministic, no atomics); heads nobody selected get zeros.
template <class ACC>
__global__ void __launch_bounds__(kThreads) kl_dqgather_kernel(const Params p) {
  SEEKR_DYNAMIC_SMEM(smem_raw);
  __shared__ int s_pos[kThreads];
  __shared__ unsigned s_hits[kWarps];
  ACC* accp = reinterpret_cast<ACC*>(smem_raw);   // kBM * D
  const int D = p.D;
  const int bh = blockIdx.x;
  const int p0 = blockIdx.y * kBM;
  const int b = bh / p.H;
  const int h = bh - b * p.H;
  const int np = min(kBM, p.L - p0);
  const int tid = threadIdx.x;
  const int w = tid >> 5;
  const int lane = tid & 31;
  const ACC* ws = static_cast<const ACC*>(p.ws);
  for (int idx = tid; idx < kBM * D; idx += kThreads) accp[idx] = static_cast<ACC>(0);

  for (int s = 0; s < p.S; ++s) {
    const int bs = b * p.S + s;
    if (slot_head(p, bs) != h) continue;   // uniform: every thread reads the same head
    for (int q0 = 0; q0 < p.Q; q0 += kThreads) {
      __syncthreads();   // previous chunk consumed (and accp zeroed, first time)
      const int qi = q0 + tid;
      bool hit = false;
      int pos = 0;
      if (qi < p.Q) {
        const int v = p.queries[static_cast<int64_t>(b) * p.Q + qi];
        if (v < 0 || v >= p.L) {
          atomicOr(p.flag, kBadQueries);
        } else if (v >= p0 && v < p0 + np) {
          hit = true;
          pos = v;
        }
      }
      s_pos[tid] = pos;
      const unsigned hits = __ballot_sync(0xffffffffu, hit);
      if (lane == 0) s_hits[w] = hits;
      __syncthreads();
      // Hits in q order; thread t owns columns d = t (mod 128) of every accp row.
      for (int ww = 0; ww < kWarps; ++ww) {
        unsigned m = s_hits[ww];
        while (m != 0u) {
          const int e = ww * 32 + __ffs(static_cast<int>(m)) - 1;
          m &= m - 1u;
          const ACC* src = ws + (static_cast<int64_t>(bs) * p.Q + q0 + e) * D;
          ACC* dst = accp + (s_pos[e] - p0) * D;
          for (int d = tid; d < D; d += kThreads) dst[d] += src[d];
        }
      }
    }
  }
  __syncthreads();
  ACC* dq = static_cast<ACC*>(p.dq);
  const int64_t base = (static_cast<int64_t>(bh) * p.L + p0) * D;
  for (int idx = tid; idx < np * D; idx += kThreads) dq[base + idx] = accp[idx];
}

// ---- backward: dk ------------------------------------------------------------------------

template <class TIN, class ACC>
__global__ void __launch_bounds__(kThreads) kl_dk_kernel(const Params p) {
  constexpr int BN = kBwdBN;
  static_assert(BN == 32, "the dk update maps one key per lane");
  SEEKR_DYNAMIC_SMEM(smem_raw);
  __shared__ int s_pos[kBM], s_act[kBM], s_kok[BN], s_hi;
  __shared__ ACC s_lse[kBM], s_T[kBM], s_g[kBM];
  const int QS = p.QS;
  const int D = p.D;
  const int AS = D | 1;   // odd row stride: lanes (= keys) hit distinct banks
  ACC* Kt = reinterpret_cast<ACC*>(smem_raw);   // round4(QS * (BN + 1))
  ACC* Qn = Kt + round4(QS * (BN + 1));         // kBM * QS
  ACC* dzs = Qn + kBM * QS;                     // kBM * kDzS, dzs[r * kDzS + j]
  ACC* acck = dzs + kBM * kDzS;                 // BN * AS

  const int bk = blockIdx.x;
  const int n0 = blockIdx.y * BN;
  const int b = bk / p.Hkv;
  const int kvh = bk - b * p.Hkv;
  const int tid = threadIdx.x;
  const int w = tid >> 5;
  const int lane = tid & 31;
  const ACC scale = static_cast<ACC>(p.scale);
  load_k_tile<TIN, ACC, BN>(p, b, kvh, n0, Kt, s_kok);
  for (int idx = tid; idx < BN * AS; idx += kThreads) acck[idx] = static_cast<ACC>(0);

  for (int s = 0; s < p.S; ++s) {
    const int bs = b * p.S + s;
    const int h = slot_head(p, bs);
    if (h < 0 || h / p.G != kvh) continue;   // uniform
    for (int m0 = 0; m0 < p.Q; m0 += kBM) {
      __syncthreads();   // previous row tile done with the row data, Qn and dzs
      setup_rows(p, b, h, m0, s_pos, s_act, &s_hi);
      if (tid < 32) {
        const int qi = m0 + tid;
        ACC lse = 0, T = 0, g = 0;
        if (qi < p.Q) {
          const int64_t o = static_cast<int64_t>(bs) * p.Q + qi;
          lse = static_cast<const ACC*>(p.lse_in)[o];
          T = static_cast<const ACC*>(p.t_in)[o];
          g = static_cast<const ACC*>(p.grad)[o];
        }
        s_lse[tid] = lse;
        s_T[tid] = T;
        s_g[tid] = g;
      }
      __syncthreads();
      if (s_hi <= n0) continue;   // every row of the tile precedes this key tile (uniform)
      load_q_tile<TIN, ACC>(p, b, h, s_pos, s_act, Qn);
      __syncthreads();
      ACC z[kRW][1];
      tile_scores<ACC, 1>(Qn, Kt, QS, z);
      const int nk = n0 + lane;
      const bool kok = s_kok[lane] != 0;
#pragma unroll
      for (int i = 0; i < kRW; ++i) {
        const int r = w * kRW + i;
        ACC dz = static_cast<ACC>(0);
        if (s_act[r] && kok && nk <= s_pos[r]) {
          const int64_t tidx = (static_cast<int64_t>(bs) * p.Q + m0 + r) * p.L + nk;
          dz = dz_value(p, z[i][0] * scale, s_lse[r], s_T[r], s_g[r], tidx);
        }
        dzs[r * kDzS + lane] = dz;
      }
      __syncthreads();
      // acck[j][d] += sum_r dz[r][j] q[r][d]; thread: key j = lane, d = d0..d0+7.
      for (int d0 = w * 8; d0 < D; d0 += 32) {   // QS is a multiple of 8: d0 + 8 <= QS
        ACC a[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) a[e] = static_cast<ACC>(0);
#pragma unroll 4
        for (int r = 0; r < kBM; ++r) {
          const ACC dz = dzs[r * kDzS + lane];
          ACC qv[8];
          load8(Qn + r * QS + d0, qv);
#pragma unroll
          for (int e = 0; e < 8; ++e) a[e] += dz * qv[e];
        }
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (d0 + e < D) acck[lane * AS + d0 + e] += a[e];
      }
    }
  }
  __syncthreads();
  ACC* dk = static_cast<ACC*>(p.dk);
  const int nk = min(BN, p.L - n0);
  const int64_t base = (static_cast<int64_t>(bk) * p.L + n0) * D;
  for (int idx = tid; idx < nk * D; idx += kThreads) {
    const int j = idx / D;
    const int d = idx - j * D;
    dk[base + idx] = scale * acck[j * AS + d];
  }
}

// ---- host side ---------------------------------------------------------------------------

[[noreturn]] void bad_arg(const std::string& msg) { throw std::invalid_argument(msg); }

void cuda_check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess)
    throw std::runtime_error("seekr_kernels._C_cuda: " + what + " failed: " + cudaGetErrorString(e) +
                             " (" + cudaGetErrorName(e) + ")");
}

std::string dtype_msg(const char* name, std::int64_t code) {
  return std::string(name) + ": dtype code must be 0 (float32), 1 (float16), 2 (bfloat16) or " +
         "3 (float64), got " + std::to_string(code);
}

struct Dims {
  int B, H, Hkv, L, D, S, Q, G, QS;
};

// Re-check what the Python glue promised; cheap, and no CUDA call happens before it.
Dims check_dims(std::int64_t B, std::int64_t H, std::int64_t Hkv, std::int64_t L, std::int64_t D,
                std::int64_t S, std::int64_t Q, std::int64_t q_dtype, double scale) {
  auto pos = [](const char* n, std::int64_t v) {
    if (v < 1 || v > INT_MAX) bad_arg(std::string(n) + ": must be in [1, 2^31), got " + std::to_string(v));
  };
  auto nonneg = [](const char* n, std::int64_t v) {
    if (v < 0 || v > INT_MAX) bad_arg(std::string(n) + ": must be in [0, 2^31), got " + std::to_string(v));
  };
  pos("B", B);
  pos("H", H);
  pos("Hkv", Hkv);
  pos("L", L);
  pos("D", D);
  nonneg("S", S);
  nonneg("Q", Q);
  if (H % Hkv != 0)
    bad_arg("k: query heads H=" + std::to_string(H) + " are not a multiple of key heads Hkv=" + std::to_string(Hkv));
  if (q_dtype < 0 || q_dtype > 3) bad_arg(dtype_msg("q_dtype", q_dtype));
  if (!std::isfinite(scale) || scale <= 0) bad_arg("scale: must be finite and > 0, got " + std::to_string(scale));
  if (D > 4096) bad_arg("q: head dim D=" + std::to_string(D) + " is too large for the cuda backend (max 4096)");
  // Grid limits: blockIdx.y counts 32-row / 32-key tiles (<= 65535); blockIdx.x is B*S, B*H.
  if ((Q + kBM - 1) / kBM > 65535)
    bad_arg("queries: Q=" + std::to_string(Q) + " rows is too many for the cuda backend (max 2097120)");
  if ((L + kBwdBN - 1) / kBwdBN > 65535)
    bad_arg("q: sequence length L=" + std::to_string(L) + " is too long for the cuda backend (max 2097120)");
  if (B * std::max(S, H) > INT_MAX) bad_arg("heads: B*S and B*H must be < 2^31");
  Dims d;
  d.B = static_cast<int>(B);
  d.H = static_cast<int>(H);
  d.Hkv = static_cast<int>(Hkv);
  d.L = static_cast<int>(L);
  d.D = static_cast<int>(D);
  d.S = static_cast<int>(S);
  d.Q = static_cast<int>(Q);
  d.G = d.H / d.Hkv;
  d.QS = (d.D + 7) & ~7;
  return d;
}

void need_ptr(std::uintptr_t v, const char* name) {
  if (v == 0) bad_arg(std::string(name) + ": null data pointer");
}

// The inputs every entry point reads (pointers checked by need_ptr before each call).
void set_inputs(Params& p, std::uintptr_t q, std::uintptr_t k, std::uintptr_t heads,
                std::uintptr_t queries, std::uintptr_t key_mask) {
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.heads = reinterpret_cast<const int*>(heads);
  p.queries = reinterpret_cast<const int*>(queries);
  p.kmask = reinterpret_cast<const int*>(key_mask);
}

void fill_dims(Params& p, const Dims& d, double scale) {
  p.B = d.B; p.H = d.H; p.Hkv = d.Hkv; p.L = d.L; p.D = d.D; p.S = d.S; p.Q = d.Q; p.G = d.G;
  p.QS = d.QS;
  p.scale = scale;
}

// The 4-byte error flag of the current device, one per host thread (each call synchronises
// before returning, so calls of one thread never share it concurrently). Kept for the
// lifetime of the process.
int* error_flag() {
  thread_local std::unordered_map<int, int*> flags;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  auto it = flags.find(dev);
  if (it != flags.end()) return it->second;
  int* f = nullptr;
  cuda_check(cudaMalloc(&f, sizeof(int)), "cudaMalloc (error flag)");
  flags[dev] = f;
  return f;
}

std::size_t fwd_smem_elems(const Dims& d) { return kBM * d.QS + round4(d.QS * (kFwdBN + 1)); }
std::size_t dqrows_smem_elems(const Dims& d) {
  return kBM * d.QS + round4(d.QS * (kBwdBN + 1)) + kBwdBN * kDzS + kBM * d.D;
}
std::size_t dqgather_smem_elems(const Dims& d) { return static_cast<std::size_t>(kBM) * d.D; }
std::size_t dk_smem_elems(const Dims& d) {
  return round4(d.QS * (kBwdBN + 1)) + kBM * d.QS + kBM * kDzS + kBwdBN * (d.D | 1);
}

template <class Kernel>
void launch(Kernel kernel, dim3 grid, std::size_t smem, cudaStream_t st, const Params& p,
            const Dims& d, const char* name) {
  int dev = 0, optin = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute");
  cudaFuncAttributes fa;
  cuda_check(cudaFuncGetAttributes(&fa, kernel), std::string("cudaFuncGetAttributes(") + name + ")");
  if (smem + fa.sharedSizeBytes > static_cast<std::size_t>(optin))
    bad_arg("q: head dim D=" + std::to_string(d.D) + " needs " + std::to_string(smem + fa.sharedSizeBytes) +
            " bytes of shared memory per block in the CUDA " + name + " kernel; this GPU allows " +
            std::to_string(optin) + " (use backend='triton' or 'torch' for this head size)");
  if (smem > 48 * 1024)
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               std::string("cudaFuncSetAttribute(") + name + ")");
  SEEKR_LAUNCH(kernel, grid, kThreads, smem, st, p);
  cuda_check(cudaGetLastError(), std::string("launch of ") + name);
}

// Start of every entry point: drop a stale, non-sticky error left by unrelated work so a
// launch failure reported below is ours; then clear the index-error flag.
int* begin(cudaStream_t st) {
  (void)cudaGetLastError();
  int* flag = error_flag();
  cuda_check(cudaMemsetAsync(flag, 0, sizeof(int), st), "cudaMemsetAsync (error flag)");
  return flag;
}

// After the launches: one copy of the flag and one stream synchronisation (which also
// surfaces asynchronous execution errors), then the argument errors the kernels found.
void finish(int* flag, cudaStream_t st, const char* op, const Dims& d) {
  int bad = 0;
  cuda_check(cudaMemcpyAsync(&bad, flag, sizeof(int), cudaMemcpyDeviceToHost, st),
             std::string(op) + ": cudaMemcpyAsync (error flag)");
  cuda_check(cudaStreamSynchronize(st), std::string(op) + ": kernel execution");
  if (bad & kBadHeads)
    bad_arg("heads: values must lie in [-1, " + std::to_string(d.H) + ") (-1 = empty slot)");
  if (bad & kBadQueries) bad_arg("queries: positions must lie in [0, " + std::to_string(d.L) + ")");
  if (bad & kBadMask) bad_arg("key_mask (attention_mask): values must be 0 or 1");
}

template <class TIN, class ACC>
void run_fwd(const Params& p, const Dims& d, cudaStream_t st) {
  const dim3 grid(d.B * d.S, (d.Q + kBM - 1) / kBM);
  launch(kl_fwd_kernel<TIN, ACC>, grid, fwd_smem_elems(d) * sizeof(ACC), st, p, d, "attention_kl_fwd");
}

// Scratch for the per-row dq. The caller normally passes it (the Python glue allocates it
// with torch, so torch's allocator accounts for it); otherwise it comes from the
// stream-ordered allocator (cudaMallocAsync; plain cudaMalloc where memory pools are
// unsupported) and is freed when the call returns.
class Workspace {
 public:
  Workspace(void* given, std::size_t bytes, cudaStream_t st) : ptr_(given), st_(st) {
    if (ptr_ != nullptr) {
      owned_ = false;
      return;
    }
    if (cudaMallocAsync(&ptr_, bytes, st) != cudaSuccess) {
      (void)cudaGetLastError();   // not a launch error of ours
      ptr_ = nullptr;
      async_ = false;
      cuda_check(cudaMalloc(&ptr_, bytes), "cudaMalloc (dq workspace of " + std::to_string(bytes) + " bytes)");
    }
  }
  ~Workspace() {
    if (ptr_ == nullptr || !owned_) return;
    if (async_) {
      (void)cudaFreeAsync(ptr_, st_);
    } else {
      (void)cudaStreamSynchronize(st_);
      (void)cudaFree(ptr_);
    }
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  cudaStream_t st_;
  bool owned_ = true;
  bool async_ = true;
};

template <class TIN, class ACC>
void run_bwd(const Params& p0, const Dims& d, cudaStream_t st) {
  Params p = p0;
  Workspace ws(p0.ws, sizeof(ACC) * static_cast<std::size_t>(d.B) * d.S * d.Q * d.D, st);
  p.ws = ws.get();
  const dim3 gr(d.B * d.S, (d.Q + kBM - 1) / kBM);
  launch(kl_dqrows_kernel<TIN, ACC>, gr, dqrows_smem_elems(d) * sizeof(ACC), st, p, d, "attention_kl_bwd (dq rows)");
  const dim3 gq(d.B * d.H, (d.L + kBM - 1) / kBM);
  launch(kl_dqgather_kernel<ACC>, gq, dqgather_smem_elems(d) * sizeof(ACC), st, p, d, "attention_kl_bwd (dq gather)");
  const dim3 gk(d.B * d.Hkv, (d.L + kBwdBN - 1) / kBwdBN);
  launch(kl_dk_kernel<TIN, ACC>, gk, dk_smem_elems(d) * sizeof(ACC), st, p, d, "attention_kl_bwd (dk)");
  // The flag is read (and the stream synchronised) by the caller; freeing the workspace
  // here is stream-ordered after the kernels.
}

template <class TIN, class ACC>
void run_probs(const Params& p, const Dims& d, cudaStream_t st) {
  const dim3 grid(d.B * d.S, (d.Q + kBM - 1) / kBM);
  launch(probs_kernel<TIN, ACC>, grid, fwd_smem_elems(d) * sizeof(ACC), st, p, d, "attention_probs");
}

#define SEEKR_DISPATCH(code, RUN, p, d, st)                  \
  switch (code) {                                            \
    case kF16: RUN<__half, float>(p, d, st); break;          \
    case kBF16: RUN<__nv_bfloat16, float>(p, d, st); break;  \
    case kF64: RUN<double, double>(p, d, st); break;         \
    default: RUN<float, float>(p, d, st); break;             \
  }

}  // namespace

void attention_kl_fwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t teacher,
                      std::int64_t teacher_dtype, std::uintptr_t tmass_in, std::uintptr_t heads,
                      std::uintptr_t queries, std::uintptr_t key_mask, std::uintptr_t rows_out,
                      std::uintptr_t lse_out, std::uintptr_t tmass_out, std::int64_t B,
                      std::int64_t H, std::int64_t Hkv, std::int64_t L, std::int64_t D,
                      std::int64_t S, std::int64_t Q, std::int64_t q_dtype, double scale,
                      std::uintptr_t stream) {
  const Dims d = check_dims(B, H, Hkv, L, D, S, Q, q_dtype, scale);
  if (teacher != 0 && (teacher_dtype < 0 || teacher_dtype > 3)) bad_arg(dtype_msg("teacher_dtype", teacher_dtype));
  if (teacher == 0 && tmass_in == 0)
    bad_arg("teacher: with no teacher (pointer 0) tmass_in must be given");
  if (d.S == 0 || d.Q == 0) return;   // empty outputs
  need_ptr(q, "q");
  need_ptr(k, "k");
  need_ptr(heads, "heads");
  need_ptr(queries, "queries");
  need_ptr(key_mask, "key_mask");
  need_ptr(rows_out, "rows_out");
  need_ptr(lse_out, "lse_out");
  need_ptr(tmass_out, "tmass_out");
  Params p{};
  fill_dims(p, d, scale);
  set_inputs(p, q, k, heads, queries, key_mask);
  p.teacher = reinterpret_cast<const void*>(teacher);
  p.tcode = static_cast<int>(teacher_dtype);
  p.tm_in = reinterpret_cast<const void*>(tmass_in);
  p.rows = reinterpret_cast<void*>(rows_out);
  p.lse = reinterpret_cast<void*>(lse_out);
  p.tout = reinterpret_cast<void*>(tmass_out);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  p.flag = begin(st);
  SEEKR_DISPATCH(q_dtype, run_fwd, p, d, st);
  finish(p.flag, st, "attention_kl_fwd", d);
}

void attention_kl_bwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t teacher,
                      std::int64_t teacher_dtype, std::uintptr_t heads, std::uintptr_t queries,
                      std::uintptr_t key_mask, std::uintptr_t lse, std::uintptr_t tmass,
                      std::uintptr_t grad_rows, std::uintptr_t dq_out, std::uintptr_t dk_out,
                      std::int64_t B, std::int64_t H, std::int64_t Hkv, std::int64_t L,
                      std::int64_t D, std::int64_t S, std::int64_t Q, std::int64_t q_dtype,
                      double scale, std::uintptr_t stream, std::uintptr_t workspace) {
  const Dims d = check_dims(B, H, Hkv, L, D, S, Q, q_dtype, scale);
  if (teacher != 0 && (teacher_dtype < 0 || teacher_dtype > 3)) bad_arg(dtype_msg("teacher_dtype", teacher_dtype));
  need_ptr(q, "q");
  need_ptr(k, "k");
  need_ptr(dq_out, "dq_out");
  need_ptr(dk_out, "dk_out");
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const std::size_t acc = (q_dtype == kF64) ? sizeof(double) : sizeof(float);
  if (d.S == 0 || d.Q == 0) {   // no rows: the gradients are zero, still written in full
    (void)cudaGetLastError();
    cuda_check(cudaMemsetAsync(reinterpret_cast<void*>(dq_out), 0,
                               acc * static_cast<std::size_t>(d.B) * d.H * d.L * d.D, st),
               "cudaMemsetAsync (dq)");
    cuda_check(cudaMemsetAsync(reinterpret_cast<void*>(dk_out), 0,
                               acc * static_cast<std::size_t>(d.B) * d.Hkv * d.L * d.D, st),
               "cudaMemsetAsync (dk)");
    return;
  }
  need_ptr(heads, "heads");
  need_ptr(queries, "queries");
  need_ptr(key_mask, "key_mask");
  need_ptr(lse, "lse");
  need_ptr(tmass, "tmass");
  need_ptr(grad_rows, "grad_rows");
  Params p{};
  fill_dims(p, d, scale);
  set_inputs(p, q, k, heads, queries, key_mask);
  p.teacher = reinterpret_cast<const void*>(teacher);
  p.tcode = static_cast<int>(teacher_dtype);
  p.lse_in = reinterpret_cast<const void*>(lse);
  p.t_in = reinterpret_cast<const void*>(tmass);
  p.grad = reinterpret_cast<const void*>(grad_rows);
  p.dq = reinterpret_cast<void*>(dq_out);
  p.dk = reinterpret_cast<void*>(dk_out);
  p.ws = reinterpret_cast<void*>(workspace);
  p.flag = begin(st);
  SEEKR_DISPATCH(q_dtype, run_bwd, p, d, st);
  finish(p.flag, st, "attention_kl_bwd", d);
}

void attention_probs(std::uintptr_t q, std::uintptr_t k, std::uintptr_t heads,
                     std::uintptr_t queries, std::uintptr_t key_mask, std::uintptr_t out,
                     std::int64_t out_dtype, std::int64_t B, std::int64_t H, std::int64_t Hkv,
                     std::int64_t L, std::int64_t D, std::int64_t S, std::int64_t Q,
                     std::int64_t q_dtype, double scale, std::uintptr_t stream) {
  const Dims d = check_dims(B, H, Hkv, L, D, S, Q, q_dtype, scale);
  if (out_dtype < 0 || out_dtype > 3) bad_arg(dtype_msg("out_dtype", out_dtype));
  if (d.S == 0 || d.Q == 0) return;
  need_ptr(q, "q");
  need_ptr(k, "k");
  need_ptr(heads, "heads");
  need_ptr(queries, "queries");
  need_ptr(key_mask, "key_mask");
  need_ptr(out, "out");
  Params p{};
  fill_dims(p, d, scale);
  set_inputs(p, q, k, heads, queries, key_mask);
  p.out = reinterpret_cast<void*>(out);
  p.ocode = static_cast<int>(out_dtype);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  p.flag = begin(st);
  SEEKR_DISPATCH(q_dtype, run_probs, p, d, st);
  finish(p.flag, st, "attention_probs", d);
}

int runtime_version() {
  int v = 0;
  cuda_check(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

}  // namespace seekr_cuda

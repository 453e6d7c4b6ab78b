// CPU kernels of the fused attention-KL op (DESIGN.md §2), OpenMP over row tiles.
//
// This file is compiled once per instruction set (-DSEEKR_ISA=generic|avx2|avx512 with the
// matching -m flags) and cpu_dispatch.cpp picks one at run time, so a wheel built on one
// machine runs fast on another without -march=native. Everything except the three entry
// points lives in an anonymous namespace: inline code shared between the ISA copies could
// otherwise be merged by the linker into one copy built for the widest ISA.
//
// Shape of the computation. Selected rows of one (sample, slot) are sorted by query
// position (the dispatcher's plan) and cut into tiles of kBM rows. For a tile and a block
// of kBN keys:
//
//   Qs [kBM x Dp]  = scale * q rows           (converted to the accumulation type Acc)
//   Kt [D x kBN]   = K block, transposed      (so score columns are contiguous)
//   Z  [kBM x kBN] = Qs Kt                     (register-blocked micro-kernel, `gemm`)
//
// Only key blocks up to the tile's last query position are visited (the causal mask hides
// the rest), starting at the sample's first real key. Per row the forward pass keeps the
// online max/sum of the log-sum-exp and the three teacher sums; nothing of size L is kept.
// Memory: one small set of block buffers per thread, O(kBM * D + kBN * D).
//
// Backward: dz = g * (T * exp(z - lse) - t) is recomputed block by block (never stored
// beyond the current tile), then dq_tile += dz K and dk_block += dz^T Qs.
//
// attention_sqdiff (forgettability) runs the same tiles for two models at once, each with
// its own Op and Work: pass 1 is the forward's online log-sum-exp for both, pass 2
// recomputes both score blocks and sums (p_a - p_b)^2 entry by entry. Not the one-pass
// identity sum p_a^2 + sum p_b^2 - 2 sum p_a p_b: that cancels catastrophically exactly
// where the op is used, on small changes of attention (as in triton/attention_sqdiff.py).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_common.h"
#include "dtype_convert.h"

#ifndef SEEKR_ISA
#error "compile cpu_kernels.cpp with -DSEEKR_ISA=<generic|avx2|avx512>"
#endif

#define SEEKR_CAT_(a, b) a##_##b
#define SEEKR_CAT(a, b) SEEKR_CAT_(a, b)

namespace seekr {
namespace cpu {
namespace {

// Vector width and register-tile rows. NR (columns) is two vectors; MR x 2 accumulators
// plus two B vectors and one broadcast must fit the register file (16 ymm / 32 zmm).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMR = 8;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kMR = 4;
#else
constexpr int kVecBytes = 16;
constexpr int kMR = 4;
#endif

template <class Acc>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t VI __attribute__((vector_size(kVecBytes)));
  typedef int32_t I;
  static constexpr int W = kVecBytes / 4;
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t VI __attribute__((vector_size(kVecBytes)));
  typedef int64_t I;
  static constexpr int W = kVecBytes / 8;
};

static_assert(kBN % (2 * Simd<float>::W) == 0, "kBN must be a multiple of the register tile width");
static_assert(kBM % kMR == 0 && kBN % kMR == 0, "tiles must be multiples of kMR");

template <class V, class T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V, class T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <class V, class VI>
inline V vselect(VI m, V a, V b) {
  return (V)(((VI)a & m) | ((VI)b & ~m));
}
template <class V, class S>
inline V splat(S s) {
  V v = {};
  return v + s;
}

template <class Acc>
inline Acc hsum(typename Simd<Acc>::V v) {
  Acc s = 0;
  for (int i = 0; i < Simd<Acc>::W; ++i) s += v[i];
  return s;
}
template <class Acc>
inline Acc hmax(typename Simd<Acc>::V v) {
  Acc m = v[0];
  for (int i = 1; i < Simd<Acc>::W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <class V>
inline V vmax(V a, V b) {
  return vselect(a > b, a, b);
}

// exp for fp32 lanes (Cephes-style: 2^n * poly(r), |r| <= ln2/2, ~1 ulp). Inputs here are
// <= ~0 (scores minus a running max or the lse); anything below ln(FLT_MIN), -inf
// included, gives exactly 0 so masked keys drop out.
inline Simd<float>::V vexp(Simd<float>::V x) {
  typedef Simd<float>::V V;
  typedef Simd<float>::VI VI;
  const V lo = splat<V>(-87.3365447505531f), hi = splat<V>(88.0f);
  const VI under = x < lo;
  x = vmax(x, lo);
  x = vselect(x > hi, hi, x);
  V fx = x * 1.44269504088896341f;
  // Round to nearest via the 1.5 * 2^23 trick (needs the default rounding mode and no
  // -ffast-math reassociation; the build sets neither).
  const V magic = splat<V>(12582912.0f);
  fx = (fx + magic) - magic;
  const VI n = __builtin_convertvector(fx, VI);
  V r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  V y = splat<V>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const V pow2n = (V)((n + 127) << 23);
  return vselect(under, splat<V>(0.0f), y * pow2n);
}

// Natural log for finite fp32 lanes > 0 (Cephes logf polynomial, ~1 ulp), subnormals
// included. Callers mask the lanes where the argument is <= 0.
inline Simd<float>::V vlog(Simd<float>::V x) {
  typedef Simd<float>::V V;
  typedef Simd<float>::VI VI;
  const VI sub = x < 1.17549435e-38f;
  x = vselect(sub, x * 8388608.0f, x);  // 2^23 lifts subnormals into the normal range
  const VI xi = (VI)x;
  VI e = ((xi >> 23) & 0xff) - 126;
  e = e - (sub & 23);
  V m = (V)((xi & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const VI small = m < 0.707106781186547524f;
  e = e + small;  // small is -1 where true
  m = vselect(small, m + m, m) - 1.0f;
  const V ef = __builtin_convertvector(e, V);
  const V z = m * m;
  V y = splat<V>(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - z * 0.5f;
  return m + y + ef * 0.693359375f;
}

// fp64 is the gradcheck / reference-precision path: libm per lane is good enough.
inline Simd<double>::V vexp(Simd<double>::V x) {
  for (int i = 0; i < Simd<double>::W; ++i) x[i] = std::exp(x[i]);
  return x;
}
inline Simd<double>::V vlog(Simd<double>::V x) {
  for (int i = 0; i < Simd<double>::W; ++i) x[i] = std::log(x[i]);
  return x;
}

// C[M x N] (+)= A[M x K] B[K x N], A(i, k) = A[i * a_rs + k * a_cs], B and C row-major.
// M % kMR == 0 and N % (2 W) == 0 (callers pad). Register tile kMR x 2 vectors: each k
// step loads two B vectors and broadcasts kMR scalars of A, 2 * kMR FMAs.
template <class Acc>
void gemm(int M, int N, int K, const Acc* A, int64_t a_rs, int64_t a_cs, const Acc* B,
          int64_t ldb, Acc* C, int64_t ldc, bool accumulate) {
  typedef typename Simd<Acc>::V V;
  constexpr int W = Simd<Acc>::W;
  for (int i0 = 0; i0 < M; i0 += kMR) {
    const Acc* a = A + i0 * a_rs;
    for (int j0 = 0; j0 < N; j0 += 2 * W) {
      Acc* c = C + i0 * ldc + j0;
      V c0[kMR], c1[kMR];
#pragma GCC unroll 8
      for (int r = 0; r < kMR; ++r) {
        if (accumulate) {
          c0[r] = vload<V>(c + r * ldc);
          c1[r] = vload<V>(c + r * ldc + W);
        } else {
          c0[r] = splat<V>(Acc(0));
          c1[r] = splat<V>(Acc(0));
        }
      }
      const Acc* b = B + j0;
      for (int kk = 0; kk < K; ++kk) {
        const V b0 = vload<V>(b + kk * ldb);
        const V b1 = vload<V>(b + kk * ldb + W);
        const Acc* ak = a + kk * a_cs;
#pragma GCC unroll 8
        for (int r = 0; r < kMR; ++r) {
          const Acc s = ak[r * a_rs];
          c0[r] += s * b0;
          c1[r] += s * b1;
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < kMR; ++r) {
        vstore(c + r * ldc, c0[r]);
        vstore(c + r * ldc + W, c1[r]);
      }
    }
  }
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Per-thread block buffers, carved out of one arena allocated before the parallel region.
template <class Acc>
struct Work {
  typedef typename Simd<Acc>::I I;
  Acc* Qs;    // [kBM, Dp]
  Acc* Kt;    // [D, kBN]
  Acc* Kn;    // [kBN, Dp]
  Acc* Z;     // [kBM, kBN] scores, then dz
  Acc* G;     // [max(kBM, kBN), Dp] dq or dk accumulator
  Acc* tb;    // [kBN] teacher block / probabilities to store
  I* kval;    // [kBN] -1 for a real key inside the block, 0 otherwise
  Acc* m;     // [kBM] per-row state ...
  Acc* l;
  Acc* ts;
  Acc* tz;
  Acc* tl;
  Acc* lse;
  Acc* tm;
  Acc* g;
  int32_t* pos;  // [kBM] query positions
  int32_t* qi;   // [kBM] row indices into [0, Q)

  static size_t bytes(int64_t D, int Dp) {
    size_t n = 0;
    auto add = [&](size_t e) { n += (e + 63) / 64 * 64; };
    add(sizeof(Acc) * kBM * Dp);
    add(sizeof(Acc) * D * kBN);
    add(sizeof(Acc) * kBN * Dp);
    add(sizeof(Acc) * kBM * kBN);
    add(sizeof(Acc) * (kBM > kBN ? kBM : kBN) * Dp);
    add(sizeof(Acc) * kBN);
    add(sizeof(I) * kBN);
    for (int i = 0; i < 8; ++i) add(sizeof(Acc) * kBM);
    add(sizeof(int32_t) * kBM);
    add(sizeof(int32_t) * kBM);
    return n;
  }
  void carve(char* base, int64_t D, int Dp) {
    char* p = base;
    auto take = [&](size_t e) {
      char* r = p;
      p += (e + 63) / 64 * 64;
      return r;
    };
    Qs = reinterpret_cast<Acc*>(take(sizeof(Acc) * kBM * Dp));
    Kt = reinterpret_cast<Acc*>(take(sizeof(Acc) * D * kBN));
    Kn = reinterpret_cast<Acc*>(take(sizeof(Acc) * kBN * Dp));
    Z = reinterpret_cast<Acc*>(take(sizeof(Acc) * kBM * kBN));
    G = reinterpret_cast<Acc*>(take(sizeof(Acc) * (kBM > kBN ? kBM : kBN) * Dp));
    tb = reinterpret_cast<Acc*>(take(sizeof(Acc) * kBN));
    kval = reinterpret_cast<I*>(take(sizeof(I) * kBN));
    Acc** rows[8] = {&m, &l, &ts, &tz, &tl, &lse, &tm, &g};
    for (Acc** r : rows) *r = reinterpret_cast<Acc*>(take(sizeof(Acc) * kBM));
    pos = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * kBM));
    qi = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * kBM));
  }
};

struct Arena {
  char* p = nullptr;
  explicit Arena(size_t n) {
    n = (n + 63) / 64 * 64;
    p = static_cast<char*>(std::aligned_alloc(64, n ? n : 64));
    if (!p) throw std::bad_alloc();
  }
  ~Arena() { std::free(p); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
};

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <class Acc>
void load_teacher(int dtype, const void* base, int64_t off, int n, Acc* dst) {
  switch (dtype) {
    case kF32: {
      const float* s = static_cast<const float*>(base) + off;
      for (int i = 0; i < n; ++i) dst[i] = static_cast<Acc>(s[i]);
      break;
    }
    case kF16: {
      const f16_t* s = static_cast<const f16_t*>(base) + off;
      for (int i = 0; i < n; ++i) dst[i] = load_as<Acc>(s + i);
      break;
    }
    case kBF16: {
      const bf16_t* s = static_cast<const bf16_t*>(base) + off;
      for (int i = 0; i < n; ++i) dst[i] = load_as<Acc>(s + i);
      break;
    }
    default: {
      const double* s = static_cast<const double*>(base) + off;
      for (int i = 0; i < n; ++i) dst[i] = static_cast<Acc>(s[i]);
      break;
    }
  }
}

template <class Acc>
void store_out(int dtype, void* base, int64_t off, const Acc* src, int n) {
  switch (dtype) {
    case kF32: {
      float* d = static_cast<float*>(base) + off;
      for (int i = 0; i < n; ++i) store_from(d + i, src[i]);
      break;
    }
    case kF16: {
      f16_t* d = static_cast<f16_t*>(base) + off;
      for (int i = 0; i < n; ++i) store_from(d + i, src[i]);
      break;
    }
    case kBF16: {
      bf16_t* d = static_cast<bf16_t*>(base) + off;
      for (int i = 0; i < n; ++i) store_from(d + i, src[i]);
      break;
    }
    default: {
      double* d = static_cast<double*>(base) + off;
      for (int i = 0; i < n; ++i) store_from(d + i, src[i]);
      break;
    }
  }
}

inline int elem_size(int dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

// Everything one call needs, derived once from the Problem.
template <class In, class Acc>
struct Op {
  typedef typename Simd<Acc>::V V;
  typedef typename Simd<Acc>::VI VI;
  typedef typename Simd<Acc>::I I;
  static constexpr int W = Simd<Acc>::W;
  static constexpr int NR = 2 * W;

  const Problem& p;
  const In* q;
  const In* k;
  int64_t H, Hkv, L, D, S, Q, G;
  int Dp;
  Acc scale;

  explicit Op(const Problem& pr)
      : p(pr), q(static_cast<const In*>(pr.q)), k(static_cast<const In*>(pr.k)), H(pr.H),
        Hkv(pr.Hkv), L(pr.L), D(pr.D), S(pr.S), Q(pr.Q), G(pr.H / pr.Hkv),
        Dp(round_up(static_cast<int>(pr.D), NR)), scale(static_cast<Acc>(pr.scale)) {}

  int64_t row_index(int b, int s, int qi) const { return (static_cast<int64_t>(b) * S + s) * Q + qi; }

  // Rows [r0, r0 + nr) of sample b's sorted list: positions, indices and scale * q.
  void load_tile(Work<Acc>& w, int b, int h, int r0, int nr) const {
    const int32_t* ord = p.order + static_cast<int64_t>(b) * Q;
    const int32_t* op = p.opos + static_cast<int64_t>(b) * Q;
    const int Mp = round_up(nr, kMR);
    for (int rr = 0; rr < Mp; ++rr) {
      Acc* dst = w.Qs + static_cast<int64_t>(rr) * Dp;
      if (rr < nr) {
        w.pos[rr] = op[r0 + rr];
        w.qi[rr] = ord[r0 + rr];
        const In* src = q + ((static_cast<int64_t>(b) * H + h) * L + w.pos[rr]) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = load_as<Acc>(src + d) * scale;
        for (int d = static_cast<int>(D); d < Dp; ++d) dst[d] = 0;
      } else {
        for (int d = 0; d < Dp; ++d) dst[d] = 0;
      }
    }
  }

  // Keys [n0, n0 + nk) of kv head kvh: transposed copy, row-major copy (optional) and the
  // real-key mask.
  void load_keys(Work<Acc>& w, int b, int kvh, int n0, int nk, bool rowmajor) const {
    const In* kb = k + ((static_cast<int64_t>(b) * Hkv + kvh) * L + n0) * D;
    const int32_t* km = p.key_mask + static_cast<int64_t>(b) * L + n0;
    for (int j = 0; j < nk; ++j) {
      const In* src = kb + static_cast<int64_t>(j) * D;
      for (int64_t d = 0; d < D; ++d) w.Kt[d * kBN + j] = load_as<Acc>(src + d);
      if (rowmajor) {
        Acc* dst = w.Kn + static_cast<int64_t>(j) * Dp;
        for (int64_t d = 0; d < D; ++d) dst[d] = w.Kt[d * kBN + j];
        for (int d = static_cast<int>(D); d < Dp; ++d) dst[d] = 0;
      }
      w.kval[j] = km[j] ? I(-1) : I(0);
    }
    for (int j = nk; j < kBN; ++j) {
      for (int64_t d = 0; d < D; ++d) w.Kt[d * kBN + j] = 0;
      w.kval[j] = 0;
    }
  }

  void scores(Work<Acc>& w, int nr) const {
    gemm<Acc>(round_up(nr, kMR), kBN, static_cast<int>(D), w.Qs, Dp, 1, w.Kt, kBN, w.Z, kBN, false);
  }

  VI valid_mask(const Work<Acc>& w, int j0, int lim) const {
    VI iota;
    for (int i = 0; i < W; ++i) iota[i] = i;
    return vload<VI>(w.kval + j0) & (VI)((iota + j0) < lim);
  }

  // Online log-sum-exp (and the teacher sums when `teacher`) of row rr over one block.
  void fwd_row(Work<Acc>& w, int rr, int n0, int nk, const void* teacher, int64_t trow) const {
    const int lim = w.pos[rr] - n0 + 1;  // keys j < lim are causally visible
    if (lim <= 0) return;
    const int nv = lim < nk ? lim : nk;
    const int nch = (nv + W - 1) / W;
    const Acc* z = w.Z + static_cast<int64_t>(rr) * kBN;
    const V ninf = splat<V>(-std::numeric_limits<Acc>::infinity());
    V vm = ninf;
    for (int c = 0; c < nch; ++c) {
      const VI ok = valid_mask(w, c * W, lim);
      vm = vmax(vm, vselect(ok, vload<V>(z + c * W), ninf));
    }
    const Acc bm = hmax<Acc>(vm);
    const Acc m_old = w.m[rr];
    const Acc m_new = bm > m_old ? bm : m_old;
    if (m_new == -std::numeric_limits<Acc>::infinity()) return;  // no real key yet
    if (teacher) {
      load_teacher<Acc>(p.t_dtype, teacher, trow + n0, nv, w.tb);
      for (int j = nv; j < nch * W; ++j) w.tb[j] = 0;
    }
    V vs = splat<V>(Acc(0)), vt = vs, vtz = vs, vtl = vs;
    const V zero = vs, one = splat<V>(Acc(1));
    for (int c = 0; c < nch; ++c) {
      const VI ok = valid_mask(w, c * W, lim);
      const V zc = vload<V>(z + c * W);
      vs += vexp(vselect(ok, zc - m_new, ninf));
      if (teacher) {
        const V t = vselect(ok, vload<V>(w.tb + c * W), zero);
        vt += t;
        vtz += t * vselect(ok, zc, zero);
        const VI pos = (VI)(t > zero);
        vtl += vselect(pos, t * vlog(vselect(pos, t, one)), zero);
      }
    }
    w.l[rr] = w.l[rr] * std::exp(m_old - m_new) + hsum<Acc>(vs);
    w.m[rr] = m_new;
    if (teacher) {
      w.ts[rr] += hsum<Acc>(vt);
      w.tz[rr] += hsum<Acc>(vtz);
      w.tl[rr] += hsum<Acc>(vtl);
    }
  }

  // dz = g * (T * exp(z - lse) - t) over one block, in place of the scores; 0 where the key
  // is hidden and on padding rows.
  void dz_rows(Work<Acc>& w, int nr, int n0, int nk, const void* teacher, int b, int s) const {
    const int Mp = round_up(nr, kMR);
    const V ninf = splat<V>(-std::numeric_limits<Acc>::infinity());
    const V zero = splat<V>(Acc(0));
    for (int rr = 0; rr < Mp; ++rr) {
      Acc* z = w.Z + static_cast<int64_t>(rr) * kBN;
      const int lim = rr < nr ? w.pos[rr] - n0 + 1 : 0;
      if (lim <= 0 || w.g[rr] == 0) {
        for (int j = 0; j < kBN; ++j) z[j] = 0;
        continue;
      }
      const int nv = lim < nk ? lim : nk;
      const int nch = (nv + W - 1) / W;
      if (teacher) {
        load_teacher<Acc>(p.t_dtype, teacher, row_index(b, s, w.qi[rr]) * L + n0, nv, w.tb);
        for (int j = nv; j < nch * W; ++j) w.tb[j] = 0;
      }
      const Acc lse = w.lse[rr], tm = w.tm[rr], g = w.g[rr];
      for (int c = 0; c < nch; ++c) {
        const VI ok = valid_mask(w, c * W, lim);
        V d = tm * vexp(vselect(ok, vload<V>(z + c * W) - lse, ninf));
        if (teacher) d -= vselect(ok, vload<V>(w.tb + c * W), zero);
        vstore(z + c * W, g * d);
      }
      for (int j = nch * W; j < kBN; ++j) z[j] = 0;
    }
  }

  void load_row_state(Work<Acc>& w, int b, int s, int nr) const {
    const Acc* lse = static_cast<const Acc*>(p.lse_in);
    const Acc* tm = static_cast<const Acc*>(p.tmass);
    const Acc* gr = static_cast<const Acc*>(p.grad);
    for (int rr = 0; rr < nr; ++rr) {
      const int64_t ri = row_index(b, s, w.qi[rr]);
      w.lse[rr] = lse[ri];
      w.tm[rr] = tm[ri];
      w.g[rr] = gr[ri];
    }
  }

  // ---------------------------------------------------------------- forward
  void fwd(Work<Acc>& w, const RowWork& u) const {
    const int b = u.b, s = u.s, nr = u.r1 - u.r0;
    const int h = p.heads[static_cast<int64_t>(b) * S + s];
    const int kvh = static_cast<int>(h / G);
    load_tile(w, b, h, u.r0, nr);
    for (int rr = 0; rr < nr; ++rr) {
      w.m[rr] = -std::numeric_limits<Acc>::infinity();
      w.l[rr] = w.ts[rr] = w.tz[rr] = w.tl[rr] = 0;
    }
    const int lo = p.klo[b], hi = w.pos[nr - 1] + 1;
    for (int n0 = lo; n0 < hi; n0 += kBN) {
      const int nk = hi - n0 < kBN ? hi - n0 : kBN;
      load_keys(w, b, kvh, n0, nk, false);
      scores(w, nr);
      for (int rr = 0; rr < nr; ++rr)
        fwd_row(w, rr, n0, nk, p.teacher, row_index(b, s, w.qi[rr]) * L);
    }
    Acc* rows = static_cast<Acc*>(p.rows);
    Acc* lse = static_cast<Acc*>(p.lse);
    Acc* tout = static_cast<Acc*>(p.tmass_out);
    const Acc* tin = static_cast<const Acc*>(p.tmass_in);
    for (int rr = 0; rr < nr; ++rr) {
      const int64_t ri = row_index(b, s, w.qi[rr]);
      const bool any = w.m[rr] != -std::numeric_limits<Acc>::infinity();
      const Acc ls = any ? w.m[rr] + std::log(w.l[rr]) : Acc(0);
      const Acc T = p.teacher ? w.ts[rr] : tin[ri];
      lse[ri] = ls;
      tout[ri] = T;
      rows[ri] = p.teacher ? w.tl[rr] - w.tz[rr] + T * ls : T * ls;
    }
  }

  // ---------------------------------------------------------------- backward, dq
  // A unit owns every selected row of the positions it holds (the plan never splits a
  // run of repeated positions), so it adds into dq without racing anyone, in a fixed order.
  void bwd_dq(Work<Acc>& w, const RowWork& u) const {
    const int b = u.b, s = u.s;
    const int h = p.heads[static_cast<int64_t>(b) * S + s];
    const int kvh = static_cast<int>(h / G);
    Acc* dq = static_cast<Acc*>(p.dq);
    // fp32/fp64 input whose rows need no padding: the GEMM reads K where it lies.
    const bool direct_k = std::is_same<In, Acc>::value && static_cast<int>(D) == Dp;
    for (int r0 = u.r0; r0 < u.r1; r0 += kBM) {
      const int nr = u.r1 - r0 < kBM ? u.r1 - r0 : kBM;
      const int Mp = round_up(nr, kMR);
      load_tile(w, b, h, r0, nr);
      load_row_state(w, b, s, nr);
      bool any = false;
      for (int rr = 0; rr < nr; ++rr) any |= w.g[rr] != 0;
      if (!any) continue;
      const int lo = p.klo[b], hi = w.pos[nr - 1] + 1;
      bool first = true;
      for (int n0 = lo; n0 < hi; n0 += kBN) {
        const int nk = hi - n0 < kBN ? hi - n0 : kBN;
        load_keys(w, b, kvh, n0, nk, !direct_k);
        scores(w, nr);
        dz_rows(w, nr, n0, nk, p.teacher, b, s);
        const Acc* kn = direct_k ? reinterpret_cast<const Acc*>(k) + ((static_cast<int64_t>(b) * Hkv + kvh) * L + n0) * D
                                 : w.Kn;
        gemm<Acc>(Mp, Dp, nk, w.Z, kBN, 1, kn, Dp, w.G, Dp, !first);
        first = false;
      }
      if (first) continue;
      for (int rr = 0; rr < nr; ++rr) {
        Acc* dst = dq + ((static_cast<int64_t>(b) * H + h) * L + w.pos[rr]) * D;
        const Acc* src = w.G + static_cast<int64_t>(rr) * Dp;
        for (int64_t d = 0; d < D; ++d) dst[d] += scale * src[d];
      }
    }
  }

  // ---------------------------------------------------------------- backward, dk
  // One unit owns a block of dk rows of one kv head and visits every selected row (of every
  // slot whose head reads this kv head) that can see the block: race-free, deterministic.
  void bwd_dk(Work<Acc>& w, const KeyWork& u) const {
    const int b = u.b, kvh = u.kvh, n0 = u.n0;
    const int nk = L - n0 < kBN ? static_cast<int>(L - n0) : kBN;
    Acc* dk = static_cast<Acc*>(p.dk) + ((static_cast<int64_t>(b) * Hkv + kvh) * L + n0) * D;
    const int32_t* op = p.opos + static_cast<int64_t>(b) * Q;
    const int n_act = p.nact[b];
    // First sorted row whose position reaches this block; earlier rows cannot see it.
    int first_row = 0, hi_row = n_act;
    while (first_row < hi_row) {
      const int mid = (first_row + hi_row) / 2;
      if (op[mid] < n0) first_row = mid + 1; else hi_row = mid;
    }
    bool touched = false;
    if (first_row < n_act && p.klo[b] < n0 + nk) {
      bool loaded = false;
      for (int s = 0; s < S; ++s) {
        const int h = p.heads[static_cast<int64_t>(b) * S + s];
        if (h < 0 || h / G != kvh) continue;
        if (!loaded) {
          load_keys(w, b, kvh, n0, nk, false);
          loaded = true;
        }
        for (int r0 = first_row; r0 < n_act; r0 += kBM) {
          const int nr = n_act - r0 < kBM ? n_act - r0 : kBM;
          load_tile(w, b, h, r0, nr);
          load_row_state(w, b, s, nr);
          bool any = false;
          for (int rr = 0; rr < nr; ++rr) any |= w.g[rr] != 0;
          if (!any) continue;
          scores(w, nr);
          dz_rows(w, nr, n0, nk, p.teacher, b, s);
          // dk_block += dz^T Qs: A(j, r) = dz[r, j].
          gemm<Acc>(kBN, Dp, nr, w.Z, 1, kBN, w.Qs, Dp, w.G, Dp, touched);
          touched = true;
        }
      }
    }
    for (int j = 0; j < nk; ++j) {
      Acc* dst = dk + static_cast<int64_t>(j) * D;
      if (touched) {
        std::memcpy(dst, w.G + static_cast<int64_t>(j) * Dp, sizeof(Acc) * D);
      } else {
        std::memset(dst, 0, sizeof(Acc) * D);
      }
    }
  }

  // ---------------------------------------------------------------- probabilities
  void probs(Work<Acc>& w, const RowWork& u) const {
    const int b = u.b, s = u.s, nr = u.r1 - u.r0;
    const int h = p.heads[static_cast<int64_t>(b) * S + s];
    const int kvh = static_cast<int>(h / G);
    load_tile(w, b, h, u.r0, nr);
    for (int rr = 0; rr < nr; ++rr) {
      w.m[rr] = -std::numeric_limits<Acc>::infinity();
      w.l[rr] = 0;
    }
    const int lo = p.klo[b], hi = w.pos[nr - 1] + 1;
    for (int n0 = lo; n0 < hi; n0 += kBN) {
      const int nk = hi - n0 < kBN ? hi - n0 : kBN;
      load_keys(w, b, kvh, n0, nk, false);
      scores(w, nr);
      for (int rr = 0; rr < nr; ++rr) fwd_row(w, rr, n0, nk, nullptr, 0);
    }
    for (int rr = 0; rr < nr; ++rr)
      w.lse[rr] = w.l[rr] > 0 ? w.m[rr] + std::log(w.l[rr]) : Acc(0);
    const int es = elem_size(p.out_dtype);
    char* out = static_cast<char*>(p.out);
    for (int rr = 0; rr < nr; ++rr) {
      const int64_t base = row_index(b, s, w.qi[rr]) * L;
      std::memset(out + base * es, 0, static_cast<size_t>(lo) * es);
      std::memset(out + (base + hi) * es, 0, static_cast<size_t>(L - hi) * es);
    }
    const V ninf = splat<V>(-std::numeric_limits<Acc>::infinity());
    for (int n0 = lo; n0 < hi; n0 += kBN) {
      const int nk = hi - n0 < kBN ? hi - n0 : kBN;
      load_keys(w, b, kvh, n0, nk, false);
      scores(w, nr);
      for (int rr = 0; rr < nr; ++rr) {
        const int lim = w.pos[rr] - n0 + 1;
        const Acc* z = w.Z + static_cast<int64_t>(rr) * kBN;
        const int nch = (nk + W - 1) / W;
        for (int c = 0; c < nch; ++c) {
          const VI ok = valid_mask(w, c * W, lim);
          vstore(w.tb + c * W, vexp(vselect(ok, vload<V>(z + c * W) - w.lse[rr], ninf)));
        }
        store_out<Acc>(p.out_dtype, p.out, row_index(b, s, w.qi[rr]) * L + n0, w.tb, nk);
      }
    }
  }
};

// ---------------------------------------------------------------- attention_sqdiff
// One unit = one tile of rows of one (sample, slot), for both models. `a` and `b` share the
// plan (positions, row order, key mask), so their tiles and key blocks line up.
template <class In, class Acc>
void sqdiff_unit(const Op<In, Acc>& a, const Op<In, Acc>& b, Work<Acc>& wa, Work<Acc>& wb,
                 const RowWork& u) {
  typedef typename Op<In, Acc>::V V;
  typedef typename Op<In, Acc>::VI VI;
  constexpr int W = Op<In, Acc>::W;
  const Problem& p = a.p;
  const int bi = u.b, s = u.s, nr = u.r1 - u.r0;
  const int h = p.heads[static_cast<int64_t>(bi) * a.S + s];
  const int kvh = static_cast<int>(h / a.G);
  a.load_tile(wa, bi, h, u.r0, nr);
  b.load_tile(wb, bi, h, u.r0, nr);
  const Acc inf = std::numeric_limits<Acc>::infinity();
  for (int rr = 0; rr < nr; ++rr) {
    wa.m[rr] = wb.m[rr] = -inf;
    wa.l[rr] = wb.l[rr] = 0;
  }
  const int lo = p.klo[bi], hi = wa.pos[nr - 1] + 1;
  for (int n0 = lo; n0 < hi; n0 += kBN) {
    const int nk = hi - n0 < kBN ? hi - n0 : kBN;
    a.load_keys(wa, bi, kvh, n0, nk, false);
    b.load_keys(wb, bi, kvh, n0, nk, false);
    a.scores(wa, nr);
    b.scores(wb, nr);
    for (int rr = 0; rr < nr; ++rr) {
      a.fwd_row(wa, rr, n0, nk, nullptr, 0);
      b.fwd_row(wb, rr, n0, nk, nullptr, 0);
    }
  }
  // An active row always sees its own (real) key, so l > 0; the guard only keeps a
  // hypothetical empty row at 0 instead of NaN.
  for (int rr = 0; rr < nr; ++rr) {
    wa.lse[rr] = wa.l[rr] > 0 ? wa.m[rr] + std::log(wa.l[rr]) : Acc(0);
    wb.lse[rr] = wb.l[rr] > 0 ? wb.m[rr] + std::log(wb.l[rr]) : Acc(0);
    wa.ts[rr] = 0;
  }
  const V ninf = splat<V>(-inf);
  for (int n0 = lo; n0 < hi; n0 += kBN) {
    const int nk = hi - n0 < kBN ? hi - n0 : kBN;
    a.load_keys(wa, bi, kvh, n0, nk, false);
    b.load_keys(wb, bi, kvh, n0, nk, false);
    a.scores(wa, nr);
    b.scores(wb, nr);
    for (int rr = 0; rr < nr; ++rr) {
      const int lim = wa.pos[rr] - n0 + 1;
      if (lim <= 0) continue;
      const int nv = lim < nk ? lim : nk;
      const int nch = (nv + W - 1) / W;
      const Acc* za = wa.Z + static_cast<int64_t>(rr) * kBN;
      const Acc* zb = wb.Z + static_cast<int64_t>(rr) * kBN;
      V acc = splat<V>(Acc(0));
      for (int c = 0; c < nch; ++c) {
        // Hidden keys become exp(-inf) = 0 in both rows and add nothing.
        const VI ok = a.valid_mask(wa, c * W, lim);
        const V d = vexp(vselect(ok, vload<V>(za + c * W) - wa.lse[rr], ninf)) -
                    vexp(vselect(ok, vload<V>(zb + c * W) - wb.lse[rr], ninf));
        acc += d * d;
      }
      wa.ts[rr] += hsum<Acc>(acc);
    }
  }
  Acc* rows = static_cast<Acc*>(p.rows);
  for (int rr = 0; rr < nr; ++rr) rows[a.row_index(bi, s, wa.qi[rr])] = wa.ts[rr];
}

template <class In, class Acc>
void run_sqdiff(const Problem& p) {
  const Op<In, Acc> a(p);
  Problem pb = p;
  pb.q = p.q_b;
  pb.k = p.k_b;
  const Op<In, Acc> b(pb);
  std::memset(p.rows, 0, sizeof(Acc) * p.B * p.S * p.Q);  // inactive rows stay 0
  if (p.n_row_work == 0) return;
  const int nt = p.threads > 0 ? p.threads : 1;
  const size_t per = Work<Acc>::bytes(p.D, a.Dp);
  Arena arena(2 * per * nt);
#pragma omp parallel num_threads(nt)
  {
    Work<Acc> wa, wb;
    wa.carve(arena.p + 2 * per * thread_id(), p.D, a.Dp);
    wb.carve(arena.p + 2 * per * thread_id() + per, p.D, a.Dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < p.n_row_work; ++i) sqdiff_unit(a, b, wa, wb, p.row_work[i]);
  }
}

template <class In, class Acc>
void run_fwd(const Problem& p) {
  const Op<In, Acc> op(p);
  const int64_t nrows = p.B * p.S * p.Q;
  std::memset(p.rows, 0, sizeof(Acc) * nrows);
  std::memset(p.lse, 0, sizeof(Acc) * nrows);
  std::memset(p.tmass_out, 0, sizeof(Acc) * nrows);
  if (p.n_row_work == 0) return;
  const int nt = p.threads > 0 ? p.threads : 1;
  const size_t per = Work<Acc>::bytes(p.D, op.Dp);
  Arena arena(per * nt);
#pragma omp parallel num_threads(nt)
  {
    Work<Acc> w;
    w.carve(arena.p + per * thread_id(), p.D, op.Dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < p.n_row_work; ++i) op.fwd(w, p.row_work[i]);
  }
}

template <class In, class Acc>
void run_bwd(const Problem& p) {
  const Op<In, Acc> op(p);
  const int nt = p.threads > 0 ? p.threads : 1;
  const size_t per = Work<Acc>::bytes(p.D, op.Dp);
  Arena arena(per * nt);
  const int64_t dq_rows = p.B * p.H * p.L;
#pragma omp parallel num_threads(nt)
  {
    Work<Acc> w;
    w.carve(arena.p + per * thread_id(), p.D, op.Dp);
    // dq is accumulated into: clear it first (the barrier of this loop orders the two).
#pragma omp for schedule(static)
    for (int64_t r = 0; r < dq_rows; r += 256) {
      const int64_t n = dq_rows - r < 256 ? dq_rows - r : 256;
      std::memset(static_cast<Acc*>(p.dq) + r * p.D, 0, sizeof(Acc) * n * p.D);
    }
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t i = 0; i < p.n_row_work; ++i) op.bwd_dq(w, p.row_work[i]);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < p.n_key_work; ++i) op.bwd_dk(w, p.key_work[i]);
  }
}

template <class In, class Acc>
void run_probs(const Problem& p) {
  const Op<In, Acc> op(p);
  const int nt = p.threads > 0 ? p.threads : 1;
  const size_t per = Work<Acc>::bytes(p.D, op.Dp);
  Arena arena(per * nt);
  const int es = elem_size(p.out_dtype);
#pragma omp parallel num_threads(nt)
  {
    Work<Acc> w;
    w.carve(arena.p + per * thread_id(), p.D, op.Dp);
    // Inactive rows (empty slot or padded query) are all zeros; active rows are written
    // in full by their tile.
#pragma omp for schedule(static)
    for (int64_t bs = 0; bs < p.B * p.S; ++bs) {
      const int64_t b = bs / p.S;
      const bool empty = p.heads[bs] < 0;
      for (int64_t qi = 0; qi < p.Q; ++qi) {
        if (empty || !p.key_mask[b * p.L + p.queries[b * p.Q + qi]])
          std::memset(static_cast<char*>(p.out) + (bs * p.Q + qi) * p.L * es, 0,
                      static_cast<size_t>(p.L) * es);
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < p.n_row_work; ++i) op.probs(w, p.row_work[i]);
  }
}

}  // namespace

#define SEEKR_DISPATCH(fn, p)                  \
  switch ((p).q_dtype) {                        \
    case kF32: fn<float, float>(p); break;      \
    case kF16: fn<f16_t, float>(p); break;      \
    case kBF16: fn<bf16_t, float>(p); break;    \
    default: fn<double, double>(p); break;      \
  }

void SEEKR_CAT(attention_kl_fwd, SEEKR_ISA)(const Problem& p) { SEEKR_DISPATCH(run_fwd, p) }
void SEEKR_CAT(attention_kl_bwd, SEEKR_ISA)(const Problem& p) { SEEKR_DISPATCH(run_bwd, p) }
void SEEKR_CAT(attention_probs, SEEKR_ISA)(const Problem& p) { SEEKR_DISPATCH(run_probs, p) }
void SEEKR_CAT(attention_sqdiff, SEEKR_ISA)(const Problem& p) { SEEKR_DISPATCH(run_sqdiff, p) }

}  // namespace cpu
}  // namespace seekr

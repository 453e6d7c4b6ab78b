// Shared between the CPU dispatcher (cpu_dispatch.cpp) and the kernel translation unit
// (cpu_kernels.cpp), which is compiled once per instruction set (generic, AVX2, AVX-512).
//
// Only plain data and declarations live here: any inline function shared by translation
// units built with different -m flags could be merged by the linker into a single copy
// compiled for the wider ISA, and then run on a CPU without it.
#pragma once

#include <cstdint>

namespace seekr {
namespace cpu {

// dtype codes of the native-code convention.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Row tile (selected query rows) and key block sizes. Both are multiples of every
// micro-kernel register tile (MR <= 8 rows, NR <= 32 columns).
constexpr int kBM = 64;
constexpr int kBN = 64;

// One unit of parallel work over selected rows: rows [r0, r1) of sample b's sorted
// active-row list, for slot s. For the dq pass a unit may hold several row tiles: it
// then owns every row of the positions it holds (see cpu_dispatch.cpp).
struct RowWork {
  int32_t b, s, r0, r1;
};

// One unit of the dk pass: key block [n0, n0 + kBN) of kv head kvh in sample b.
struct KeyWork {
  int32_t b, kvh, n0, pad;
};

struct Problem {
  // inputs
  const void* q = nullptr;         // [B, H, L, D] contiguous, q_dtype
  const void* k = nullptr;         // [B, Hkv, L, D] contiguous, q_dtype
  const void* q_b = nullptr;       // attention_sqdiff: model b's q and k, shaped and typed
  const void* k_b = nullptr;       //   like q and k (model a's)
  const void* teacher = nullptr;   // [B, S, Q, L] contiguous, t_dtype; null = no teacher
  const void* tmass_in = nullptr;  // [B, S, Q] acc dtype (used when teacher is null)
  const int32_t* heads = nullptr;  // [B, S]
  const int32_t* queries = nullptr;  // [B, Q]
  const int32_t* key_mask = nullptr;  // [B, L]
  const void* lse_in = nullptr;    // [B, S, Q] acc (backward)
  const void* tmass = nullptr;     // [B, S, Q] acc (backward)
  const void* grad = nullptr;      // [B, S, Q] acc (backward)
  // outputs
  void* rows = nullptr;     // [B, S, Q] acc (KL rows, or sqdiff rows)
  void* lse = nullptr;      // [B, S, Q] acc
  void* tmass_out = nullptr;  // [B, S, Q] acc
  void* dq = nullptr;       // [B, H, L, D] acc
  void* dk = nullptr;       // [B, Hkv, L, D] acc
  void* out = nullptr;      // [B, S, Q, L] out_dtype (attention_probs)
  int q_dtype = kF32, t_dtype = kF32, out_dtype = kF32;
  int64_t B = 0, H = 0, Hkv = 0, L = 0, D = 0, S = 0, Q = 0;
  double scale = 1.0;

  // plan (built by the dispatcher)
  const int32_t* order = nullptr;  // [B, Q]: active row indices of sample b sorted by position
  const int32_t* opos = nullptr;   // [B, Q]: their positions (non-decreasing)
  const int32_t* nact = nullptr;   // [B]: number of active rows of sample b
  const int32_t* klo = nullptr;    // [B]: first real key (L when none)
  const RowWork* row_work = nullptr;
  int64_t n_row_work = 0;
  const KeyWork* key_work = nullptr;
  int64_t n_key_work = 0;
  int threads = 1;  // OpenMP team size: small problems do not pay for waking threads
};

// Kernel entry points, one set per compiled instruction set. They assume a validated
// problem and a plan; they write every output element.
#define SEEKR_DECLARE_ISA(isa)                    \
  void attention_kl_fwd_##isa(const Problem& p); \
  void attention_kl_bwd_##isa(const Problem& p); \
  void attention_probs_##isa(const Problem& p);  \
  void attention_sqdiff_##isa(const Problem& p);

SEEKR_DECLARE_ISA(generic)
#if defined(SEEKR_HAVE_AVX2)
SEEKR_DECLARE_ISA(avx2)
#endif
#if defined(SEEKR_HAVE_AVX512)
SEEKR_DECLARE_ISA(avx512)
#endif
#undef SEEKR_DECLARE_ISA

}  // namespace cpu
}  // namespace seekr

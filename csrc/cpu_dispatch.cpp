// Argument re-checks, work planning and instruction-set dispatch for the CPU kernels.
//
// Compiled with the baseline flags of the target (no -m extensions): it is the only code
// that runs before we know which instruction sets the CPU has.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_common.h"
#include "seekr_cpu.h"

namespace seekr {
namespace cpu {
namespace {

[[noreturn]] void fail(const std::string& name, const std::string& msg) {
  throw std::invalid_argument(name + ": " + msg);
}

std::string str(int64_t v) { return std::to_string(v); }

int elem_size(int code) { return code == kF64 ? 8 : code == kF32 ? 4 : 2; }

void check_code(const char* name, int code) {
  if (code < 0 || code > 3)
    fail(name, "dtype code must be 0 (fp32), 1 (fp16), 2 (bf16) or 3 (fp64), got " + str(code));
}

// Null is only allowed for arguments of zero size; the rest must be aligned to their dtype.
void check_ptr(const char* name, uintptr_t ptr, int64_t numel, int esize) {
  if (numel == 0) return;
  if (ptr == 0) fail(name, "null data pointer for a tensor of " + str(numel) + " elements");
  if (ptr % static_cast<uintptr_t>(esize) != 0)
    fail(name, "data pointer is not aligned to its element size (" + str(esize) + " bytes)");
}

int64_t mul_checked(std::initializer_list<int64_t> dims, const char* what) {
  int64_t n = 1;
  for (int64_t d : dims) {
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / 16 / d) fail(what, "size overflows int64");
    n *= d;
  }
  return n;
}

// Dimension checks shared by the three entry points; fills the scalar part of `p`.
void check_dims(Problem& p, int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t S,
                int64_t Q, int q_dtype, double scale) {
  if (B < 1) fail("B", "must be >= 1, got " + str(B));
  if (H < 1) fail("H", "must be >= 1, got " + str(H));
  if (Hkv < 1) fail("Hkv", "must be >= 1, got " + str(Hkv));
  if (H % Hkv != 0) fail("Hkv", "H=" + str(H) + " is not a multiple of Hkv=" + str(Hkv));
  if (L < 1 || L > std::numeric_limits<int32_t>::max() - kBN)
    fail("L", "must lie in [1, 2^31 - 65], got " + str(L));
  if (D < 1 || D > 4096) fail("D", "must lie in [1, 4096], got " + str(D));
  if (S < 0) fail("S", "must be >= 0, got " + str(S));
  if (Q < 0 || Q > std::numeric_limits<int32_t>::max()) fail("Q", "must lie in [0, 2^31), got " + str(Q));
  check_code("q_dtype", q_dtype);
  if (!std::isfinite(scale) || scale <= 0) fail("scale", "must be finite and > 0");
  mul_checked({B, H, L, D}, "q");
  mul_checked({B, S, Q, L}, "teacher");
  p.B = B; p.H = H; p.Hkv = Hkv; p.L = L; p.D = D; p.S = S; p.Q = Q;
  p.q_dtype = q_dtype;
  p.scale = scale;
}

// Range checks of the index tensors (cheap: B*S + B*Q + B*L reads).
void check_indices(const Problem& p) {
  for (int64_t b = 0; b < p.B; ++b) {
    const int32_t* hb = p.heads + b * p.S;
    for (int64_t s = 0; s < p.S; ++s) {
      if (hb[s] < -1 || hb[s] >= p.H)
        fail("heads", "value " + str(hb[s]) + " at [" + str(b) + ", " + str(s) + "] is outside [-1, " + str(p.H) + ")");
      for (int64_t s2 = 0; s2 < s; ++s2)
        if (hb[s] >= 0 && hb[s2] == hb[s])
          fail("heads", "head " + str(hb[s]) + " appears twice in sample " + str(b));
    }
    const int32_t* qb = p.queries + b * p.Q;
    for (int64_t i = 0; i < p.Q; ++i)
      if (qb[i] < 0 || qb[i] >= p.L)
        fail("queries", "position " + str(qb[i]) + " at [" + str(b) + ", " + str(i) + "] is outside [0, " + str(p.L) + ")");
    const int32_t* mb = p.key_mask + b * p.L;
    for (int64_t j = 0; j < p.L; ++j)
      if (mb[j] != 0 && mb[j] != 1)
        fail("key_mask", "value " + str(mb[j]) + " at [" + str(b) + ", " + str(j) + "] is not 0 or 1");
  }
}

// Which rows run where. Active rows of each sample are sorted by position (stable, so the
// order is fixed) so that a tile's causal horizon is its last row and a key block's
// readers form a suffix.
struct Plan {
  std::vector<int32_t> order, opos, nact, klo;
  std::vector<RowWork> rows;
  std::vector<KeyWork> keys;
  int threads = 1;

  void attach(Problem& p) const {
    p.order = order.data();
    p.opos = opos.data();
    p.nact = nact.data();
    p.klo = klo.data();
    p.row_work = rows.data();
    p.n_row_work = static_cast<int64_t>(rows.size());
    p.key_work = keys.data();
    p.n_key_work = static_cast<int64_t>(keys.size());
    p.threads = threads;
  }
};

enum class Units { kTiles, kOwnedGroups };

// kTiles: one unit per tile of kBM rows (forward, probabilities).
// kOwnedGroups (dq): consecutive tiles are merged while a tile boundary would split a run
// of equal positions, so each unit owns all the rows of its positions and can add into dq
// without atomics; the sum over repeated positions is then in a fixed order.
// work_factor: score passes per row relative to the forward (attention_sqdiff runs two
// models twice), so that the thread count follows the real amount of work.
Plan make_plan(const Problem& p, Units units, bool with_keys, int work_factor = 1) {
  Plan pl;
  const int64_t B = p.B, Q = p.Q, L = p.L, S = p.S;
  pl.order.assign(static_cast<size_t>(B * Q), 0);
  pl.opos.assign(static_cast<size_t>(B * Q), 0);
  pl.nact.assign(static_cast<size_t>(B), 0);
  pl.klo.assign(static_cast<size_t>(B), static_cast<int32_t>(L));
  std::vector<int64_t> cost_rows;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* qb = p.queries + b * Q;
    const int32_t* mb = p.key_mask + b * L;
    for (int64_t j = 0; j < L; ++j)
      if (mb[j]) { pl.klo[b] = static_cast<int32_t>(j); break; }
    int32_t* ord = pl.order.data() + b * Q;
    int n = 0;
    for (int64_t i = 0; i < Q; ++i)
      if (mb[qb[i]]) ord[n++] = static_cast<int32_t>(i);
    std::stable_sort(ord, ord + n, [qb](int32_t x, int32_t y) { return qb[x] < qb[y]; });
    int32_t* op = pl.opos.data() + b * Q;
    for (int i = 0; i < n; ++i) op[i] = qb[ord[i]];
    pl.nact[b] = n;
  }
  std::vector<std::pair<int64_t, RowWork>> rw;
  int64_t total = 0;  // ~ score multiply-adds / D
  for (int64_t b = 0; b < B; ++b) {
    const int n = pl.nact[b];
    const int32_t* op = pl.opos.data() + b * Q;
    for (int64_t s = 0; s < S; ++s) {
      if (p.heads[b * S + s] < 0) continue;
      int r0 = 0;
      while (r0 < n) {
        int r1 = std::min(r0 + kBM, n);
        if (units == Units::kOwnedGroups)
          while (r1 < n && op[r1] == op[r1 - 1]) r1 = std::min(r1 + kBM, n);
        // Work ~ rows x keys they scan (the last row of a tile sets the horizon).
        const int64_t cost = static_cast<int64_t>(r1 - r0) * (op[r1 - 1] + 1 - pl.klo[b]);
        total += cost;
        rw.push_back({cost, RowWork{static_cast<int32_t>(b), static_cast<int32_t>(s), r0, r1}});
        r0 = r1;
      }
    }
  }
  // Heaviest first, so dynamic scheduling does not end on one long tile.
  std::stable_sort(rw.begin(), rw.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  for (const auto& x : rw) pl.rows.push_back(x.second);

  if (with_keys) {
    const int64_t G = p.H / p.Hkv;
    std::vector<std::pair<int64_t, KeyWork>> kw;
    for (int64_t b = 0; b < B; ++b) {
      const int n = pl.nact[b];
      const int32_t* op = pl.opos.data() + b * Q;
      for (int64_t kvh = 0; kvh < p.Hkv; ++kvh) {
        int64_t readers = 0;
        for (int64_t s = 0; s < S; ++s) {
          const int32_t h = p.heads[b * S + s];
          readers += (h >= 0 && h / G == kvh);
        }
        for (int64_t n0 = 0; n0 < L; n0 += kBN) {
          const int64_t seen = n - (std::lower_bound(op, op + n, static_cast<int32_t>(n0)) - op);
          kw.push_back({readers * seen, KeyWork{static_cast<int32_t>(b), static_cast<int32_t>(kvh),
                                                static_cast<int32_t>(n0), 0}});
        }
      }
    }
    std::stable_sort(kw.begin(), kw.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
    for (const auto& x : kw) pl.keys.push_back(x.second);
  }
  // Waking a thread costs microseconds (milliseconds on a busy machine): give each one at
  // least ~1M multiply-adds of score work, and never more threads than units of work.
  const int64_t n_units = static_cast<int64_t>(pl.rows.size() + pl.keys.size());
  const int64_t by_work = std::max<int64_t>(1, total * p.D * (with_keys ? 3 : 1) * work_factor >> 20);
  pl.threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({by_work, n_units,
                                                                           num_threads()})));
  return pl;
}

// ------------------------------------------------------------------ instruction sets
struct Isa {
  const char* name;
  void (*fwd)(const Problem&);
  void (*bwd)(const Problem&);
  void (*probs)(const Problem&);
  void (*sqdiff)(const Problem&);
  bool (*supported)();
};

bool always() { return true; }
#if defined(SEEKR_HAVE_AVX2)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif
#if defined(SEEKR_HAVE_AVX512)
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

// Widest first.
const Isa kIsas[] = {
#if defined(SEEKR_HAVE_AVX512)
    {"avx512", attention_kl_fwd_avx512, attention_kl_bwd_avx512, attention_probs_avx512, attention_sqdiff_avx512,
     has_avx512},
#endif
#if defined(SEEKR_HAVE_AVX2)
    {"avx2", attention_kl_fwd_avx2, attention_kl_bwd_avx2, attention_probs_avx2, attention_sqdiff_avx2,
     has_avx2},
#endif
#if defined(SEEKR_NATIVE_BUILD)  // the "generic" copy was built with -march=native
    {"native", attention_kl_fwd_generic, attention_kl_bwd_generic, attention_probs_generic,
     attention_sqdiff_generic, always},
#else
    {"generic", attention_kl_fwd_generic, attention_kl_bwd_generic, attention_probs_generic,
     attention_sqdiff_generic, always},
#endif
};

const Isa& pick_isa() {
  const char* want = std::getenv("SEEKR_CPU_ISA");
  if (want && *want) {
    for (const Isa& i : kIsas)
      if (want == std::string(i.name) && i.supported()) return i;
    std::string avail;
    for (const Isa& i : kIsas)
      if (i.supported()) avail += std::string(avail.empty() ? "" : ", ") + i.name;
    fail("SEEKR_CPU_ISA", "'" + std::string(want) + "' is not available on this build/CPU (available: " + avail + ")");
  }
  for (const Isa& i : kIsas)
    if (i.supported()) return i;
  return kIsas[sizeof(kIsas) / sizeof(kIsas[0]) - 1];
}

int acc_size(int q_dtype) { return q_dtype == kF64 ? 8 : 4; }

}  // namespace

// The inputs every entry point reads, already checked by check_ptr above each call.
static void set_inputs(Problem& p, uintptr_t q, uintptr_t k, uintptr_t heads, uintptr_t queries,
                       uintptr_t key_mask) {
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.heads = reinterpret_cast<const int32_t*>(heads);
  p.queries = reinterpret_cast<const int32_t*>(queries);
  p.key_mask = reinterpret_cast<const int32_t*>(key_mask);
}

void attention_kl_fwd(uintptr_t q, uintptr_t k, uintptr_t teacher, int teacher_dtype,
                      uintptr_t tmass_in, uintptr_t heads, uintptr_t queries, uintptr_t key_mask,
                      uintptr_t rows_out, uintptr_t lse_out, uintptr_t tmass_out, int64_t B,
                      int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t S, int64_t Q,
                      int q_dtype, double scale) {
  Problem p;
  check_dims(p, B, H, Hkv, L, D, S, Q, q_dtype, scale);
  const int es = elem_size(q_dtype), as = acc_size(q_dtype);
  const int64_t nrows = B * S * Q;
  check_ptr("q", q, B * H * L * D, es);
  check_ptr("k", k, B * Hkv * L * D, es);
  check_ptr("heads", heads, B * S, 4);
  check_ptr("queries", queries, B * Q, 4);
  check_ptr("key_mask", key_mask, B * L, 4);
  check_ptr("rows_out", rows_out, nrows, as);
  check_ptr("lse_out", lse_out, nrows, as);
  check_ptr("tmass_out", tmass_out, nrows, as);
  if (nrows > 0) {
    if ((teacher == 0) == (tmass_in == 0))
      fail("teacher", "pass exactly one of teacher (dense rows) and tmass_in (teacher mass)");
    if (teacher) {
      check_code("teacher_dtype", teacher_dtype);
      check_ptr("teacher", teacher, nrows * L, elem_size(teacher_dtype));
    } else {
      check_ptr("tmass_in", tmass_in, nrows, as);
    }
  }
  set_inputs(p, q, k, heads, queries, key_mask);
  p.teacher = reinterpret_cast<const void*>(teacher);
  p.t_dtype = teacher_dtype;
  p.tmass_in = reinterpret_cast<const void*>(tmass_in);
  p.rows = reinterpret_cast<void*>(rows_out);
  p.lse = reinterpret_cast<void*>(lse_out);
  p.tmass_out = reinterpret_cast<void*>(tmass_out);
  if (nrows == 0) return;
  check_indices(p);
  const Isa& isa = pick_isa();
  const Plan plan = make_plan(p, Units::kTiles, false);
  plan.attach(p);
  isa.fwd(p);
}

void attention_kl_bwd(uintptr_t q, uintptr_t k, uintptr_t teacher, int teacher_dtype,
                      uintptr_t heads, uintptr_t queries, uintptr_t key_mask, uintptr_t lse,
                      uintptr_t tmass, uintptr_t grad_rows, uintptr_t dq_out, uintptr_t dk_out,
                      int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t S,
                      int64_t Q, int q_dtype, double scale) {
  Problem p;
  check_dims(p, B, H, Hkv, L, D, S, Q, q_dtype, scale);
  const int es = elem_size(q_dtype), as = acc_size(q_dtype);
  const int64_t nrows = B * S * Q;
  check_ptr("q", q, B * H * L * D, es);
  check_ptr("k", k, B * Hkv * L * D, es);
  check_ptr("heads", heads, B * S, 4);
  check_ptr("queries", queries, B * Q, 4);
  check_ptr("key_mask", key_mask, B * L, 4);
  check_ptr("lse", lse, nrows, as);
  check_ptr("tmass", tmass, nrows, as);
  check_ptr("grad_rows", grad_rows, nrows, as);
  check_ptr("dq_out", dq_out, B * H * L * D, as);
  check_ptr("dk_out", dk_out, B * Hkv * L * D, as);
  if (teacher && nrows > 0) {
    check_code("teacher_dtype", teacher_dtype);
    check_ptr("teacher", teacher, nrows * L, elem_size(teacher_dtype));
  }
  set_inputs(p, q, k, heads, queries, key_mask);
  p.teacher = nrows > 0 ? reinterpret_cast<const void*>(teacher) : nullptr;
  p.t_dtype = teacher_dtype;
  p.lse_in = reinterpret_cast<const void*>(lse);
  p.tmass = reinterpret_cast<const void*>(tmass);
  p.grad = reinterpret_cast<const void*>(grad_rows);
  p.dq = reinterpret_cast<void*>(dq_out);
  p.dk = reinterpret_cast<void*>(dk_out);
  if (nrows > 0) check_indices(p);
  const Isa& isa = pick_isa();
  const Plan plan = make_plan(p, Units::kOwnedGroups, true);
  plan.attach(p);
  isa.bwd(p);
}

void attention_probs(uintptr_t q, uintptr_t k, uintptr_t heads, uintptr_t queries,
                     uintptr_t key_mask, uintptr_t out, int out_dtype, int64_t B, int64_t H,
                     int64_t Hkv, int64_t L, int64_t D, int64_t S, int64_t Q, int q_dtype,
                     double scale) {
  Problem p;
  check_dims(p, B, H, Hkv, L, D, S, Q, q_dtype, scale);
  check_code("out_dtype", out_dtype);
  const int es = elem_size(q_dtype);
  const int64_t nrows = B * S * Q;
  check_ptr("q", q, B * H * L * D, es);
  check_ptr("k", k, B * Hkv * L * D, es);
  check_ptr("heads", heads, B * S, 4);
  check_ptr("queries", queries, B * Q, 4);
  check_ptr("key_mask", key_mask, B * L, 4);
  check_ptr("out", out, nrows * L, elem_size(out_dtype));
  set_inputs(p, q, k, heads, queries, key_mask);
  p.out = reinterpret_cast<void*>(out);
  p.out_dtype = out_dtype;
  if (nrows == 0) return;
  check_indices(p);
  const Isa& isa = pick_isa();
  const Plan plan = make_plan(p, Units::kTiles, false);
  plan.attach(p);
  isa.probs(p);
}

void attention_sqdiff(uintptr_t q_a, uintptr_t k_a, uintptr_t q_b, uintptr_t k_b, uintptr_t heads,
                      uintptr_t queries, uintptr_t key_mask, uintptr_t rows_out, int64_t B,
                      int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t S, int64_t Q,
                      int q_dtype, double scale) {
  Problem p;
  check_dims(p, B, H, Hkv, L, D, S, Q, q_dtype, scale);
  const int es = elem_size(q_dtype), as = acc_size(q_dtype);
  const int64_t nrows = B * S * Q;
  check_ptr("q_a", q_a, B * H * L * D, es);
  check_ptr("k_a", k_a, B * Hkv * L * D, es);
  check_ptr("q_b", q_b, B * H * L * D, es);
  check_ptr("k_b", k_b, B * Hkv * L * D, es);
  check_ptr("heads", heads, B * S, 4);
  check_ptr("queries", queries, B * Q, 4);
  check_ptr("key_mask", key_mask, B * L, 4);
  check_ptr("rows_out", rows_out, nrows, as);
  set_inputs(p, q_a, k_a, heads, queries, key_mask);
  p.q_b = reinterpret_cast<const void*>(q_b);
  p.k_b = reinterpret_cast<const void*>(k_b);
  p.rows = reinterpret_cast<void*>(rows_out);
  if (nrows == 0) return;
  check_indices(p);
  const Isa& isa = pick_isa();
  const Plan plan = make_plan(p, Units::kTiles, false, 4);
  plan.attach(p);
  isa.sqdiff(p);
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

std::string isa() { return pick_isa().name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> v;
  for (const Isa& i : kIsas)
    if (i.supported()) v.push_back(i.name);
  return v;
}

}  // namespace cpu
}  // namespace seekr

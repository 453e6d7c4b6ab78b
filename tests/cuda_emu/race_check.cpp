// Shared-memory race check of the CUDA kernels: with -DSEEKR_EMU_THREADS the emulation
// (cuda_emu.h) runs a block's 128 threads as OS threads, concurrently between barriers, so a
// missing __syncthreads() shows up as a data race under ThreadSanitizer. Built and run by
// tests/test_native_cuda.py:
//   g++ -std=c++20 -O1 -g -fsanitize=thread -pthread -DSEEKR_EMU_THREADS -I<cuda>/include
//       -Itests/cuda_emu -DSEEKR_CUDA_EMULATE='"cuda_emu.h"' tests/cuda_emu/race_check.cpp
// Prints "race_check OK" when every call succeeded and every output is finite; TSan itself
// reports races on stderr (and exits non-zero).
#include "emu_entry.cpp"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

std::uintptr_t U(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

bool finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// fp32 inputs; rows past the first repeat positions, sample 1 is left-padded, slot (1, 1)
// is empty. Q = 150 in the second case makes the dq gather scan queries in two chunks.
bool run_case(int L, int D, int Q, bool all_queries, std::mt19937& rng) {
  const int B = 2, H = 4, Hkv = 2, S = 2;
  std::normal_distribution<float> nd;
  std::vector<float> q(B * H * L * D), k(B * Hkv * L * D), t(std::size_t(B) * S * Q * L);
  for (auto& x : q) x = nd(rng);
  for (auto& x : k) x = nd(rng);
  for (auto& x : t) x = std::fabs(nd(rng)) / L;
  std::vector<int> heads = {1, 3, 2, -1}, queries(B * Q), mask(B * L, 1);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Q; ++i) queries[b * Q + i] = all_queries ? i : static_cast<int>(rng() % L);
  if (!all_queries) queries[1] = queries[0];
  for (int j = 0; j < L / 4; ++j) mask[L + j] = 0;
  std::vector<float> rows(B * S * Q), lse(B * S * Q), T(B * S * Q), g(B * S * Q, 0.5f);
  std::vector<float> dq(B * H * L * D), dk(B * Hkv * L * D), p(std::size_t(B) * S * Q * L);
  int rc = emu_attention_kl_fwd(U(q.data()), U(k.data()), U(t.data()), 0, 0, U(heads.data()), U(queries.data()),
                                U(mask.data()), U(rows.data()), U(lse.data()), U(T.data()), B, H, Hkv, L, D, S, Q,
                                0, 0.2, 0);
  rc |= emu_attention_kl_bwd(U(q.data()), U(k.data()), U(t.data()), 0, U(heads.data()), U(queries.data()),
                             U(mask.data()), U(lse.data()), U(T.data()), U(g.data()), U(dq.data()), U(dk.data()), B,
                             H, Hkv, L, D, S, Q, 0, 0.2, 0, 0);
  rc |= emu_attention_probs(U(q.data()), U(k.data()), U(heads.data()), U(queries.data()), U(mask.data()),
                            U(p.data()), 0, B, H, Hkv, L, D, S, Q, 0, 0.2, 0);
  if (rc != 0) {
    std::printf("race_check: call failed: %s\n", emu_last_error());
    return false;
  }
  if (!finite(rows) || !finite(dq) || !finite(dk) || !finite(p)) {
    std::printf("race_check: non-finite output (L=%d D=%d Q=%d)\n", L, D, Q);
    return false;
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(1);
  bool ok = run_case(40, 12, 40, true, rng) && run_case(24, 8, 150, false, rng);
  std::printf(ok ? "race_check OK\n" : "race_check FAILED\n");
  return ok ? 0 : 1;
}

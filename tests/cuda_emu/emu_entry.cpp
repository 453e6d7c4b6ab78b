// C entry points of the CPU-emulated CUDA backend (see cuda_emu.h), for ctypes.
//
// Build: g++ -std=c++20 -O1 -shared -fPIC -pthread -I<cuda>/include -Itests/cuda_emu
//        -DSEEKR_CUDA_EMULATE='"cuda_emu.h"' tests/cuda_emu/emu_entry.cpp
// Each function returns 0, 1 (std::invalid_argument: the binding's ValueError) or 2 (other
// exception: RuntimeError); emu_last_error() gives the message.
#include "../../csrc/attention_cuda.cu"

#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

namespace {
thread_local std::string g_error;

template <class F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::invalid_argument& e) {
    g_error = e.what();
    return 1;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 2;
  }
}
}  // namespace

extern "C" {

const char* emu_last_error() { return g_error.c_str(); }

int emu_attention_kl_fwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t teacher, std::int64_t teacher_dtype,
                         std::uintptr_t tmass_in, std::uintptr_t heads, std::uintptr_t queries,
                         std::uintptr_t key_mask, std::uintptr_t rows_out, std::uintptr_t lse_out,
                         std::uintptr_t tmass_out, std::int64_t B, std::int64_t H, std::int64_t Hkv,
                         std::int64_t L, std::int64_t D, std::int64_t S, std::int64_t Q, std::int64_t q_dtype,
                         double scale, std::uintptr_t stream) {
  return guarded([&] {
    seekr_cuda::attention_kl_fwd(q, k, teacher, teacher_dtype, tmass_in, heads, queries, key_mask, rows_out,
                                 lse_out, tmass_out, B, H, Hkv, L, D, S, Q, q_dtype, scale, stream);
  });
}

int emu_attention_kl_bwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t teacher, std::int64_t teacher_dtype,
                         std::uintptr_t heads, std::uintptr_t queries, std::uintptr_t key_mask,
                         std::uintptr_t lse, std::uintptr_t tmass, std::uintptr_t grad_rows,
                         std::uintptr_t dq_out, std::uintptr_t dk_out, std::int64_t B, std::int64_t H,
                         std::int64_t Hkv, std::int64_t L, std::int64_t D, std::int64_t S, std::int64_t Q,
                         std::int64_t q_dtype, double scale, std::uintptr_t stream, std::uintptr_t workspace) {
  return guarded([&] {
    seekr_cuda::attention_kl_bwd(q, k, teacher, teacher_dtype, heads, queries, key_mask, lse, tmass, grad_rows,
                                 dq_out, dk_out, B, H, Hkv, L, D, S, Q, q_dtype, scale, stream, workspace);
  });
}

int emu_attention_probs(std::uintptr_t q, std::uintptr_t k, std::uintptr_t heads, std::uintptr_t queries,
                        std::uintptr_t key_mask, std::uintptr_t out, std::int64_t out_dtype, std::int64_t B,
                        std::int64_t H, std::int64_t Hkv, std::int64_t L, std::int64_t D, std::int64_t S,
                        std::int64_t Q, std::int64_t q_dtype, double scale, std::uintptr_t stream) {
  return guarded([&] {
    seekr_cuda::attention_probs(q, k, heads, queries, key_mask, out, out_dtype, B, H, Hkv, L, D, S, Q, q_dtype,
                                scale, stream);
  });
}

}  // extern "C"

// Public C++ API of the CPU backend (seekr_kernels._C), in the native-code convention of
// the project: every tensor is passed as a data pointer (uintptr_t) to contiguous memory,
// dtypes as codes (0 = fp32, 1 = fp16, 2 = bf16, 3 = fp64), index tensors are int32.
// Outputs rows/lse/tmass, dq and dk are in the accumulation type: fp64 when q is fp64,
// fp32 otherwise. Errors (inconsistent dims, bad codes, out-of-range indices) throw
// std::invalid_argument.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace seekr {
namespace cpu {

// Per-row KL(teacher || softmax) over the valid keys, its log-sum-exp and the teacher mass.
// teacher = 0: no teacher, rows = tmass_in * lse and tmass_out = tmass_in.
void attention_kl_fwd(uintptr_t q, uintptr_t k, uintptr_t teacher, int teacher_dtype,
                      uintptr_t tmass_in, uintptr_t heads, uintptr_t queries, uintptr_t key_mask,
                      uintptr_t rows_out, uintptr_t lse_out, uintptr_t tmass_out, int64_t B,
                      int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t S, int64_t Q,
                      int q_dtype, double scale);

// dq [B, H, L, D] and dk [B, Hkv, L, D] of sum(grad_rows * rows), written in full.
void attention_kl_bwd(uintptr_t q, uintptr_t k, uintptr_t teacher, int teacher_dtype,
                      uintptr_t heads, uintptr_t queries, uintptr_t key_mask, uintptr_t lse,
                      uintptr_t tmass, uintptr_t grad_rows, uintptr_t dq_out, uintptr_t dk_out,
                      int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t S,
                      int64_t Q, int q_dtype, double scale);

// out [B, S, Q, L] in out_dtype: softmax over the valid keys, 0 elsewhere and on inactive rows.
void attention_probs(uintptr_t q, uintptr_t k, uintptr_t heads, uintptr_t queries,
                     uintptr_t key_mask, uintptr_t out, int out_dtype, int64_t B, int64_t H,
                     int64_t Hkv, int64_t L, int64_t D, int64_t S, int64_t Q, int q_dtype,
                     double scale);

// rows [B, S, Q] (acc dtype) = sum over the valid keys of (p_a - p_b)^2, p_x the softmax of
// model x's scores (x = a: q_a/k_a, x = b: q_b/k_b, same shapes and dtype); 0 on inactive
// rows. Forward only: the op is not differentiable.
void attention_sqdiff(uintptr_t q_a, uintptr_t k_a, uintptr_t q_b, uintptr_t k_b, uintptr_t heads,
                      uintptr_t queries, uintptr_t key_mask, uintptr_t rows_out, int64_t B,
                      int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t S, int64_t Q,
                      int q_dtype, double scale);

int num_threads();
// Instruction set the kernels run with ("generic", "avx2", "avx512"; "native" for a
// SEEKR_NATIVE_ARCH=1 build). The environment variable SEEKR_CPU_ISA forces one of
// available_isas().
std::string isa();
std::vector<std::string> available_isas();

}  // namespace cpu
}  // namespace seekr

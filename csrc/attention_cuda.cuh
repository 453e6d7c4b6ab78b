// Host-side entry points of the CUDA backend (seekr_kernels._C_cuda).
//
// Plain C++ declarations only: python/bindings_cuda.cpp includes this header with the
// host compiler, without CUDA headers, and binds the functions with pybind11. Every
// tensor argument is a device pointer passed as an integer (torch's data_ptr()); the
// Python glue (seekr_kernels/_native_cuda.py) has validated shapes and made everything
// contiguous. Dtype codes: 0 = float32, 1 = float16, 2 = bfloat16, 3 = float64.
//
// Errors: std::invalid_argument (pybind11 -> ValueError) for bad dims / dtype codes /
// index values, std::runtime_error (-> RuntimeError) for CUDA failures, with
// cudaGetErrorString's text. Each call synchronises `stream` once at the end to read
// the kernels' index-range error flag (see attention_cuda.cu, "Index checks").
#pragma once

#include <cstdint>

namespace seekr_cuda {

// Per-row KL, lse and teacher mass, each [B, S, Q] in the accumulation dtype (float32, or
// float64 for float64 q). teacher == 0: no teacher, rows = tmass_in * lse and
// tmass_out = tmass_in on active rows.
void attention_kl_fwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t teacher,
                      std::int64_t teacher_dtype, std::uintptr_t tmass_in, std::uintptr_t heads,
                      std::uintptr_t queries, std::uintptr_t key_mask, std::uintptr_t rows_out,
                      std::uintptr_t lse_out, std::uintptr_t tmass_out, std::int64_t B,
                      std::int64_t H, std::int64_t Hkv, std::int64_t L, std::int64_t D,
                      std::int64_t S, std::int64_t Q, std::int64_t q_dtype, double scale,
                      std::uintptr_t stream);

// dq [B, H, L, D] and dk [B, Hkv, L, D] in the accumulation dtype, every element written
// (zeros where no row reaches). Deterministic: no atomics on the outputs. `workspace`: scratch
// of B*S*Q*D accumulation-dtype elements for the per-row dq (an extension of the convention's
// signature, optional: 0 = allocate it here with cudaMallocAsync).
void attention_kl_bwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t teacher,
                      std::int64_t teacher_dtype, std::uintptr_t heads, std::uintptr_t queries,
                      std::uintptr_t key_mask, std::uintptr_t lse, std::uintptr_t tmass,
                      std::uintptr_t grad_rows, std::uintptr_t dq_out, std::uintptr_t dk_out,
                      std::int64_t B, std::int64_t H, std::int64_t Hkv, std::int64_t L,
                      std::int64_t D, std::int64_t S, std::int64_t Q, std::int64_t q_dtype,
                      double scale, std::uintptr_t stream, std::uintptr_t workspace);

// Softmax rows [B, S, Q, L] of dtype out_dtype: exp(z - lse) on valid keys, 0 elsewhere and
// on inactive rows. Every element is written.
void attention_probs(std::uintptr_t q, std::uintptr_t k, std::uintptr_t heads,
                     std::uintptr_t queries, std::uintptr_t key_mask, std::uintptr_t out,
                     std::int64_t out_dtype, std::int64_t B, std::int64_t H, std::int64_t Hkv,
                     std::int64_t L, std::int64_t D, std::int64_t S, std::int64_t Q,
                     std::int64_t q_dtype, double scale, std::uintptr_t stream);

// cudaRuntimeGetVersion() of the runtime this module was linked with (diagnostics; does
// not need a GPU).
int runtime_version();

}  // namespace seekr_cuda

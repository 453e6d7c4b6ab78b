// pybind11 bindings of the CUDA backend: the module seekr_kernels._C_cuda.
//
// Compiled by the host compiler; it needs neither CUDA headers nor libtorch. The kernels
// and their host launchers live in csrc/attention_cuda.cu (linked into the same module,
// with the CUDA runtime). Arguments follow the native-code convention: tensors are passed as
// integer data pointers, dtypes as codes (0 f32, 1 f16, 2 bf16, 3 f64), `stream` is the
// integer handle of the CUDA stream to launch on (0 = the legacy default stream).
// std::invalid_argument -> ValueError, std::runtime_error (CUDA errors) -> RuntimeError.
// The GIL is released while the kernels run (each call synchronises its stream once).
#include <pybind11/pybind11.h>

#include "../csrc/attention_cuda.cuh"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "CUDA C++ kernels of seekr_kernels (attention-KL forward/backward, attention_probs). "
            "Called by seekr_kernels._native_cuda; not a public API.";

  m.def("attention_kl_fwd", &seekr_cuda::attention_kl_fwd, py::arg("q"), py::arg("k"), py::arg("teacher"),
        py::arg("teacher_dtype"), py::arg("tmass_in"), py::arg("heads"), py::arg("queries"),
        py::arg("key_mask"), py::arg("rows_out"), py::arg("lse_out"), py::arg("tmass_out"), py::arg("B"),
        py::arg("H"), py::arg("Hkv"), py::arg("L"), py::arg("D"), py::arg("S"), py::arg("Q"),
        py::arg("q_dtype"), py::arg("scale"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Per-row KL, lse and teacher mass [B, S, Q] (fp32; fp64 for fp64 q). teacher=0: rows = tmass_in * lse.");

  m.def("attention_kl_bwd", &seekr_cuda::attention_kl_bwd, py::arg("q"), py::arg("k"), py::arg("teacher"),
        py::arg("teacher_dtype"), py::arg("heads"), py::arg("queries"), py::arg("key_mask"), py::arg("lse"),
        py::arg("tmass"), py::arg("grad_rows"), py::arg("dq_out"), py::arg("dk_out"), py::arg("B"),
        py::arg("H"), py::arg("Hkv"), py::arg("L"), py::arg("D"), py::arg("S"), py::arg("Q"),
        py::arg("q_dtype"), py::arg("scale"), py::arg("stream") = 0, py::arg("workspace") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "dq [B, H, L, D] and dk [B, Hkv, L, D] (fp32; fp64 for fp64 q), written in full; deterministic. "
        "workspace: B*S*Q*D accumulation-dtype scratch (0: allocated internally).");

  m.def("attention_probs", &seekr_cuda::attention_probs, py::arg("q"), py::arg("k"), py::arg("heads"),
        py::arg("queries"), py::arg("key_mask"), py::arg("out"), py::arg("out_dtype"), py::arg("B"),
        py::arg("H"), py::arg("Hkv"), py::arg("L"), py::arg("D"), py::arg("S"), py::arg("Q"),
        py::arg("q_dtype"), py::arg("scale"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Softmax rows [B, S, Q, L] of dtype out_dtype; zeros off the valid keys and on inactive rows.");

  m.def("runtime_version", &seekr_cuda::runtime_version,
        "cudaRuntimeGetVersion() of the CUDA runtime linked into this module.");
}

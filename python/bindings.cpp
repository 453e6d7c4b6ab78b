// pybind11 module seekr_kernels._C: the CPU kernels of csrc/ behind the project's
// native-code convention (data pointers as ints, dims, dtype codes). It does not link
// libtorch; seekr_kernels/_native.py validates tensors, allocates outputs and calls these.
//
// std::invalid_argument thrown by csrc/ becomes ValueError (pybind11's built-in
// translation). The GIL is released while the kernels run: they touch no Python object.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "seekr_cpu.h"

namespace py = pybind11;
namespace sc = seekr::cpu;

PYBIND11_MODULE(_C, m) {
  m.doc() = "seekr-kernels CPU backend (C++/OpenMP): fused selected-head attention KL, probabilities "
            "and two-model squared differences";

  m.def("attention_kl_fwd", &sc::attention_kl_fwd, py::call_guard<py::gil_scoped_release>(),
        py::arg("q"), py::arg("k"), py::arg("teacher"), py::arg("teacher_dtype"),
        py::arg("tmass_in"), py::arg("heads"), py::arg("queries"), py::arg("key_mask"),
        py::arg("rows_out"), py::arg("lse_out"), py::arg("tmass_out"), py::arg("B"),
        py::arg("H"), py::arg("Hkv"), py::arg("L"), py::arg("D"), py::arg("S"), py::arg("Q"),
        py::arg("q_dtype"), py::arg("scale"),
        "Per-row KL, lse and teacher mass [B, S, Q] (fp32; fp64 for fp64 q). teacher=0 means "
        "no teacher: rows = tmass_in * lse.");

  m.def("attention_kl_bwd", &sc::attention_kl_bwd, py::call_guard<py::gil_scoped_release>(),
        py::arg("q"), py::arg("k"), py::arg("teacher"), py::arg("teacher_dtype"),
        py::arg("heads"), py::arg("queries"), py::arg("key_mask"), py::arg("lse"),
        py::arg("tmass"), py::arg("grad_rows"), py::arg("dq_out"), py::arg("dk_out"),
        py::arg("B"), py::arg("H"), py::arg("Hkv"), py::arg("L"), py::arg("D"), py::arg("S"),
        py::arg("Q"), py::arg("q_dtype"), py::arg("scale"),
        "dq [B, H, L, D] and dk [B, Hkv, L, D] (fp32; fp64 for fp64 q), written in full. "
        "Deterministic: no atomics, fixed summation order.");

  m.def("attention_probs", &sc::attention_probs, py::call_guard<py::gil_scoped_release>(),
        py::arg("q"), py::arg("k"), py::arg("heads"), py::arg("queries"), py::arg("key_mask"),
        py::arg("out"), py::arg("out_dtype"), py::arg("B"), py::arg("H"), py::arg("Hkv"),
        py::arg("L"), py::arg("D"), py::arg("S"), py::arg("Q"), py::arg("q_dtype"),
        py::arg("scale"),
        "Selected attention rows [B, S, Q, L] in out_dtype: softmax over the valid keys, 0 "
        "elsewhere and on inactive rows.");

  m.def("attention_sqdiff", &sc::attention_sqdiff, py::call_guard<py::gil_scoped_release>(),
        py::arg("q_a"), py::arg("k_a"), py::arg("q_b"), py::arg("k_b"), py::arg("heads"),
        py::arg("queries"), py::arg("key_mask"), py::arg("rows_out"), py::arg("B"), py::arg("H"),
        py::arg("Hkv"), py::arg("L"), py::arg("D"), py::arg("S"), py::arg("Q"),
        py::arg("q_dtype"), py::arg("scale"),
        "Per-row sum over the valid keys of (p_a - p_b)^2 of two models' attention, [B, S, Q] "
        "(fp32; fp64 for fp64 q), 0 on inactive rows.");

  m.def("num_threads", &sc::num_threads, "OpenMP threads the kernels use (OMP_NUM_THREADS).");
  m.def("isa", &sc::isa,
        "Instruction set the kernels run with; SEEKR_CPU_ISA=generic|avx2|avx512 forces one.");
  m.def("available_isas", &sc::available_isas, "Instruction sets built in and supported here.");
}

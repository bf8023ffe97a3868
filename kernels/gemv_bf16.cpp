// Python bindings of gemv_bf16.h (the kernel and its notes are there).

#include "gemv_bf16.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &cpugen_gemv::gemv, "y = act(x @ w.T + bias) for small M, bf16 in/out, fp32 accumulation", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("act") = 0);
  m.def("isa", &cpugen_gemv::isa, "the instruction set the kernel dispatched to");
}

// Python bindings of gemv_bf16.h, argmax.h, norm.h and glu.h (the kernels and their notes are there).

#include "argmax.h"
#include "gemv_bf16.h"
#include "glu.h"
#include "norm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &cpugen_gemv::gemv, "y = act(x @ w.T + bias) for small M, bf16 in/out, fp32 accumulation", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("act") = 0);
  m.def("packed_available", &cpugen_gemv::packed_available, "whether linear_packed runs here (AVX-512 F/BW; vdpbf16ps where the CPU has AVX512-BF16, AMX tiles where it has AMX-BF16)");
  m.def("packed_shape", &cpugen_packed::packed_shape, "shape of the packed form of an (n, k) weight", py::arg("n"),
        py::arg("k"));
  m.def("pack_into", &cpugen_packed::pack_into, "writes w (N, K) into p in cpugen's packed layout", py::arg("w"),
        py::arg("p"));
  m.def("linear_packed", &cpugen_gemv::linear_packed, "y = act(x @ W.T + bias) for any M, W packed by pack_into",
        py::arg("x"), py::arg("p"), py::arg("n"), py::arg("bias"), py::arg("act") = 0);
  m.def("argmax", [](const torch::Tensor& l) { return cpugen_argmax::argmax(l); }, "argmax of each row of logits (B, V), as torch.argmax answers",
        py::arg("logits"));
  m.def("norm", [](const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b, double eps,
                   bool rms) { return cpugen_norm::norm(x, w, b, eps, rms); }, "LayerNorm (or RMSNorm, rms=True) of each row of x (..., h), bf16, fp32 math",
        py::arg("x"), py::arg("w"), py::arg("b"), py::arg("eps"), py::arg("rms"));
  m.def("glu", [](const torch::Tensor& gu, int64_t act) { return cpugen_glu::glu(gu, act); }, "act(gate) * up over the halves [gate; up] of the last dim, bf16", py::arg("gu"),
        py::arg("act"));
  m.def("isa", &cpugen_gemv::isa, "the instruction set the kernel dispatched to");
  m.def("packed_multiply", &cpugen_gemv::packed_multiply,
        "the instruction linear_packed multiplies with above 6 rows off the tiles: vdpbf16ps or fma (where this CPU runs vdpbf16ps behind its FMAs)");
  m.def("packed_isa", &cpugen_gemv::packed_isa, "what linear_packed multiplies with: amx (tiles, K a multiple of 32) or isa()'s");
}

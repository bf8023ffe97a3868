// Python bindings of cpugen's kernels at the AVX2 level (AVX2 + FMA, no AVX-512): the decode gemv
// (gemv_avx2.h), the packed layout's kernel for any number of rows (packed_avx2.h), decode attention and the decode step (decode_attention.h), the norms (norm.h), a
// GLU's product (glu.h) and the argmax (argmax.h), each the same computation as its AVX-512 version
// on 8 lanes (vec_avx2.h). The decode stack takes this level through decode_layer.cpp.

#include "argmax.h"
#include "decode_attention.h"
#include "gemv_avx2.h"
#include "glu.h"
#include "norm.h"
#include "packed_avx2.h"

namespace {
constexpr auto kAvx2 = cpugen_vec::Level::kAvx2;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &cpugen_gemv_avx2::available, "whether this CPU has AVX2 and FMA");
  m.def("isa", []() { return std::string("avx2"); });
  m.def("max_rows", []() { return cpugen_gemv_avx2::kMaxRows; }, "the most rows of x the gemv takes");
  m.def("gemv", &cpugen_gemv_avx2::gemv, "y = act(x W^T + b) for 1-32 rows of x, bf16, fp32 accumulation",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("act") = 0);
  m.def("packed_available", &cpugen_packed_avx2::packed_available, "whether linear_packed runs here (AVX2 + FMA)");
  m.def("packed_shape", &cpugen_packed::packed_shape, "shape of the packed form of an (n, k) weight", py::arg("n"),
        py::arg("k"));
  m.def("pack_into", &cpugen_packed::pack_into, "writes w (N, K) into p in cpugen's packed layout", py::arg("w"),
        py::arg("p"));
  m.def("linear_packed", &cpugen_packed_avx2::linear_packed, "y = act(x @ W.T + bias) for any M, W packed by pack_into",
        py::arg("x"), py::arg("p"), py::arg("n"), py::arg("bias"), py::arg("act") = 0);
  m.def("linear_plain", &cpugen_packed_avx2::linear_plain,
        "y = act(x @ W.T + bias) for any M, W plain (n, K): packed a chunk at a time as it goes", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("act") = 0);
  m.def("plain_above", []() { return cpugen_packed_avx2::kPlainAbove; },
        "rows of x above which linear_plain runs ahead of the gemv on plain weights");
  m.def("argmax", [](const torch::Tensor& l) { return cpugen_argmax::argmax(l, kAvx2); },
        "argmax of each row of logits (B, V), as torch.argmax answers", py::arg("logits"));
  m.def("norm", [](const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b, double eps,
                   bool rms) { return cpugen_norm::norm(x, w, b, eps, rms, kAvx2); },
        "LayerNorm (or RMSNorm, rms=True) of each row of x (..., h), bf16, fp32 math", py::arg("x"), py::arg("w"),
        py::arg("b"), py::arg("eps"), py::arg("rms"));
  m.def("glu", [](const torch::Tensor& gu, int64_t act) { return cpugen_glu::glu(gu, act, kAvx2); },
        "act(gate) * up over the halves [gate; up] of the last dim, bf16", py::arg("gu"), py::arg("act"));
  m.def("decode_attention", [](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
    return cpugen_attn::decode_attention(q, k, v, kAvx2);
  }, "one query per sequence against the KV cache, bf16");
  m.def("decode_step", [](const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                          torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t index, int64_t nh, int64_t rd) {
    return cpugen_attn::decode_step(qkv, cos, sin, k_cache, v_cache, index, nh, rd, kAvx2);
  }, "rotary + cache write + attention for one decode step, bf16");
}

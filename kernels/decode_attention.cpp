// Python bindings of decode_attention.h (the kernel and its notes are there).

#include "decode_attention.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", [](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
    return cpugen_attn::decode_attention(q, k, v);
  }, "one query per sequence against the KV cache, bf16");
  m.def("decode_step", [](const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                          torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t index, int64_t nh, int64_t rd) {
    return cpugen_attn::decode_step(qkv, cos, sin, k_cache, v_cache, index, nh, rd);
  }, "rotary + cache write + attention for one decode step, bf16");
}

// Python bindings of decode_attention.h (the kernel and its notes are there).

#include "decode_attention.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &cpugen_attn::decode_attention, "one query per sequence against the KV cache, bf16");
  m.def("decode_step", &cpugen_attn::decode_step, "rotary + cache write + attention for one decode step, bf16");
}

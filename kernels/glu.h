#pragma once
// A GLU MLP's product: y (..., ffn) = bf16(bf16(act(gate)) * up), [gate; up] = the halves of the
// last dim of gu (..., 2 ffn) bf16: what cpugen/model/transformer.py's MLP computes with torch's ops (the activation
// rounded to bf16, then the product rounded), with the epilogue's vectorized activations.
// The decode stack calls it between a GLU model's two MLP matmuls, where torch's two ops ran cold
// (docs/performance.md, "The rest of the step"); the eager backend installs it as every GLU MLP's
// `glu`, so the Python blocks compute the same numbers.
// Reference: kernels/reference.py's glu (MLP.glu_reference); check: kernels/check_step_ops.py, tests/test_kernels.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include "vec_avx2.h"
#include "vec_math.h"

#include <cstdint>

namespace cpugen_glu {

using cpugen_vec::load_bf16;
using cpugen_vec::round_bf16;

__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void glu_row(const uint16_t* gu, int64_t ffn, int64_t act, uint16_t* y) {
  for (int64_t i = 0; i < ffn; i += 16) {
    const __mmask16 m = cpugen_vec::lanes(ffn, i);
    const __m512 a = cpugen_vec::widen_bf16(round_bf16(cpugen_vec::activate(load_bf16(gu + i, m), act)));  // bf16
    _mm256_mask_storeu_epi16(y + i, m, round_bf16(_mm512_mul_ps(a, load_bf16(gu + ffn + i, m))));
  }
}

// The same at the AVX2 level, 8 lanes
CPUGEN_AVX2 inline void glu_row_avx2(const uint16_t* gu, int64_t ffn, int64_t act, uint16_t* y) {
  for (int64_t i = 0; i < ffn; i += 8) {
    const __m256 a = cpugen_vec2::widen(cpugen_vec2::round_bf16(cpugen_vec2::activate(cpugen_vec2::load(gu + i, ffn - i), act)));
    cpugen_vec2::store(y + i, _mm256_mul_ps(a, cpugen_vec2::load(gu + ffn + i, ffn - i)), ffn - i);
  }
}

// rows of gu (M, 2 ffn) -> y (M, ffn), bf16, contiguous; rows split across threads from 16 on
inline void glu_raw(const uint16_t* gu, int64_t M, int64_t ffn, int64_t act, uint16_t* y,
                    cpugen_vec::Level level = cpugen_vec::Level::kAvx512) {
  const auto row = level == cpugen_vec::Level::kAvx2 ? glu_row_avx2 : glu_row;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) row(gu + m * 2 * ffn, ffn, act, y + m * ffn);
  });
}

// gu (..., 2 ffn) bf16, act (cpugen/model/activations.py's KERNEL_CODE) -> (..., ffn)
inline torch::Tensor glu(const torch::Tensor& gu, int64_t act, cpugen_vec::Level level = cpugen_vec::Level::kAvx512) {
  TORCH_CHECK(gu.scalar_type() == at::kBFloat16 && gu.dim() >= 1 && gu.size(-1) % 2 == 0,
              "cpugen glu: bf16 gu (..., 2 ffn)");
  TORCH_CHECK(act >= cpugen_vec::kNone && act <= cpugen_vec::kSilu, "cpugen glu: unknown activation ", act);
  const auto gc = gu.contiguous();
  const int64_t ffn = gc.size(-1) / 2;
  auto sizes = gc.sizes().vec();
  sizes.back() = ffn;
  auto y = torch::empty(sizes, gc.options());
  if (ffn)
    glu_raw(reinterpret_cast<const uint16_t*>(gc.data_ptr()), gc.numel() / (2 * ffn), ffn, act,
            reinterpret_cast<uint16_t*>(y.data_ptr()), level);
  return y;
}

}  // namespace cpugen_glu

#pragma once
// LayerNorm and RMSNorm over rows of bf16, in fp32, as cpugen/model/transformer.py's Norm defines them:
//   layernorm: y = bf16((x - mean) * rstd * w + b), mean and (biased) variance over the row
//   rmsnorm:   y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))   (Norm.reference's two roundings)
//
// A decode step calls a norm once or twice a layer on a few rows. torch's op took 10-15 us a
// call there against 3.5 us warm: each step streams the weights through every cache, and the
// op's dispatch code and data come back from DRAM. This touches the rows, the norm's weights and
// its own few hundred bytes of code. Sums run 16 lanes wide (8 at the AVX2 level), so the last bits of the mean can
// differ from torch's order of summation: within a bf16 rounding of torch's output.
// Reference: kernels/reference.py's norm (Norm.reference); check: kernels/check_step_ops.py, tests/test_kernels.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include "vec_avx2.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace cpugen_norm {

namespace {

using cpugen_vec::lanes;
using cpugen_vec::load_bf16;
using cpugen_vec::round_bf16;
using cpugen_vec::widen_bf16;

__attribute__((target("avx512f,avx512bw,avx512vl")))
void norm_row(const uint16_t* x, const uint16_t* w, const uint16_t* b, float eps, bool rms, uint16_t* y, int64_t h) {
  if (rms) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < h; i += 16) {
      const __m512 v = load_bf16(x + i, lanes(h, i));
      ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
    }
    const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(h) + eps));
    for (int64_t i = 0; i < h; i += 16) {
      const __mmask16 m = lanes(h, i);
      const __m512 xr = widen_bf16(round_bf16(_mm512_mul_ps(load_bf16(x + i, m), r)));  // bf16(x r)
      _mm256_mask_storeu_epi16(y + i, m, round_bf16(_mm512_mul_ps(load_bf16(w + i, m), xr)));
    }
    return;
  }
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < h; i += 16) sum = _mm512_add_ps(sum, load_bf16(x + i, lanes(h, i)));
  const float mean = _mm512_reduce_add_ps(sum) / static_cast<float>(h);
  const __m512 mv = _mm512_set1_ps(mean);
  __m512 sq = _mm512_setzero_ps();
  for (int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = lanes(h, i);
    const __m512 d = _mm512_maskz_sub_ps(m, load_bf16(x + i, m), mv);
    sq = _mm512_add_ps(sq, _mm512_mul_ps(d, d));
  }
  const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(h) + eps));
  for (int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = lanes(h, i);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(load_bf16(x + i, m), mv), rstd), load_bf16(w + i, m));
    if (b) v = _mm512_add_ps(v, load_bf16(b + i, m));
    _mm256_mask_storeu_epi16(y + i, m, round_bf16(v));
  }
}

// The same at the AVX2 level, 8 lanes
CPUGEN_AVX2 void norm_row_avx2(const uint16_t* x, const uint16_t* w, const uint16_t* b, float eps, bool rms,
                               uint16_t* y, int64_t h) {
  using cpugen_vec2::load;
  if (rms) {
    __m256 ss = _mm256_setzero_ps();
    for (int64_t i = 0; i < h; i += 8) {
      const __m256 v = load(x + i, h - i);
      ss = _mm256_add_ps(ss, _mm256_mul_ps(v, v));
    }
    const __m256 r = _mm256_set1_ps(1.f / std::sqrt(cpugen_vec2::hsum(ss) / static_cast<float>(h) + eps));
    for (int64_t i = 0; i < h; i += 8) {
      const __m256 xr = cpugen_vec2::widen(cpugen_vec2::round_bf16(_mm256_mul_ps(load(x + i, h - i), r)));  // bf16(x r)
      cpugen_vec2::store(y + i, _mm256_mul_ps(load(w + i, h - i), xr), h - i);
    }
    return;
  }
  __m256 sum = _mm256_setzero_ps();
  for (int64_t i = 0; i < h; i += 8) sum = _mm256_add_ps(sum, load(x + i, h - i));
  const float mean = cpugen_vec2::hsum(sum) / static_cast<float>(h);
  __m256 sq = _mm256_setzero_ps();
  for (int64_t i = 0; i < h; i += 8) {  // lanes past h read the mean: they add nothing
    const __m256 d = _mm256_sub_ps(load(x + i, h - i, mean), _mm256_set1_ps(mean));
    sq = _mm256_add_ps(sq, _mm256_mul_ps(d, d));
  }
  const __m256 mv = _mm256_set1_ps(mean);
  const __m256 rstd = _mm256_set1_ps(1.f / std::sqrt(cpugen_vec2::hsum(sq) / static_cast<float>(h) + eps));
  for (int64_t i = 0; i < h; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(load(x + i, h - i), mv), rstd), load(w + i, h - i));
    if (b) v = _mm256_add_ps(v, load(b + i, h - i));
    cpugen_vec2::store(y + i, v, h - i);
  }
}

}  // namespace

// Rows of x (M, h) into y (M, h), bf16, contiguous; w (h), b (h) or null. Rows split across
// threads from 16 rows on (a decode step's few rows stay on the calling thread).
inline void norm_raw(const uint16_t* x, const uint16_t* w, const uint16_t* b, float eps, bool rms, uint16_t* y,
                     int64_t M, int64_t h, cpugen_vec::Level level = cpugen_vec::Level::kAvx512) {
  const auto row = level == cpugen_vec::Level::kAvx2 ? norm_row_avx2 : norm_row;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) row(x + m * h, w, b, eps, rms, y + m * h, h);
  });
}

// x (..., h) bf16, w (h) bf16, b (h) bf16 or none -> the norm of each row, x's shape
inline torch::Tensor norm(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b,
                          double eps, bool rms, cpugen_vec::Level level = cpugen_vec::Level::kAvx512) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.dim() >= 1,
              "cpugen norm: bf16 x (..., h) and weight");
  const int64_t h = x.size(-1);
  TORCH_CHECK(w.numel() == h && (!b.has_value() || !b->defined() || (b->numel() == h && b->scalar_type() == at::kBFloat16)),
              "cpugen norm: weight and bias of ", h, " for rows of ", h);
  const auto xc = x.contiguous(), wc = w.contiguous();
  const auto bc = b.has_value() && b->defined() ? b->contiguous() : torch::Tensor();
  auto y = torch::empty_like(xc);
  norm_raw(reinterpret_cast<const uint16_t*>(xc.data_ptr()), reinterpret_cast<const uint16_t*>(wc.data_ptr()),
           bc.defined() ? reinterpret_cast<const uint16_t*>(bc.data_ptr()) : nullptr, static_cast<float>(eps), rms,
           reinterpret_cast<uint16_t*>(y.data_ptr()), xc.numel() / std::max<int64_t>(h, 1), h, level);
  return y;
}

}  // namespace cpugen_norm

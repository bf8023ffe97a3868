#pragma once
// The decode gemv for CPUs with AVX2 and FMA but without AVX-512 (AMD Zen 2/3, Intel before
// Skylake-SP): y (M, N) = act(x (M, K) W (N, K)^T + b) for 1-4 rows of x, bf16 in and out, fp32
// accumulation. A bf16 is the upper half of an fp32, so each 16 weights (one 256-bit load) give
// their even ones as fp32 by a 16-bit shift and their odd ones by a mask (no F16C, no AVX512-BF16),
// multiplied with FMA by x's values in the same order. W's rows are split across threads in
// contiguous ranges and each is read once, front to back, for every row of x
// (x is widened to fp32 once per call). The epilogue adds the bias and applies the activation 8 outputs at
// a time (vec_avx2.h) before one rounding to bf16.
// Reference: kernels/reference.py's gemv; check: kernels/check_gemv.py (check_avx2); bound in
// kernels/avx2.cpp, run by the decode stack (decode_layer.cpp) at the AVX2 level.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include "vec_avx2.h"

#include <vector>

namespace cpugen_gemv_avx2 {

constexpr int64_t kMaxRows = 4;

namespace {

// x's rows for the kernel: each block of 16 values as its 8 even then its 8 odd ones, fp32, (M, K16);
// then the tail past K16 in order, (M, K - K16)
constexpr int64_t kBlock = 16;

// Rows [n0, n1) of W against the M rows of x (split as above); sums[m * N + n] gets the dot
// products. 16 weights are one 256-bit load: shifting each 32-bit lane left by 16 gives the even
// weights as fp32, masking off its low half the odd ones (no widening instructions), each
// multiplied by x's even or odd values with FMA; one row of x keeps 4 chains of sums (two blocks
// at a time) against FMA's latency. W is one sequential stream per thread, left to the hardware
// prefetchers: a software prefetch 2 or 4 KiB ahead measured 9-13% slower at one row of x (2 Zen 3
// threads, 0.8 GB of gptj-1b's matrices, interleaved rounds), and 8 chains no faster than 4.
template <int M>
CPUGEN_AVX2 void rows(const uint16_t* w, const float* xs, const float* xt, int64_t K, int64_t n0, int64_t n1,
                      float* sums, int64_t N) {
  const int64_t K16 = K / kBlock * kBlock, tail = K - K16;
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m256 ae[M], ao[M], be[M], bo[M];
    for (int m = 0; m < M; ++m) ae[m] = ao[m] = be[m] = bo[m] = _mm256_setzero_ps();
    int64_t k = 0;
    if (M == 1)
      for (; k + 2 * kBlock <= K16; k += 2 * kBlock) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k + kBlock));
        ae[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(xs + k), ae[0]);
        ao[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, odd)), _mm256_loadu_ps(xs + k + 8), ao[0]);
        be[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), _mm256_loadu_ps(xs + k + 16), be[0]);
        bo[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, odd)), _mm256_loadu_ps(xs + k + 24), bo[0]);
      }
    for (; k < K16; k += kBlock) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
      for (int m = 0; m < M; ++m) {
        ae[m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xs + m * K16 + k), ae[m]);
        ao[m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xs + m * K16 + k + 8), ao[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = cpugen_vec2::hsum(_mm256_add_ps(_mm256_add_ps(ae[m], ao[m]), _mm256_add_ps(be[m], bo[m])));
      for (int64_t t = 0; t < tail; ++t) {
        const uint32_t u = static_cast<uint32_t>(wr[K16 + t]) << 16;
        float f;
        std::memcpy(&f, &u, sizeof(f));
        s += f * xt[m * tail + t];
      }
      sums[m * N + n] = s;
    }
  }
}

// out[m, n0:n1] = bf16(act(sums[m, n0:n1] + bias)), 8 outputs at a time
CPUGEN_AVX2 void finish(const float* sums, const uint16_t* bias, int64_t act, uint16_t* out, int64_t M, int64_t N,
                        int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; n += 8) {
      __m256 v = cpugen_vec2::loadf(sums + m * N + n, n1 - n);
      if (bias) v = _mm256_add_ps(v, cpugen_vec2::load(bias + n, n1 - n));
      cpugen_vec2::store(out + m * N + n, cpugen_vec2::activate(v, act), n1 - n);
    }
}

}  // namespace

inline bool available() { return cpugen_vec2::supported(); }

// The gemv on raw pointers, checked by the caller: x (M, K), w (N, K), bias (N) or null, out
// (M, N), all bf16 and contiguous; sums: M x N floats of scratch
inline void gemv_raw(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* wp, int64_t N, const uint16_t* bp,
                     int64_t act, uint16_t* op, float* sums) {
  thread_local std::vector<float> xf;  // x widened once: its blocks split even / odd, then its tail
  const int64_t K16 = K / kBlock * kBlock, tail = K - K16;
  xf.resize(M * K);
  float* xs = xf.data();
  float* xt = xs + M * K16;
  auto widen1 = [](uint16_t b) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  };
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* x = xp + m * K;
    for (int64_t k = 0; k < K16; k += kBlock)
      for (int64_t j = 0; j < 8; ++j) {
        xs[m * K16 + k + j] = widen1(x[k + 2 * j]);
        xs[m * K16 + k + 8 + j] = widen1(x[k + 2 * j + 1]);
      }
    for (int64_t t = 0; t < tail; ++t) xt[m * tail + t] = widen1(x[K16 + t]);
  }
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows<1>(wp, xs, xt, K, n0, n1, sums, N); break;
      case 2: rows<2>(wp, xs, xt, K, n0, n1, sums, N); break;
      case 3: rows<3>(wp, xs, xt, K, n0, n1, sums, N); break;
      default: rows<4>(wp, xs, xt, K, n0, n1, sums, N); break;
    }
    finish(sums, bp, act, op, M, N, n0, n1);
  });
}

inline torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                          int64_t act) {
  TORCH_CHECK(available(), "cpugen gemv_avx2: this CPU lacks AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "cpugen gemv_avx2: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "cpugen gemv_avx2: bf16 only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "cpugen gemv_avx2: 1 to ", kMaxRows, " rows of x, not ", M);
  TORCH_CHECK(act >= 0 && act <= 4, "cpugen gemv_avx2: unknown activation ", act);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->numel() == N && bias->scalar_type() == at::kBFloat16),
              "cpugen gemv_avx2: a bf16 bias of ", N);
  const torch::Tensor xc = x.contiguous(), wc = w.contiguous(), bc = has_bias ? bias->contiguous() : torch::Tensor();
  std::vector<float> sums(M * N);
  torch::Tensor y = torch::empty({M, N}, x.options());
  gemv_raw(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, reinterpret_cast<const uint16_t*>(wc.data_ptr()), N,
           has_bias ? reinterpret_cast<const uint16_t*>(bc.data_ptr()) : nullptr, act,
           reinterpret_cast<uint16_t*>(y.data_ptr()), sums.data());
  return y;
}

}  // namespace cpugen_gemv_avx2

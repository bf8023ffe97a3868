#pragma once
// The decode gemv for CPUs with AVX2 and FMA but without AVX-512 (AMD Zen 2/3, Intel before
// Skylake-SP): y (M, N) = act(x (M, K) W (N, K)^T + b) for 1-4 rows of x, bf16 in and out, fp32
// accumulation. A bf16 is the upper half of an fp32, so each 8 weights are widened by a zero
// extension and a 16-bit shift (no F16C, no AVX512-BF16) and multiplied with FMA. W's rows are split
// across threads in contiguous ranges and each is read once, front to back, for every row of x (x is
// widened to fp32 once per call). The epilogue adds the bias and applies the activation 8 outputs at
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

using cpugen_vec2::widen;

// Rows [n0, n1) of W against the M rows of xf (fp32, (M, K)); sums[m * N + n] gets the dot products.
template <int M>
CPUGEN_AVX2 void rows(const uint16_t* w, const float* xf, int64_t K, int64_t n0, int64_t n1, float* sums, int64_t N) {
  const int64_t K16 = K / 16 * 16;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m256 a0[M], a1[M];
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < K16; k += 16) {
      const __m256 w0 = cpugen_vec2::load8(wr + k), w1 = cpugen_vec2::load8(wr + k + 8);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + m * K + k), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + m * K + k + 8), a1[m]);
      }
    }
    if (k < K) {  // K's tail, 16 at most
      const __m256 w0 = cpugen_vec2::load(wr + k, K - k), w1 = cpugen_vec2::load(wr + k + 8, K - k - 8);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, cpugen_vec2::loadf(xf + m * K + k, K - k), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, cpugen_vec2::loadf(xf + m * K + k + 8, K - k - 8), a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) sums[m * N + n] = cpugen_vec2::hsum(_mm256_add_ps(a0[m], a1[m]));
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
  thread_local std::vector<float> xf;  // x widened once: (M, K) fp32
  xf.resize(M * K);
  for (int64_t i = 0; i < M * K; ++i) {
    const uint32_t u = static_cast<uint32_t>(xp[i]) << 16;
    std::memcpy(&xf[i], &u, sizeof(float));
  }
  const float* x = xf.data();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows<1>(wp, x, K, n0, n1, sums, N); break;
      case 2: rows<2>(wp, x, K, n0, n1, sums, N); break;
      case 3: rows<3>(wp, x, K, n0, n1, sums, N); break;
      default: rows<4>(wp, x, K, n0, n1, sums, N); break;
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

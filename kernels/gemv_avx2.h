#pragma once
// The decode gemv for CPUs with AVX2 and FMA but without AVX-512 (AMD Zen 2/3, Intel before
// Skylake-SP): y (M, N) = act(x (M, K) W (N, K)^T + b) for 1-32 rows of x (decode's batches), bf16 in
// and out, fp32 accumulation. A bf16 is the upper half of an fp32, so each 16 weights (one 256-bit load) give
// their even ones as fp32 by a 16-bit shift and their odd ones by a mask (no F16C, no AVX512-BF16),
// multiplied with FMA by x's values in the same order. W's rows are split across threads in
// contiguous ranges and each is read once, front to back, for all rows of x at once up to 4 rows,
// and above 4 in chunks that stay in L2 while blocks of 4 rows of x pass over them (x is widened to
// fp32 once per call). The epilogue adds the bias and applies the activation 8 outputs at
// a time (vec_avx2.h) before one rounding to bf16.
// Reference: kernels/reference.py's gemv; check: kernels/check_gemv.py (check_avx2); bound in
// kernels/avx2.cpp, run by the decode stack (decode_layer.cpp) at the AVX2 level.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>
#include <sys/mman.h>

#include <cstdlib>

#include "vec_avx2.h"

#include <vector>

namespace cpugen_gemv_avx2 {

constexpr int64_t kMaxRows = 32;  // decode batches up to this; prefill goes to the widened fp32 GEMM
constexpr int64_t kRowBlock = 4;  // rows of x a pass of W (rows_m: 4 rows x 2 rows of W fill the registers)
constexpr int64_t kChunkBytes = 128 << 10;  // above 4 rows: W's rows a chunk, read by every block of x from L2

namespace {

// x's rows for the kernel: for each block of 16 values, each row's 8 even then 8 odd ones, fp32, the
// M rows side by side ((K16 / 16, M, 16): one sequential stream); then the tail past K16 in order,
// (M, K - K16)
constexpr int64_t kBlock = 16;

// the dot product of W's row past its last whole block (K16 on) with x's tail
inline float tail_dot(const uint16_t* wr, const float* xt, int64_t K16, int64_t tail) {
  float s = 0.f;
  for (int64_t t = 0; t < tail; ++t) {
    const uint32_t u = static_cast<uint32_t>(wr[K16 + t]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    s += f * xt[t];
  }
  return s;
}

// Rows [n0, n1) of W against one row of x (split as above), four rows of W at a time; sums[n] gets
// the dot products. 16 weights are one 256-bit load: shifting each 32-bit lane left by 16 gives the
// even weights as fp32, masking off its low half the odd ones (no widening instructions), each
// multiplied by x's even or odd values with FMA, in 8 chains of sums (even and odd for each row).
// Each block of x is loaded once for the four rows: at K = 8192, x is 32 KiB of fp32, all of L1,
// and read once per row of W it came from L2 as fast as W from memory: gptj-1b's fc_out streamed at
// 27 GB/s one row a pass and 33 four rows a pass, the plain read 31-34 (2 Zen 3 threads,
// interleaved rounds; the 2048-wide matrices were the same either way). W is four sequential
// streams per thread, left to the hardware prefetchers: a software prefetch 2 or 4 KiB ahead
// measured 9-13% slower.
CPUGEN_AVX2 void rows1(const uint16_t* w, const float* xs, const float* xt, int64_t K, int64_t n0, int64_t n1,
                       float* sums) {
  constexpr int R = 4;
  const int64_t K16 = K / kBlock * kBlock, tail = K - K16;
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const uint16_t* wr = w + n * K;
    __m256 ae[R], ao[R];
    for (int r = 0; r < R; ++r) ae[r] = ao[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K16; k += kBlock) {
      const __m256 xe = _mm256_loadu_ps(xs + k), xo = _mm256_loadu_ps(xs + k + 8);
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + r * K + k));
        ae[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, ae[r]);
        ao[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), xo, ao[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      sums[n + r] = cpugen_vec2::hsum(_mm256_add_ps(ae[r], ao[r])) + tail_dot(wr + r * K, xt, K16, tail);
  }
  for (; n < n1; ++n) {  // up to three rows left over: one at a time, two blocks a step in 4 chains
    const uint16_t* wr = w + n * K;
    __m256 ae = _mm256_setzero_ps(), ao = ae, be = ae, bo = ae;
    int64_t k = 0;
    for (; k + 2 * kBlock <= K16; k += 2 * kBlock) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k + kBlock));
      ae = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(xs + k), ae);
      ao = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, odd)), _mm256_loadu_ps(xs + k + 8), ao);
      be = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), _mm256_loadu_ps(xs + k + 16), be);
      bo = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, odd)), _mm256_loadu_ps(xs + k + 24), bo);
    }
    for (; k < K16; k += kBlock) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
      ae = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xs + k), ae);
      ao = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), _mm256_loadu_ps(xs + k + 8), ao);
    }
    sums[n] = cpugen_vec2::hsum(_mm256_add_ps(_mm256_add_ps(ae, ao), _mm256_add_ps(be, bo))) + tail_dot(wr, xt, K16, tail);
  }
}

// Rows [n0, n1) of W against M = 2-4 rows of x, two rows of W at a time: each block of x's values
// (its M rows' 16 values side by side, one sequential stream) is loaded once for both rows of W,
// so x, which at K = 8192 and 4 rows is 128 KiB of fp32 and lives in L2, not L1, is read half as
// often per weight. One row of x loaded per W row (the old loop) left 4 rows of x bound by L2's
// bandwidth at 17-19 GB/s of weights on 2 Zen 3 threads against 36 at one row, and where its rows
// landed in the caches moved it by 15% from one process to the next. Even and odd products share a
// chain at 3-4 rows (2M x 2 chains of sums would not fit the 16 registers), keep their own at 2.
template <int M>
CPUGEN_AVX2 void rows_m(const uint16_t* w, const float* xs, const float* xt, int64_t K, int64_t n0, int64_t n1,
                        float* sums, int64_t N) {
  constexpr bool split = M <= 2;  // separate even and odd chains
  constexpr int C = split ? 2 : 1;
  const int64_t K16 = K / kBlock * kBlock, tail = K - K16;
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const uint16_t* w0 = w + n * K;
    const uint16_t* w1 = w0 + K;
    __m256 acc[2][M][C];
    for (int r = 0; r < 2; ++r)
      for (int m = 0; m < M; ++m)
        for (int c = 0; c < C; ++c) acc[r][m][c] = _mm256_setzero_ps();
    const float* xb = xs;
    for (int64_t k = 0; k < K16; k += kBlock, xb += M * kBlock) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + k));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + k));
      const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, odd));
      const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, odd));
      for (int m = 0; m < M; ++m) {
        const __m256 xe = _mm256_loadu_ps(xb + m * kBlock), xo = _mm256_loadu_ps(xb + m * kBlock + 8);
        acc[0][m][0] = _mm256_fmadd_ps(e0, xe, acc[0][m][0]);
        acc[1][m][0] = _mm256_fmadd_ps(e1, xe, acc[1][m][0]);
        acc[0][m][C - 1] = _mm256_fmadd_ps(o0, xo, acc[0][m][C - 1]);
        acc[1][m][C - 1] = _mm256_fmadd_ps(o1, xo, acc[1][m][C - 1]);
      }
    }
    for (int r = 0; r < 2; ++r)
      for (int m = 0; m < M; ++m) {
        const __m256 a = split ? _mm256_add_ps(acc[r][m][0], acc[r][m][C - 1]) : acc[r][m][0];
        sums[m * N + n + r] = cpugen_vec2::hsum(a) + tail_dot(r ? w1 : w0, xt + m * tail, K16, tail);
      }
  }
  for (; n < n1; ++n) {  // an odd row left over
    const uint16_t* wr = w + n * K;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    const float* xb = xs;
    for (int64_t k = 0; k < K16; k += kBlock, xb += M * kBlock) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
      const __m256 e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), o = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
      for (int m = 0; m < M; ++m)
        acc[m] = _mm256_fmadd_ps(o, _mm256_loadu_ps(xb + m * kBlock + 8),
                                 _mm256_fmadd_ps(e, _mm256_loadu_ps(xb + m * kBlock), acc[m]));
    }
    for (int m = 0; m < M; ++m) sums[m * N + n] = cpugen_vec2::hsum(acc[m]) + tail_dot(wr, xt + m * tail, K16, tail);
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

// A thread's scratch for x widened, on a 2 MiB huge page (where the kernel gives one, as it does for
// cpugen's weights): 4 rows of x at K = 8192 are 128 KiB of fp32, read from L2 once per pair of W's
// rows. On 4 KiB pages, where its pages fell in the physically indexed L2 decided how often they
// clashed with W's stream there: the same 4-row gemv ran at 18 or at 23 GB/s from one process to
// the next (2 Zen 3 threads, gptj-1b's fc_in), steady within each. Physically contiguous, its lines
// fill L2's sets evenly.
struct HugeScratch {
  static constexpr size_t kHuge = size_t(2) << 20;
  float* p = nullptr;
  size_t cap = 0;  // floats
  float* get(size_t n) {
    if (n > cap) {
      std::free(p);
      const size_t bytes = (n * sizeof(float) + kHuge - 1) / kHuge * kHuge;
      p = static_cast<float*>(std::aligned_alloc(kHuge, bytes));
      TORCH_CHECK(p, "cpugen gemv_avx2: no memory for ", bytes, " bytes of scratch");
      madvise(p, bytes, MADV_HUGEPAGE);  // advice: 4 KiB pages if the kernel has none to give
      cap = bytes / sizeof(float);
    }
    return p;
  }
  ~HugeScratch() { std::free(p); }
};

inline bool available() { return cpugen_vec2::supported(); }

// x's M rows widened for the kernels, in blocks of kRowBlock rows: each block as rows1 and rows_m
// read it ((K16 / 16, rows, 16), then its tail (rows, K - K16)) at offset m0 * K
inline void widen_x(const uint16_t* xp, int64_t M, int64_t K, float* xs) {
  const int64_t K16 = K / kBlock * kBlock, tail = K - K16;
  auto widen1 = [](uint16_t b) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  };
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, M - m0);
    float* xb = xs + m0 * K;
    float* xt = xb + rows * K16;
    for (int64_t m = 0; m < rows; ++m) {
      const uint16_t* x = xp + (m0 + m) * K;
      for (int64_t k = 0; k < K16; k += kBlock) {
        float* b = xb + (k / kBlock * rows + m) * kBlock;
        for (int64_t j = 0; j < 8; ++j) {
          b[j] = widen1(x[k + 2 * j]);
          b[8 + j] = widen1(x[k + 2 * j + 1]);
        }
      }
      for (int64_t t = 0; t < tail; ++t) xt[m * tail + t] = widen1(x[K16 + t]);
    }
  }
}

// Rows [n0, n1) of W against x's rows [m0, m0 + rows), rows <= kRowBlock; sums (M, N)
inline void rows_any(const uint16_t* w, const float* xs, int64_t K, int64_t m0, int64_t rows, int64_t n0, int64_t n1,
                     float* sums, int64_t N) {
  const int64_t K16 = K / kBlock * kBlock;
  const float* xb = xs + m0 * K;
  const float* xt = xb + rows * K16;
  float* s = sums + m0 * N;
  switch (rows) {
    case 1: rows1(w, xb, xt, K, n0, n1, s); break;
    case 2: rows_m<2>(w, xb, xt, K, n0, n1, s, N); break;
    case 3: rows_m<3>(w, xb, xt, K, n0, n1, s, N); break;
    default: rows_m<4>(w, xb, xt, K, n0, n1, s, N); break;
  }
}

// The gemv on raw pointers, checked by the caller: x (M, K), w (N, K), bias (N) or null, out
// (M, N), all bf16 and contiguous; sums: M x N floats of scratch. Up to 4 rows, each thread streams
// its range of W's rows once, front to back. Above, x goes in blocks of 4 rows against a chunk of
// W's rows small enough to stay in L2 (kChunkBytes): W comes from memory once, and every block of
// x reads the chunk from L2.
inline void gemv_raw(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* wp, int64_t N, const uint16_t* bp,
                     int64_t act, uint16_t* op, float* sums) {
  thread_local HugeScratch xf;  // x widened once: its blocks split even / odd, then its tail
  float* xs = xf.get(M * K);
  widen_x(xp, M, K, xs);
  const int64_t chunk = M <= kRowBlock ? N : std::max<int64_t>(2, kChunkBytes / (2 * K) / 2 * 2);  // W's rows, even
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
      const int64_t c1 = std::min(n1, c0 + chunk);
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) rows_any(wp, xs, K, m0, std::min(kRowBlock, M - m0), c0, c1, sums, N);
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

#pragma once
// Register-only chains of AVX-512's two multiply-adds, shared by kernels/peak.cpp (the hardware's
// compute limit at each level) and gemv_bf16.h (which of the two its packed kernel multiplies with
// where compute sets the pace). Each chain computes acc = acc * x + y from acc = 0, so with x = y = 1
// it ends at iters exactly: the checksum proves every instruction ran.

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace cpugen_chains {

constexpr int kChains = 16;  // AVX-512: 32 zmm registers hold them and the two operands

__attribute__((target("avx512f"))) inline double fma_avx512(int64_t iters, float x, float y) {
  __m512 acc[kChains];
  const __m512 vx = _mm512_set1_ps(x), vy = _mm512_set1_ps(y);
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], vx, vy);
  double sum = 0;
  for (int c = 0; c < kChains; ++c) sum += _mm512_reduce_add_ps(acc[c]);
  return sum;
}

// vdpbf16ps: each fp32 lane adds a[2i] * b[2i] + a[2i+1] * b[2i+1]. With a = (x, 0) pairs and
// b = (y, 0) pairs every lane adds x * y per instruction, so acc = iters exactly when x = y = 1.
__attribute__((target("avx512f,avx512bf16"))) inline double dp_bf16(int64_t iters, float x, float y) {
  __m512 acc[kChains];
  uint32_t bx, by;  // the bf16 of x and of y (their fp32 bits' upper half; exact for 1.0) in each
  std::memcpy(&bx, &x, 4);  // lane's low half, 0 in its high half
  std::memcpy(&by, &y, 4);
  const __m512i pair_x = _mm512_set1_epi32(static_cast<int>(bx >> 16));
  const __m512i pair_y = _mm512_set1_epi32(static_cast<int>(by >> 16));
  const __m512bh vx = reinterpret_cast<__m512bh>(pair_x), vy = reinterpret_cast<__m512bh>(pair_y);
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], vx, vy);
  double sum = 0;
  for (int c = 0; c < kChains; ++c) sum += _mm512_reduce_add_ps(acc[c]);
  return sum;
}

}  // namespace cpugen_chains

#pragma once
// vec_math.h's fp32 math at the AVX2 level (8 lanes of AVX2 + FMA, no AVX-512): bf16 loads and
// rounding, the epilogue's activations and softmax's exp, for the kernels' AVX2 paths on CPUs
// without AVX-512 (AMD Zen 2/3, Intel before Skylake-SP). Same formulas as the 16-lane versions;
// a row's tail (fewer than 8 values) goes through a small buffer, as AVX2 has no masked 16-bit loads.

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define CPUGEN_AVX2 __attribute__((target("avx2,fma")))

namespace cpugen_vec2 {

// Whether this CPU has AVX2 and FMA
inline bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// 8 bf16 widened to fp32 (exact): a bf16 is the upper half of an fp32
CPUGEN_AVX2 inline __m256 widen(__m128i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }

CPUGEN_AVX2 inline __m256 load8(const uint16_t* p) {
  return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The first min(8, n) bf16 from p widened, the other lanes `fill`
CPUGEN_AVX2 inline __m256 load(const uint16_t* p, int64_t n, float fill = 0.f) {
  if (n >= 8) return load8(p);
  if (n <= 0) return _mm256_set1_ps(fill);
  alignas(16) uint16_t t[8];
  uint32_t f;
  std::memcpy(&f, &fill, sizeof(f));
  for (int i = 0; i < 8; ++i) t[i] = static_cast<uint16_t>(f >> 16);
  std::memcpy(t, p, n * sizeof(uint16_t));
  return load8(t);
}

// fp32 -> bf16, nearest even, NaN kept quiet: torch's rounding
CPUGEN_AVX2 inline __m128i round_bf16(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  u = _mm256_blendv_epi8(u, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // 32 -> 16 bits (every value fits): packus works within 128-bit halves, the permute joins them
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0xD8));
}

// the first min(8, n) lanes of v rounded to bf16 into p
CPUGEN_AVX2 inline void store(uint16_t* p, __m256 v, int64_t n) {
  const __m128i r = round_bf16(v);
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), r);
    return;
  }
  alignas(16) uint16_t t[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), r);
  std::memcpy(p, t, n * sizeof(uint16_t));
}

// the first min(8, n) floats from p, the other lanes `fill`
CPUGEN_AVX2 inline __m256 loadf(const float* p, int64_t n, float fill = 0.f) {
  if (n >= 8) return _mm256_loadu_ps(p);
  if (n <= 0) return _mm256_set1_ps(fill);
  alignas(32) float t[8];
  for (int i = 0; i < 8; ++i) t[i] = i < n ? p[i] : fill;
  return _mm256_load_ps(t);
}

CPUGEN_AVX2 inline void storef(float* p, __m256 v, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
    return;
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  std::memcpy(p, t, n * sizeof(float));
}

CPUGEN_AVX2 inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

CPUGEN_AVX2 inline float hmax(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// e^x: vec_math.h's exp16 (Cephes' expf), 2^n built in the exponent bits (n in [-126, 127])
CPUGEN_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// erf: vec_math.h's erf16 (Abramowitz & Stegun 7.1.26)
CPUGEN_AVX2 inline __m256 erf8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 a = _mm256_andnot_ps(sign, x);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
  const __m256 y = _mm256_fnmadd_ps(_mm256_mul_ps(p, t), e, _mm256_set1_ps(1.f));
  return _mm256_xor_ps(y, _mm256_and_ps(sign, x));  // erf is odd: negated where x < 0
}

// vec_math.h's activations (its Act codes)
CPUGEN_AVX2 inline __m256 activate(__m256 v, int64_t act) {
  const __m256 one = _mm256_set1_ps(1.f);
  switch (act) {
    case 1: {  // gelu, tanh form: v / (1 + e^(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3)
      const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
      const __m256 u = _mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f), _mm256_fmadd_ps(v3, _mm256_set1_ps(0.044715f), v));
      return _mm256_div_ps(v, _mm256_add_ps(one, exp8(u)));
    }
    case 2:
      return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v),
                           _mm256_add_ps(one, erf8(_mm256_mul_ps(v, _mm256_set1_ps(0.7071067811865476f)))));
    case 3: return _mm256_max_ps(v, _mm256_setzero_ps());
    case 4: return _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
    default: return v;
  }
}

}  // namespace cpugen_vec2

#pragma once
// Vectorized fp32 math shared by the kernels (16 lanes of AVX-512): the epilogue's activations
// (gemv_bf16.h), attention's softmax (decode_attention.h), and bf16 loads and rounding.

#include <immintrin.h>

#include <cstdint>

namespace cpugen_vec {

// 16 bf16 widened to fp32 (exact)
__attribute__((target("avx512f"))) inline __m512 widen_bf16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// 16 bf16 from p, widened to fp32
__attribute__((target("avx512f"))) inline __m512 load_bf16x16(const uint16_t* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 bf16 from p (the lanes of m; the others 0), widened to fp32
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return widen_bf16(_mm256_maskz_loadu_epi16(m, p));
}

// fp32 -> bf16, nearest even, NaN kept quiet: torch's rounding, without AVX512-BF16
__attribute__((target("avx512f,avx512bw"))) inline __m256i round_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(u);
}

// The first min(16, n - i) lanes
inline __mmask16 lanes(int64_t n, int64_t i) {
  return n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

// e^x in fp32: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial), ~1 ulp
__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// erf in fp32: Abramowitz & Stegun 7.1.26, absolute error under 1.5e-7
__attribute__((target("avx512f"))) inline __m512 erf16(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
  const __m512 y = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), e, _mm512_set1_ps(1.f));
  return _mm512_mask_sub_ps(y, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps(), y);
}

// The instruction level a kernel runs at, where it has more than one: AVX2 + FMA (vec_avx2.h's
// 8 lanes) or AVX-512 (these 16 lanes; AVX512-BF16 where the kernel uses vdpbf16ps)
enum class Level : int { kAvx2 = 0, kAvx512 = 1 };

// The activations the kernels apply, by code (cpugen/model/activations.py's KERNEL_CODE)
enum Act : int64_t { kNone = 0, kGeluTanh = 1, kGelu = 2, kRelu = 3, kSilu = 4 };

__attribute__((target("avx512f"))) inline __m512 activate(__m512 v, int64_t act) {
  const __m512 one = _mm512_set1_ps(1.f);
  switch (act) {
    case kGeluTanh: {  // 0.5 v (1 + tanh(u)) = v / (1 + e^(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3)
      const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      const __m512 u = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057308f), _mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v));
      return _mm512_div_ps(v, _mm512_add_ps(one, exp16(u)));
    }
    case kGelu:
      return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v),
                           _mm512_add_ps(one, erf16(_mm512_mul_ps(v, _mm512_set1_ps(0.7071067811865476f)))));
    case kRelu: return _mm512_max_ps(v, _mm512_setzero_ps());
    case kSilu: return _mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    default: return v;
  }
}

}  // namespace cpugen_vec

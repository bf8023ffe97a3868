#pragma once
// Decode attention over the static KV cache: one new query per sequence against S cached positions.
//
//   out (B, nh, hd) = softmax(q (B, nh, hd) . K (B, nkv, S, hd)^T * scale) . V (B, nkv, S, hd)
//
// Bound by reading K and V once. Each task takes one (sequence, kv head) and its nh/nkv query
// heads: scores by vdpbf16ps over each K row (read once for all its query heads), softmax in fp32,
// then each V row (bf16 -> fp32) accumulated into the outputs. K and V may be strided views of the
// cache (rows of hd contiguous elements). No mask: every cached position is attended (the caller
// uses this only for unpadded batches without a sliding window).
//
// decode_step is the whole of a decode step's attention after the qkv projection, in one call per
// layer where the torch path takes about thirty small ops: it rotates q and k (rotary embedding
// on the first rd dims, half-split pairs, fp32 math rounded to bf16), writes k and v to the
// cache at this step's position, and attends over the cache up to it.
// Reference: kernels/reference.py (decode_attention, decode_step); check: kernels/check_decode_attention.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include "vec_avx2.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace cpugen_attn {

namespace {

using cpugen_vec::load_bf16x16;

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float v) { return c10::BFloat16(v).x; }  // nearest even, as torch rounds

// dst (hd) = src rotated on its first rd dims: pairs (i, i + rd/2) by the angle whose cos/sin are
// cos[i]/sin[i]; x1 * c - x2 * s and x2 * c + x1 * s in fp32 (no fused multiply-add: the build
// turns contraction off), rounded once
inline void rotate(const uint16_t* src, uint16_t* dst, const float* cos, const float* sin, int64_t rd, int64_t hd) {
  const int64_t h2 = rd / 2;
  for (int64_t i = 0; i < h2; ++i) {
    const float x1 = bf16_to_float(src[i]), x2 = bf16_to_float(src[i + h2]);
    const float a = x1 * cos[i], b = x2 * sin[i], c = x2 * cos[i], d = x1 * sin[i];
    dst[i] = float_to_bf16(a - b);
    dst[i + h2] = float_to_bf16(c + d);
  }
  if (rd < hd) std::memcpy(dst + rd, src + rd, (hd - rd) * sizeof(uint16_t));
}

constexpr int64_t kAheadRows = 8;  // K rows prefetched ahead of the one scored

// Touches the lines of `rows` rows of hd bf16 (hd a multiple of 32: whole lines) into L2
inline void prefetch_rows(const uint16_t* p, int64_t rows, int64_t row, int64_t hd) {
  for (int64_t s = 0; s < rows; ++s)
    for (int64_t d = 0; d < hd; d += 32) _mm_prefetch(reinterpret_cast<const char*>(p + s * row + d), _MM_HINT_T1);
}

// out (g, hd) bf16 = softmax(q (g, hd) . k (S, hd)^T * scale) . v (S, hd), rows of k/v k_row/v_row
// apart. The cache is cold at every call (a decode step streams the weights between two layers'
// attention), so the reads are prefetched: K a few rows ahead of the scores, each V row as its K
// row is scored (for the second pass), and during the second pass the K rows of the next task
// (`next_k`, S rows k_row apart, or null). Measured on a Zen 4 core, one gptj-1b layer (16 heads
// of 128) at 100 cached positions after a 64 MB read: 49.8 us before this and the vectorized
// softmax, against 13.5 us with the cache warm.
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void one_head_group(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int64_t g, int64_t S,
                    int64_t hd, int64_t k_row, int64_t v_row, float scale, float* scores, const uint16_t* next_k) {
  // scores (g, S)
  prefetch_rows(k, std::min(S, kAheadRows), k_row, hd);
  for (int64_t s = 0; s < S; ++s) {
    const uint16_t* kr = k + s * k_row;
    if (s + kAheadRows < S) prefetch_rows(kr + kAheadRows * k_row, 1, k_row, hd);
    prefetch_rows(v + s * v_row, 1, v_row, hd);
    for (int64_t h = 0; h < g; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < hd; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(kr + d), (__m512bh)_mm512_loadu_si512(q + h * hd + d));
      scores[h * S + s] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  for (int64_t h = 0; h < g; ++h) {  // softmax in fp32, 16 scores at a time
    float* sc = scores + h * S;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 t = S - s >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (S - s)) - 1);
      m = _mm512_mask_max_ps(m, t, m, _mm512_maskz_loadu_ps(t, sc + s));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 t = S - s >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (S - s)) - 1);
      const __m512 e = cpugen_vec::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, sc + s), mx));
      sum = _mm512_mask_add_ps(sum, t, sum, e);
      _mm512_mask_storeu_ps(sc + s, t, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 t = S - s >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (S - s)) - 1);
      _mm512_mask_storeu_ps(sc + s, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, sc + s), inv));
    }
  }
  for (int64_t h = 0; h < g; ++h) {  // out = p . V, 16 dims at a time, hd <= 256
    __m512 acc[16];
    const int64_t n = hd / 16;
    for (int64_t i = 0; i < n; ++i) acc[i] = _mm512_setzero_ps();
    const float* sc = scores + h * S;
    for (int64_t s = 0; s < S; ++s) {
      if (next_k && h == 0) prefetch_rows(next_k + s * k_row, 1, k_row, hd);
      const __m512 p = _mm512_set1_ps(sc[s]);
      const uint16_t* vr = v + s * v_row;
      for (int64_t i = 0; i < n; ++i) acc[i] = _mm512_fmadd_ps(p, load_bf16x16(vr + 16 * i), acc[i]);
    }
    for (int64_t i = 0; i < n; ++i)  // rounded to bf16 (nearest even) on the way out
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * hd + 16 * i), (__m256i)_mm512_cvtneps_pbh(acc[i]));
  }
}

// one_head_group at the AVX2 level: q widened once, scores by FMA on widened K rows, 8 lanes; the
// same prefetches. scores holds g * S floats, then g * hd for the widened q.
CPUGEN_AVX2
void one_head_group_avx2(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int64_t g, int64_t S,
                         int64_t hd, int64_t k_row, int64_t v_row, float scale, float* scores, const uint16_t* next_k) {
  float* qf = scores + g * S;  // (g, hd)
  for (int64_t i = 0; i < g * hd; i += 8) _mm256_storeu_ps(qf + i, cpugen_vec2::load8(q + i));
  prefetch_rows(k, std::min(S, kAheadRows), k_row, hd);
  for (int64_t s = 0; s < S; ++s) {
    const uint16_t* kr = k + s * k_row;
    if (s + kAheadRows < S) prefetch_rows(kr + kAheadRows * k_row, 1, k_row, hd);
    prefetch_rows(v + s * v_row, 1, v_row, hd);
    for (int64_t h = 0; h < g; ++h) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; d += 16) {
        a0 = _mm256_fmadd_ps(cpugen_vec2::load8(kr + d), _mm256_loadu_ps(qf + h * hd + d), a0);
        a1 = _mm256_fmadd_ps(cpugen_vec2::load8(kr + d + 8), _mm256_loadu_ps(qf + h * hd + d + 8), a1);
      }
      scores[h * S + s] = cpugen_vec2::hsum(_mm256_add_ps(a0, a1)) * scale;
    }
  }
  for (int64_t h = 0; h < g; ++h) {  // softmax in fp32, 8 scores at a time
    float* sc = scores + h * S;
    const float ninf = -INFINITY;
    __m256 m = _mm256_set1_ps(ninf);
    for (int64_t s = 0; s < S; s += 8) m = _mm256_max_ps(m, cpugen_vec2::loadf(sc + s, S - s, ninf));
    const __m256 mx = _mm256_set1_ps(cpugen_vec2::hmax(m));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; s += 8) {  // lanes past S: e^-inf = 0 (exp8 clamps to e^-87, so masked off)
      __m256 e = cpugen_vec2::exp8(_mm256_sub_ps(cpugen_vec2::loadf(sc + s, S - s), mx));
      if (S - s < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                          _mm256_set1_epi32(static_cast<int>(S - s)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
      sum = _mm256_add_ps(sum, e);
      cpugen_vec2::storef(sc + s, e, S - s);
    }
    const __m256 inv = _mm256_set1_ps(1.f / cpugen_vec2::hsum(sum));
    for (int64_t s = 0; s < S; s += 8) cpugen_vec2::storef(sc + s, _mm256_mul_ps(cpugen_vec2::loadf(sc + s, S - s), inv), S - s);
  }
  constexpr int64_t kChunk = 64;  // out = p . V, 64 dims (8 registers) at a time
  for (int64_t h = 0; h < g; ++h) {
    const float* sc = scores + h * S;
    for (int64_t d0 = 0; d0 < hd; d0 += kChunk) {
      __m256 acc[kChunk / 8];
      const int64_t n = std::min(kChunk, hd - d0) / 8;
      for (int64_t i = 0; i < n; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        if (next_k && h == 0 && d0 == 0) prefetch_rows(next_k + s * k_row, 1, k_row, hd);
        const __m256 p = _mm256_set1_ps(sc[s]);
        const uint16_t* vr = v + s * v_row + d0;
        for (int64_t i = 0; i < n; ++i) acc[i] = _mm256_fmadd_ps(p, cpugen_vec2::load8(vr + 8 * i), acc[i]);
      }
      for (int64_t i = 0; i < n; ++i) cpugen_vec2::store(out + h * hd + d0 + 8 * i, acc[i], 8);
    }
  }
}

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
}

const bool kSupported = supported();

}  // namespace

using Level = cpugen_vec::Level;

// Whether this CPU runs a level's kernel (AVX2 + FMA, or AVX512-BF16)
inline void check_level(Level level, const char* what) {
  TORCH_CHECK(level == Level::kAvx2 ? cpugen_vec2::supported() : kSupported, "cpugen ", what, ": needs ",
              level == Level::kAvx2 ? "AVX2 and FMA" : "AVX512-BF16");
}

// A level's kernel for one (sequence, kv head); its scratch: g x (S + hd) floats
inline decltype(&one_head_group) head_group(Level level) {
  return level == Level::kAvx2 ? one_head_group_avx2 : one_head_group;
}

// q (B, nh, hd), k and v (B, nkv, S, hd) with unit stride on hd -> (B, nh, hd) bf16
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               Level level = Level::kAvx512) {
  check_level(level, "decode_attention");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16, "cpugen decode_attention: bf16 only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "cpugen decode_attention: q (B, nh, hd), k/v (B, nkv, S, hd)");
  const int64_t B = k.size(0), nkv = k.size(1), S = k.size(2), hd = k.size(3), nh = q.size(1);
  TORCH_CHECK(q.size(0) == B && q.size(2) == hd && nh % nkv == 0 && v.sizes() == k.sizes(),
              "cpugen decode_attention: mismatched shapes");
  TORCH_CHECK(hd % 32 == 0 && hd <= 256, "cpugen decode_attention: head dim must be a multiple of 32, at most 256");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "cpugen decode_attention: rows of k/v must be contiguous");
  const auto qc = q.contiguous();
  const int64_t g = nh / nkv;
  auto out = torch::empty({B, nh, hd}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const auto attend = head_group(level);
  at::parallel_for(0, B * nkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(g * (S + hd));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nkv, h = t % nkv;
      const uint16_t* next_k = t + 1 < t1 ? kp + (t + 1) / nkv * k.stride(0) + (t + 1) % nkv * k.stride(1) : nullptr;
      attend(qp + (b * nh + h * g) * hd, kp + b * k.stride(0) + h * k.stride(1),
                     vp + b * v.stride(0) + h * v.stride(1), op + (b * nh + h * g) * hd, g, S, hd, k.stride(2),
                     v.stride(2), scale, scores.data(), next_k);
    }
  });
  return out;
}

// decode_step on raw pointers, checked by the caller: qkv (B, ld) rows, cos/sin (B, rd / 2) fp32
// or null (rd = 0), caches (B, nkv, S_max, hd) contiguous, out (B, nh hd), all bf16 but the angles
inline void decode_step_raw(const uint16_t* xp, int64_t ld, const float* cp, const float* sp, uint16_t* kp,
                            uint16_t* vp, int64_t B, int64_t nkv, int64_t S_max, int64_t hd, int64_t index, int64_t nh,
                            int64_t rd, uint16_t* op, Level level = Level::kAvx512) {
  const int64_t g = nh / nkv, S = index + 1;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const auto attend = head_group(level);
  at::parallel_for(0, B * nkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(g * (S + hd));
    std::vector<uint16_t> q(g * hd);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nkv, h = t % nkv;
      const uint16_t* x = xp + b * ld;
      const float* c = cp ? cp + b * rd / 2 : nullptr;
      const float* s = sp ? sp + b * rd / 2 : nullptr;
      uint16_t* kh = kp + (b * nkv + h) * S_max * hd;  // this sequence's cache for kv head h
      uint16_t* vh = vp + (b * nkv + h) * S_max * hd;
      for (int64_t j = 0; j < g; ++j) rotate(x + (h * g + j) * hd, q.data() + j * hd, c, s, rd, hd);
      rotate(x + (nh + h) * hd, kh + index * hd, c, s, rd, hd);
      std::memcpy(vh + index * hd, x + (nh + nkv + h) * hd, hd * sizeof(uint16_t));
      const uint16_t* next_k = t + 1 < t1 ? kp + (t + 1) * S_max * hd : nullptr;  // task t + 1's cache
      attend(q.data(), kh, vh, op + (b * nh + h * g) * hd, g, S, hd, hd, hd, scale, scores.data(), next_k);
    }
  });
}

// qkv (B, (nh + 2 nkv) hd) bf16: the step's fused projection, q heads then k then v; cos, sin
// (B, rd / 2) fp32, each sequence's angles (rd = 0: no rotary, empty tables); k_cache, v_cache
// (B, nkv, S_max, hd) bf16, contiguous; index: this token's cache position, the same for every
// sequence -> (B, nh hd) bf16. Writes k_cache/v_cache[:, :, index].
torch::Tensor decode_step(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                          torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t index, int64_t nh, int64_t rd,
                          Level level = Level::kAvx512) {
  check_level(level, "decode_step");
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
              v_cache.scalar_type() == at::kBFloat16, "cpugen decode_step: bf16 only");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes(), "cpugen decode_step: caches (B, nkv, S_max, hd), contiguous");
  const int64_t B = k_cache.size(0), nkv = k_cache.size(1), S_max = k_cache.size(2), hd = k_cache.size(3);
  const int64_t row = (nh + 2 * nkv) * hd;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == B && qkv.size(1) == row && qkv.stride(1) == 1,
              "cpugen decode_step: qkv (B, (nh + 2 nkv) hd) with rows of unit stride");
  TORCH_CHECK(nh % nkv == 0 && hd % 32 == 0 && hd <= 256, "cpugen decode_step: head dim a multiple of 32, at most 256");
  TORCH_CHECK(rd >= 0 && rd <= hd && rd % 2 == 0, "cpugen decode_step: rotary dims even, at most the head dim");
  TORCH_CHECK(index >= 0 && index < S_max, "cpugen decode_step: position ", index, " outside a cache of ", S_max);
  torch::Tensor cc, sc;
  if (rd) {
    cc = cos.to(at::kFloat).contiguous();
    sc = sin.to(at::kFloat).contiguous();
    TORCH_CHECK(cc.numel() == B * rd / 2 && sc.numel() == B * rd / 2, "cpugen decode_step: cos/sin (B, rd / 2)");
  }
  auto out = torch::empty({B, nh * hd}, qkv.options());
  decode_step_raw(reinterpret_cast<const uint16_t*>(qkv.data_ptr()), qkv.stride(0), rd ? cc.data_ptr<float>() : nullptr,
                  rd ? sc.data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(k_cache.data_ptr()),
                  reinterpret_cast<uint16_t*>(v_cache.data_ptr()), B, nkv, S_max, hd, index, nh, rd,
                  reinterpret_cast<uint16_t*>(out.data_ptr()), level);
  return out;
}

}  // namespace cpugen_attn

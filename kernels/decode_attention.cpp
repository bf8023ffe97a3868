// Decode attention over the static KV cache: one new query per sequence against S cached positions.
//
//   out (B, nh, hd) = softmax(q (B, nh, hd) . K (B, nkv, S, hd)^T * scale) . V (B, nkv, S, hd)
//
// Bound by reading K and V once. Each task takes one (sequence, kv head) and its nh/nkv query
// heads: scores by vdpbf16ps over each K row (read once for all its query heads), softmax in fp32,
// then each V row (bf16 -> fp32) accumulated into the outputs. K and V may be strided views of the
// cache (rows of hd contiguous elements). No mask: every cached position is attended (the caller
// uses this only for unpadded batches without a sliding window).
// Reference: kernels/reference.py (decode_attention); check: kernels/check_decode_attention.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

__attribute__((target("avx512f,avx512bw")))
inline __m512 load_bf16x16(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

__attribute__((target("avx512f,avx512bw,avx512bf16")))
void one_head_group(const uint16_t* q, const uint16_t* k, const uint16_t* v, float* out, int64_t g, int64_t S,
                    int64_t hd, int64_t k_row, int64_t v_row, float scale, float* scores) {
  // scores (g, S)
  for (int64_t s = 0; s < S; ++s) {
    const uint16_t* kr = k + s * k_row;
    for (int64_t h = 0; h < g; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < hd; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(kr + d), (__m512bh)_mm512_loadu_si512(q + h * hd + d));
      scores[h * S + s] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  for (int64_t h = 0; h < g; ++h) {  // softmax in fp32
    float* sc = scores + h * S;
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; ++s) mx = std::max(mx, sc[s]);
    float sum = 0.f;
    for (int64_t s = 0; s < S; ++s) sum += (sc[s] = std::exp(sc[s] - mx));
    const float inv = 1.f / sum;
    for (int64_t s = 0; s < S; ++s) sc[s] *= inv;
  }
  for (int64_t h = 0; h < g; ++h) {  // out = p . V, 16 dims at a time, hd <= 256
    __m512 acc[16];
    const int64_t n = hd / 16;
    for (int64_t i = 0; i < n; ++i) acc[i] = _mm512_setzero_ps();
    const float* sc = scores + h * S;
    for (int64_t s = 0; s < S; ++s) {
      const __m512 p = _mm512_set1_ps(sc[s]);
      const uint16_t* vr = v + s * v_row;
      for (int64_t i = 0; i < n; ++i) acc[i] = _mm512_fmadd_ps(p, load_bf16x16(vr + 16 * i), acc[i]);
    }
    for (int64_t i = 0; i < n; ++i) _mm512_storeu_ps(out + h * hd + 16 * i, acc[i]);
  }
}

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
}

const bool kSupported = supported();

}  // namespace

// q (B, nh, hd), k and v (B, nkv, S, hd) with unit stride on hd -> (B, nh, hd) bf16
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(kSupported, "cpugen decode_attention: needs AVX512-BF16");
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
  auto out = torch::empty({B, nh, hd}, q.options().dtype(at::kFloat));
  const auto* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, B * nkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(g * S);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nkv, h = t % nkv;
      one_head_group(qp + (b * nh + h * g) * hd, kp + b * k.stride(0) + h * k.stride(1),
                     vp + b * v.stride(0) + h * v.stride(1), op + (b * nh + h * g) * hd, g, S, hd, k.stride(2),
                     v.stride(2), scale, scores.data());
    }
  });
  return out.to(at::kBFloat16);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one query per sequence against the KV cache, bf16");
}

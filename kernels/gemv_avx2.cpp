// The decode gemv for CPUs with AVX2 and FMA but without AVX-512 (AMD Zen 2/3, Intel before
// Skylake-SP): y (M, N) = act(x (M, K) W (N, K)^T + b) for a few rows of x, bf16 in and out, fp32
// accumulation. A bf16 is the upper half of an fp32, so each 8 weights are widened by a zero
// extension and a 16-bit shift (no F16C, no AVX512-BF16) and multiplied with FMA. W's rows are split
// across threads in contiguous ranges and each is read once, front to back, for every row of x (x is
// widened to fp32 once per call). The epilogue adds the bias and applies the activation in fp32
// (scalar: M x N values against M x N x K multiplies) before one rounding to bf16. Reference:
// kernels/reference.py's gemv; check: kernels/check_gemv.py (--avx2); used by
// cpugen/runtime/eager.py on CPUs without AVX-512.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 4;

inline float act_fn(float v, int64_t act) {
  switch (act) {
    case 1: {  // gelu, tanh approximation
      const float c = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * v * (1.0f + std::tanh(c * (v + 0.044715f * v * v * v)));
    }
    case 2:
      return 0.5f * v * (1.0f + std::erf(v * 0.7071067811865476f));
    case 3:
      return v > 0.0f ? v : 0.0f;
    case 4:
      return v / (1.0f + std::exp(-v));
    default:
      return v;
  }
}

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

__attribute__((target("avx2,fma"))) inline __m256 widen8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Rows [n0, n1) of W against the M rows of xf (fp32, (M, K)); out[m * N + n] gets the dot products.
template <int M>
__attribute__((target("avx2,fma"))) void rows(const uint16_t* w, const float* xf, int64_t K, int64_t n0,
                                              int64_t n1, float* out, int64_t N) {
  const int64_t K16 = K / 16 * 16;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m256 a0[M], a1[M];
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < K16; k += 16) {
      const __m256 w0 = widen8(wr + k), w1 = widen8(wr + k + 8);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + m * K + k), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + m * K + k + 8), a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(_mm256_add_ps(a0[m], a1[m]));
      for (int64_t kk = k; kk < K; ++kk) s += bf16_to_float(wr[kk]) * xf[m * K + kk];
      out[m * N + n] = s;
    }
  }
}

}  // namespace

bool available() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                   int64_t act) {
  TORCH_CHECK(available(), "cpugen gemv_avx2: this CPU lacks AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "cpugen gemv_avx2: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "cpugen gemv_avx2: bf16 only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "cpugen gemv_avx2: 1 to ", kMaxRows, " rows of x, not ", M);
  const torch::Tensor wc = w.contiguous();
  const torch::Tensor xf = x.to(at::kFloat).contiguous();  // (M, K): widened once
  std::vector<float> acc(M * N);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  const float* xp = xf.data_ptr<float>();
  float* out = acc.data();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows<1>(wp, xp, K, n0, n1, out, N); break;
      case 2: rows<2>(wp, xp, K, n0, n1, out, N); break;
      case 3: rows<3>(wp, xp, K, n0, n1, out, N); break;
      default: rows<4>(wp, xp, K, n0, n1, out, N); break;
    }
  });
  torch::Tensor y = torch::empty({M, N}, x.options());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const torch::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : torch::Tensor();
  const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      yp[m * N + n] = at::BFloat16(act_fn(out[m * N + n] + (bp ? bp[n] : 0.0f), act));  // rounds to nearest even
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = act(x W^T + b) for 1-4 rows of x, bf16, fp32 accumulation, AVX2 + FMA");
  m.def("available", &available);
  m.def("isa", []() { return std::string("avx2"); });
}

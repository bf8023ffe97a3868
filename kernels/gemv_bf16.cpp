// Skinny bf16 matmul for decode: y (M, N) = act(x (M, K) @ W (N, K)^T [+ bias]), M small (1..16).
//
// At decode the whole weight matrix is read once per step for a handful of rows of x, so the op
// is bound by memory bandwidth. The kernel streams W row by row exactly once, keeps x (M x K bf16,
// at most a few hundred KB) in cache, and accumulates in fp32:
//   - AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32 lanes;
//   - AVX-512F: bf16 -> fp32 by a 16-bit shift, then fused multiply-add;
// chosen at run time from what the CPU reports. Rows of W are split across threads
// (at::parallel_for) in contiguous ranges and taken 4 at a time, each W vector loaded once for
// all rows of x. While one block of 4 rows is multiplied, the next block is prefetched into L2,
// one line for each line read: the hardware prefetchers alone leave the 4 interleaved row streams
// short of bandwidth (measured on 2 Zen 4 cores, GB/s of W: 21.6 -> 27.5 at 1 row of x,
// 19.9 -> 27.6 at 4 rows; reading W's rows one after the other instead gave 23.9 and 11.8).
// The epilogue (bias, then gelu/relu/silu) runs on the fp32 sums, rounded once to bf16 on the way
// out: the decode MLP's bias and activation cost no extra pass over the output.
// Reference: kernels/reference.py; check: kernels/check_gemv.py; benchmark: kernels/bench_gemv.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kMaxM = 16;
constexpr int64_t kRows = 4;  // rows of W per inner step
constexpr int64_t kMB = 4;  // rows of x per pass over them

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

enum Act : int64_t { kNone = 0, kGeluTanh = 1, kGelu = 2, kRelu = 3, kSilu = 4 };

// Finishes output (m, n) from its fp32 sum: + bias, activation, round to bf16 (nearest even).
struct Epilogue {
  const uint16_t* bias;  // bf16 (N,) or null
  int64_t act;
  at::BFloat16* out;  // (M, N)
  int64_t N;

  inline void put(int64_t m, int64_t n, float v) const {
    if (bias) v += bf16_to_float(bias[n]);
    switch (act) {
      case kGeluTanh: v = 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v))); break;
      case kGelu: v = 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f)); break;
      case kRelu: v = v > 0.f ? v : 0.f; break;
      case kSilu: v = v / (1.f + std::exp(-v)); break;
      default: break;
    }
    out[m * N + n] = at::BFloat16(v);
  }
};

// The rows of the block after [n, n + kRows) to prefetch while this one is read; past the end of
// this thread's range, the current rows again (harmless: already in cache)
inline void next_rows(const uint16_t* w, int64_t n, int64_t n1, int64_t K, const char* next[kRows]) {
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row = n + kRows + r < n1 ? n + kRows + r : std::min(n + r, n1 - 1);
    next[r] = reinterpret_cast<const char*>(w + row * K);
  }
}

// ---- AVX512-BF16 -------------------------------------------------------------------------------
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void rows_avx512bf16(const uint16_t* x, const uint16_t* w, const Epilogue& ep, int64_t M, int64_t K, int64_t n0,
                     int64_t n1) {
  const int64_t K32 = K / 32 * 32;
  const __mmask32 tail = K - K32 ? static_cast<__mmask32>((1ull << (K - K32)) - 1) : 0;
  for (int64_t n = n0; n < n1; n += kRows) {
    const int64_t rows = std::min(kRows, n1 - n);
    const char* next[kRows];
    next_rows(w, n, n1, K, next);
    // kRows x kMB accumulators stay in registers; for M > kMB the same rows of W are read again
    // from cache (4 rows x K bf16 fit in L2), not from memory
    for (int64_t m0 = 0; m0 < M; m0 += kMB) {
      const int64_t mb = std::min(kMB, M - m0);
      const uint16_t* xm = x + m0 * K;
      __m512 acc[kRows][kMB];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t m = 0; m < kMB; ++m) acc[r][m] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K32; k += 32) {
        __m512i wv[kRows];
        if (m0 == 0)
          for (int64_t r = 0; r < kRows; ++r) _mm_prefetch(next[r] + 2 * k, _MM_HINT_T1);
        for (int64_t r = 0; r < rows; ++r)
          wv[r] = _mm512_loadu_si512(reinterpret_cast<const void*>(w + (n + r) * K + k));
        for (int64_t m = 0; m < mb; ++m) {
          const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(xm + m * K + k));
          for (int64_t r = 0; r < rows; ++r)
            acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
        }
      }
      if (tail) {
        __m512i wv[kRows];
        for (int64_t r = 0; r < rows; ++r) wv[r] = _mm512_maskz_loadu_epi16(tail, w + (n + r) * K + K32);
        for (int64_t m = 0; m < mb; ++m) {
          const __m512i xv = _mm512_maskz_loadu_epi16(tail, xm + m * K + K32);
          for (int64_t r = 0; r < rows; ++r)
            acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t m = 0; m < mb; ++m) ep.put(m0 + m, n + r, _mm512_reduce_add_ps(acc[r][m]));
    }
  }
}

// ---- AVX-512F ----------------------------------------------------------------------------------
__attribute__((target("avx512f,avx512bw")))
inline __m512 load_bf16x16(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

__attribute__((target("avx512f,avx512bw")))
void rows_avx512(const uint16_t* x, const uint16_t* w, const Epilogue& ep, int64_t M, int64_t K, int64_t n0,
                 int64_t n1) {
  const int64_t K16 = K / 16 * 16;
  for (int64_t n = n0; n < n1; n += kRows) {
    const int64_t rows = std::min(kRows, n1 - n);
    const char* next[kRows];
    next_rows(w, n, n1, K, next);
    for (int64_t m0 = 0; m0 < M; m0 += kMB) {
      const int64_t mb = std::min(kMB, M - m0);
      const uint16_t* xm = x + m0 * K;
      __m512 acc[kRows][kMB];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t m = 0; m < kMB; ++m) acc[r][m] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K16; k += 16) {
        __m512 wv[kRows];
        if (m0 == 0 && k % 32 == 0)
          for (int64_t r = 0; r < kRows; ++r) _mm_prefetch(next[r] + 2 * k, _MM_HINT_T1);
        for (int64_t r = 0; r < rows; ++r) wv[r] = load_bf16x16(w + (n + r) * K + k);
        for (int64_t m = 0; m < mb; ++m) {
          const __m512 xv = load_bf16x16(xm + m * K + k);
          for (int64_t r = 0; r < rows; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t m = 0; m < mb; ++m) {
          float s = _mm512_reduce_add_ps(acc[r][m]);
          for (int64_t k = K16; k < K; ++k) s += bf16_to_float(w[(n + r) * K + k]) * bf16_to_float(xm[m * K + k]);
          ep.put(m0 + m, n + r, s);
        }
    }
  }
}

enum class Isa { kAvx512Bf16, kAvx512, kNone };

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")) return Isa::kAvx512Bf16;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::kAvx512;
  return Isa::kNone;
}

const Isa kIsa = detect();

}  // namespace

std::string isa() {
  switch (kIsa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    default: return "none";
  }
}

// x (M, K) bf16, w (N, K) bf16, bias (N,) or none, act (Act) -> act(x w^T + bias) (M, N) bf16
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                   int64_t act) {
  TORCH_CHECK(kIsa != Isa::kNone, "cpugen gemv: this CPU has no AVX-512");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "cpugen gemv: bf16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "cpugen gemv: shapes (M, K) and (N, K)");
  TORCH_CHECK(x.size(0) <= kMaxM, "cpugen gemv: at most ", kMaxM, " rows of x");
  TORCH_CHECK(act >= kNone && act <= kSilu, "cpugen gemv: unknown activation ", act);
  const auto xc = x.contiguous();
  const auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "cpugen gemv: bias of ", bias->numel(), " for ", N, " outputs");
    bc = bias->to(at::kBFloat16).contiguous();
  }
  auto out = torch::empty({M, N}, x.options());
  const Epilogue ep{bc.defined() ? reinterpret_cast<const uint16_t*>(bc.data_ptr()) : nullptr, act,
                    out.data_ptr<at::BFloat16>(), N};
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  // grain: at least 64 rows (a few hundred KB of W) per task
  at::parallel_for(0, (N + kRows - 1) / kRows, 16, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kRows, n1 = std::min(N, b1 * kRows);
    if (kIsa == Isa::kAvx512Bf16)
      rows_avx512bf16(xp, wp, ep, M, K, n0, n1);
    else
      rows_avx512(xp, wp, ep, M, K, n0, n1);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = act(x @ w.T + bias) for small M, bf16 in/out, fp32 accumulation", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("act") = 0);
  m.def("isa", &isa, "the instruction set the kernel dispatched to");
}

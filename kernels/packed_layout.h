#pragma once
// cpugen's packed layout, shared by the kernels that multiply it (gemv_bf16.h at AVX512-BF16,
// packed_avx2.h at AVX2): W (N, K) repacked once into panels of 64 outputs, each holding its
// outputs' k pairs side by side:
//   P (ceil(N/64), K/2, 128): P[p, j, 2 c + i] = W[64 p + c, 2 j + i]  (zeros past N)
// A panel's k pair row (256 bytes) is what one broadcast pair of x multiplies, and each panel is
// read front to back, so every matrix is one sequential stream whatever the number of rows of x.
// The layout is plain data: packing needs no particular instruction set.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace cpugen_packed {

constexpr int64_t kPanel = 64;  // outputs per panel

// Shape of the packed form of an (n, k) weight (k even)
inline std::vector<int64_t> packed_shape(int64_t n, int64_t k) {
  return {(n + kPanel - 1) / kPanel, k / 2, 2 * kPanel};
}

// Writes w (N, K) bf16 into p (packed_shape(N, K), bf16, allocated by the caller), zeros past N
inline void pack_into(const torch::Tensor& w, torch::Tensor& p) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(1) % 2 == 0,
              "cpugen pack: w (N, K) bf16 with K even");
  const int64_t N = w.size(0), K = w.size(1), np = (N + kPanel - 1) / kPanel;
  TORCH_CHECK(p.scalar_type() == at::kBFloat16 && p.is_contiguous() && p.sizes() == at::IntArrayRef(packed_shape(N, K)),
              "cpugen pack: p must be contiguous bf16 of shape packed_shape(N, K)");
  const auto wc = w.contiguous();
  const auto* src = reinterpret_cast<const uint32_t*>(wc.data_ptr());  // (N, K/2) pairs
  auto* dst = reinterpret_cast<uint32_t*>(p.data_ptr());  // (np, K/2, 64) pairs
  const int64_t K2 = K / 2;
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t q = p0; q < p1; ++q)
      for (int64_t c = 0; c < kPanel; ++c) {  // one row of W at a time: read in order, written with a stride
        const int64_t n = q * kPanel + c;
        uint32_t* d = dst + q * K2 * kPanel + c;
        if (n < N) {
          const uint32_t* s = src + n * K2;
          for (int64_t j = 0; j < K2; ++j) d[j * kPanel] = s[j];
        } else {
          for (int64_t j = 0; j < K2; ++j) d[j * kPanel] = 0;
        }
      }
  });
}

// Whether p is the packed form of an (n, K) weight that x (M, K) multiplies
inline bool fits(const torch::Tensor& x, const torch::Tensor& p, int64_t n) {
  return x.dim() == 2 && p.dim() == 3 && p.size(2) == 2 * kPanel && x.size(1) == 2 * p.size(1) &&
         (n + kPanel - 1) / kPanel == p.size(0) && p.is_contiguous();
}

// act(x W^T + bias) (M, n) bf16 through a level's kernel on raw pointers, `raw` (x, M, K, w, n,
// bias or null, act, out), for x (M, K) bf16 and w, the weight in the form `raw` reads (checked by
// the caller); `what` names the kernel in errors
template <class Raw>
torch::Tensor run_linear(Raw raw, const char* what, const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                         const c10::optional<torch::Tensor>& bias, int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 4, what, ": unknown activation ", act);
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, what, ": bias of ", bias->numel(), " for ", n, " outputs");
    bc = bias->to(at::kBFloat16).contiguous();
  }
  auto out = torch::empty({M, n}, x.options());
  raw(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, reinterpret_cast<const uint16_t*>(w.data_ptr()), n,
      bc.defined() ? reinterpret_cast<const uint16_t*>(bc.data_ptr()) : nullptr, act,
      reinterpret_cast<uint16_t*>(out.data_ptr()));
  return out;
}

// linear_packed's checks and output around a level's kernel on raw pointers (run_linear): x (M, K)
// bf16, p the packed form of an (n, K) weight, bias (n,) or none, act an activation code
// (vec_math.h's Act) -> act(x W^T + bias) (M, n) bf16
template <class Raw>
torch::Tensor linear_packed_with(Raw raw, const torch::Tensor& x, const torch::Tensor& p, int64_t n,
                                 const c10::optional<torch::Tensor>& bias, int64_t act) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && p.scalar_type() == at::kBFloat16, "cpugen linear_packed: bf16 only");
  TORCH_CHECK(fits(x, p, n), "cpugen linear_packed: x (M, K) and a packed (n, K) weight");
  return run_linear(raw, "cpugen linear_packed", x, p, n, bias, act);
}

}  // namespace cpugen_packed

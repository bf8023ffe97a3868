// The hardware's compute limit at each x86 ISA level, measured register-only: on every ATen worker
// thread, independent chains of one instruction (FMA on 8 or 16 fp32 lanes, or AVX512-BF16's
// vdpbf16ps, or AMX's tdpbf16ps on tiles) with no memory traffic at all, so that nothing but the
// execution units sets the rate.
// Enough chains run side by side to cover the instruction's latency on every port (4 cycles x 2
// pipes = 8 at least: 16 with AVX-512's 32 registers, 12 within AVX2's 16). Each chain computes acc = acc * x + y from acc = 0 with x = 1 and
// y = 1 passed in at run time (so the compiler cannot fold them), which leaves acc = iters exactly:
// the checksum proves every instruction ran. Beside them, `read`: the memory read bandwidth, several
// streams a worker. Used by cpugen/perf/roofline.py; checked by
// kernels/check_peak.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include "chains.h"  // the AVX-512 chains
#include "packed_amx.h"  // AMX's availability and tile configuration

#include <cstring>
#include <vector>

namespace {

using cpugen_chains::kChains;  // AVX-512 (chains.h)
constexpr int kChainsAvx2 = 12;  // AVX2: 16 ymm registers; more chains would spill to memory

__attribute__((target("avx2,fma"))) double fma_avx2(int64_t iters, float x, float y) {
  __m256 acc[kChainsAvx2];
  const __m256 vx = _mm256_set1_ps(x), vy = _mm256_set1_ps(y);
  for (int c = 0; c < kChainsAvx2; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kChainsAvx2; ++c) acc[c] = _mm256_fmadd_ps(acc[c], vx, vy);
  float out[8];
  double sum = 0;
  for (int c = 0; c < kChainsAvx2; ++c) {
    _mm256_storeu_ps(out, acc[c]);
    for (float v : out) sum += v;
  }
  return sum;
}

// AMX: tdpbf16ps C (16 x 16 fp32) += A (16 x 32 bf16) B (32 x 16 bf16, k pairs side by side),
// 16 x 16 x 32 products and as many sums an instruction. Six accumulator tiles (tmm0-5) take the
// same A (tmm6) and B (tmm7): six independent chains, enough to cover the instruction's latency on
// the one tile unit a core has. A's rows hold x in their first element and zeros elsewhere, B holds
// y everywhere, so each instruction adds x * y to every element of every chain: 256 elements a chain.
constexpr int kChainsAmx = 6;

uint16_t bf16_of(float v) {  // the upper half of v's fp32 bits (exact for the small values used here)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>(u >> 16);
}

__attribute__((target("amx-tile,amx-bf16"))) double dp_amx(int64_t iters, float x, float y) {
  cpugen_amx::TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  cpugen_amx::load_config(cfg);
  alignas(64) uint16_t a[16][32] = {}, b[16][32];
  for (int r = 0; r < 16; ++r) {
    a[r][0] = bf16_of(x);
    for (int c = 0; c < 32; ++c) b[r][c] = bf16_of(y);
  }
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); _tile_zero(4); _tile_zero(5);
  _tile_loadd(6, a, 64);
  _tile_loadd(7, b, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 6, 7); _tile_dpbf16ps(1, 6, 7); _tile_dpbf16ps(2, 6, 7);
    _tile_dpbf16ps(3, 6, 7); _tile_dpbf16ps(4, 6, 7); _tile_dpbf16ps(5, 6, 7);
  }
  alignas(64) float c[kChainsAmx][16][16];
  _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64); _tile_stored(4, c[4], 64); _tile_stored(5, c[5], 64);
  _tile_release();
  double sum = 0;
  for (auto& tile : c)
    for (auto& row : tile)
      for (float v : row) sum += v;
  return sum;
}

// The memory read bandwidth as the hardware gives it: a worker reads its share of the buffer as
// `streams` sequential streams, a cache line of each in turn, adding up its bytes (vpsadbw: one
// instruction a 32-byte load, nothing the loads wait for) so that no load can be dropped; the tail
// that does not fill a line of every stream is added byte by byte. torch's reductions read one
// stream a thread; several keep more lines in flight, as cpugen's kernels read their weights (on 2
// Zen 3 threads 1.15x torch.sum's rate at 4 streams, 1.18x at 8). Returns the sum of the bytes.
__attribute__((target("avx2"))) uint64_t read_avx2(const uint8_t* p, int64_t n, int64_t streams) {
  const int64_t seg = n / streams / 64 * 64;  // bytes of each stream
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc = zero;
  for (int64_t i = 0; i < seg; i += 64)
    for (int64_t s = 0; s < streams; ++s) {
      const uint8_t* q = p + s * seg + i;
      acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), zero));
      acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)), zero));
    }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  uint64_t sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (int64_t i = streams * seg; i < n; ++i) sum += p[i];
  return sum;
}

}  // namespace

// Reads every byte of `buf` once on `threads` workers, each its own contiguous share (cut at 4 KiB
// pages) as `streams` streams; returns the sum of the bytes (the check that all of them were read).
// The caller times the call.
int64_t read_bytes(const torch::Tensor& buf, int64_t streams, int64_t threads) {
  TORCH_CHECK(__builtin_cpu_supports("avx2"), "cpugen peak: this CPU lacks AVX2");
  TORCH_CHECK(buf.is_contiguous() && buf.scalar_type() == at::kByte, "cpugen peak read: a contiguous uint8 tensor");
  TORCH_CHECK(streams >= 1 && threads >= 1, "cpugen peak read: streams and threads must be positive");
  const uint8_t* p = buf.data_ptr<uint8_t>();
  const int64_t n = buf.numel();
  std::vector<uint64_t> sums(threads, 0);
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t c0 = t == 0 ? 0 : n / threads * t / 4096 * 4096;
      const int64_t c1 = t + 1 == threads ? n : n / threads * (t + 1) / 4096 * 4096;
      sums[t] = read_avx2(p + c0, c1 - c0, streams);
    }
  });
  uint64_t total = 0;
  for (uint64_t v : sums) total += v;
  return static_cast<int64_t>(total);
}

// FLOP one instruction of `level` does: 8 lanes x 2 (AVX2 FMA), 16 x 2 (AVX-512 FMA), 16 x 4
// (vdpbf16ps: two products and two sums a lane).
int64_t flop_per_instruction(const std::string& level) {
  if (level == "avx2") return 16;
  if (level == "avx512") return 32;
  if (level == "avx512_bf16") return 64;
  if (level == "amx") return 16 * 16 * 32 * 2;
  TORCH_CHECK(false, "cpugen peak: unknown level ", level);
}

// Runs `iters` rounds of the chains of `level` on each of `threads` workers at once. Returns each
// worker's checksum (iters x lanes x chains when every instruction ran), -1 for a worker that got
// no task. The caller times the call.
std::vector<double> run(const std::string& level, int64_t iters, int64_t threads, double x, double y) {
  TORCH_CHECK(threads >= 1 && iters >= 1, "cpugen peak: threads and iters must be positive");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  TORCH_CHECK(level != "avx2" || avx2, "cpugen peak: this CPU lacks AVX2 and FMA");
  TORCH_CHECK(level != "avx512" || avx512, "cpugen peak: this CPU lacks AVX-512F");
  TORCH_CHECK(level != "avx512_bf16" || bf16, "cpugen peak: this CPU lacks AVX512-BF16");
  TORCH_CHECK(level != "amx" || cpugen_amx::available(),
              "cpugen peak: this CPU lacks AMX-BF16 (or the OS did not grant the tile state)");
  flop_per_instruction(level);  // checks the name
  std::vector<double> sums(threads, -1.0);
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float fx = static_cast<float>(x), fy = static_cast<float>(y);
      sums[t] = level == "avx2"     ? fma_avx2(iters, fx, fy)
                : level == "avx512" ? cpugen_chains::fma_avx512(iters, fx, fy)
                : level == "amx"    ? dp_amx(iters, fx, fy)
                                    : cpugen_chains::dp_bf16(iters, fx, fy);
    }
  });
  return sums;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "register-only chains of one ISA level's instruction on every worker");
  m.def("flop_per_instruction", &flop_per_instruction);
  m.def("read", &read_bytes, "reads a uint8 buffer as `streams` streams a worker; the sum of its bytes", py::arg("buf"),
        py::arg("streams"), py::arg("threads"));
  m.def("chains", [](const std::string& level) {
    return level == "avx2" ? kChainsAvx2 : level == "amx" ? kChainsAmx : kChains;
  });
}

#pragma once
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
// The epilogue (bias, then gelu/relu/silu, vectorized) runs on each task's fp32 sums as soon as
// the task has them, rounded once to bf16 on the way out: the decode MLP's bias and activation
// cost no extra op and no pass over memory.
// Reference: kernels/reference.py; check: kernels/check_gemv.py; benchmark: kernels/bench_gemv.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include "chains.h"
#include "packed_amx.h"
#include "packed_layout.h"
#include "vec_math.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace cpugen_gemv {

using cpugen_vec::activate;
using cpugen_vec::kGelu;
using cpugen_vec::kGeluTanh;
using cpugen_vec::kNone;
using cpugen_vec::kRelu;
using cpugen_vec::kSilu;

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

// Where the blocks leave each output's fp32 sum, (M, N); the epilogue (finish_*) reads them back.
struct Sums {
  float* s;
  int64_t N;
  inline void put(int64_t m, int64_t n, float v) const { s[m * N + n] = v; }
};

// ---- the epilogue, 16 outputs at a time ---------------------------------------------------------
// rows x cols fp32 sums (row stride lds) + bias, activation, rounded to bf16 (nearest even) into
// out (row stride ldo); bias points at the first column's
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void finish_tile(const float* s, int64_t lds,
                                                                             const uint16_t* bias, int64_t act,
                                                                             uint16_t* out, int64_t ldo, int64_t rows,
                                                                             int64_t cols, __m256i (*to_bf16)(__m512)) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t n = 0; n < cols; n += 16) {
      const __mmask16 k = cols - n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (cols - n)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(k, s + m * lds + n);
      if (bias) {
        const __m256i b = _mm256_maskz_loadu_epi16(k, bias + n);
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
      }
      _mm256_mask_storeu_epi16(out + m * ldo + n, k, to_bf16(activate(v, act)));
    }
}

// Outputs n0..n1 of every row of the gemv's sums
inline void finish(const Sums& sums, const uint16_t* bias, int64_t act, uint16_t* out, int64_t M, int64_t n0,
                   int64_t n1, __m256i (*to_bf16)(__m512)) {
  finish_tile(sums.s + n0, sums.N, bias ? bias + n0 : nullptr, act, out + n0, sums.N, M, n1 - n0, to_bf16);
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) __m256i to_bf16_native(__m512 v) {
  return (__m256i)_mm512_cvtneps_pbh(v);
}

__attribute__((target("avx512f,avx512bw"))) __m256i to_bf16_avx512(__m512 v) { return cpugen_vec::round_bf16(v); }

// The rows of the block after [n, n + kRows) to prefetch while this one is read; past the end of
// this thread's range, the current rows again (harmless: already in cache)
inline void next_rows(const uint16_t* w, int64_t n, int64_t n1, int64_t K, const char* next[kRows]) {
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row = n + kRows + r < n1 ? n + kRows + r : std::min(n + r, n1 - 1);
    next[r] = reinterpret_cast<const char*>(w + row * K);
  }
}

// Rows n..n+rows-1 of W (rows <= kRows; a short last block reads its last row again for the
// missing ones and stores nothing for them), against rows m0..m0+MB-1 of x. MB is a compile-time
// constant so that the kRows x MB accumulators live in registers: with a run-time count the
// compiler kept them on the stack, and 4 rows of x ran at 21 GB/s from L2 (compute-bound).
#define CPUGEN_BLOCK_ARGS                                                                             \
  const uint16_t *xm, const uint16_t *w, const Sums &ep, int64_t K, int64_t n, int64_t rows, \
      int64_t m0, const char *const *next, bool prefetch

// ---- AVX512-BF16 -------------------------------------------------------------------------------
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void block_avx512bf16(CPUGEN_BLOCK_ARGS) {
  const int64_t K32 = K / 32 * 32;
  const uint16_t* wr[kRows];
  for (int r = 0; r < kRows; ++r) wr[r] = w + (n + std::min<int64_t>(r, rows - 1)) * K;
  __m512 acc[kRows][MB];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K32; k += 32) {
    if (prefetch)
      for (int r = 0; r < kRows; ++r) _mm_prefetch(next[r] + 2 * k, _MM_HINT_T1);
    __m512i wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = _mm512_loadu_si512(reinterpret_cast<const void*>(wr[r] + k));
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(xm + m * K + k));
      for (int r = 0; r < kRows; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  if (K32 < K) {
    const __mmask32 tail = static_cast<__mmask32>((1ull << (K - K32)) - 1);
    __m512i wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = _mm512_maskz_loadu_epi16(tail, wr[r] + K32);
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(tail, xm + m * K + K32);
      for (int r = 0; r < kRows; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int m = 0; m < MB; ++m) ep.put(m0 + m, n + r, _mm512_reduce_add_ps(acc[r][m]));
}

// ---- AVX-512F ----------------------------------------------------------------------------------
using cpugen_vec::load_bf16x16;

template <int MB>
__attribute__((target("avx512f,avx512bw")))
void block_avx512(CPUGEN_BLOCK_ARGS) {
  const int64_t K16 = K / 16 * 16;
  const uint16_t* wr[kRows];
  for (int r = 0; r < kRows; ++r) wr[r] = w + (n + std::min<int64_t>(r, rows - 1)) * K;
  __m512 acc[kRows][MB];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    if (prefetch && k % 32 == 0)
      for (int r = 0; r < kRows; ++r) _mm_prefetch(next[r] + 2 * k, _MM_HINT_T1);
    __m512 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = load_bf16x16(wr[r] + k);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = load_bf16x16(xm + m * K + k);
      for (int r = 0; r < kRows; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int m = 0; m < MB; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t k = K16; k < K; ++k) s += bf16_to_float(wr[r][k]) * bf16_to_float(xm[m * K + k]);
      ep.put(m0 + m, n + r, s);
    }
}

using BlockFn = void (*)(CPUGEN_BLOCK_ARGS);

// Rows n0..n1 of W against every row of x, kMB rows of x at a time: for M > kMB the same block of
// W is read again from cache (4 rows x K bf16 fit in L2), not from memory.
void rows(const BlockFn* fns, const uint16_t* x, const uint16_t* w, const Sums& ep, int64_t M, int64_t K,
          int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kRows) {
    const char* next[kRows];
    next_rows(w, n, n1, K, next);
    for (int64_t m0 = 0; m0 < M; m0 += kMB)
      fns[std::min(kMB, M - m0) - 1](x + m0 * K, w, ep, K, n, std::min(kRows, n1 - n), m0, next, m0 == 0);
  }
}

// One row of x (batch-1 decode), AVX512-BF16: W's rows n0..n1 read one after the other, a single
// sequential stream, with 4 independent accumulators along k and each line prefetched kAhead bytes
// before it is read. For one row of x this streams 5-7% faster than the 4-row blocks (2 Zen 4
// cores, weights on huge pages, 3 interleaved runs: 33.6 / 31.9 / 34.9 against 31.7 / 29.8 /
// 33.3 GB/s, torch's sum at 32.3 / 30.9 / 33.9); from 2 rows of x on, the blocks win, as each
// W vector then serves several rows.
// In the machine's fast regime (55-65 GB/s read) this stream reads gptj-1b's matrices at about 44
// GB/s where torch's plain sum reads them at 55. What separates them is the load of x beside each
// vector of W: with x's vector held in a register instead (a wrong result, as a measurement), the
// same loop matches the sum; at K = 8192, where x's 16 KB share L1 with the passing W lines, it
// loses most. Sharing each x load between 2-8 rows of W, holding x in registers 512 elements at a
// time over blocks of rows or over slabs of K, prefetching x into L1, or fetching W
// non-temporally were slower in every regime (the first three break W into several streams), and
// dropping the bounds check below was no faster (60 interleaved rounds; docs/performance.md).
// What closes the gap is the packed layout below, where one broadcast pair of x serves 64 rows;
// this plain-layout path remains for CPUs where the weights stay plain (AMX, CPUGEN_LAYOUT=plain).
constexpr int64_t kAhead = 2048;

__attribute__((target("avx512f,avx512bw,avx512bf16")))
void row_stream_bf16(const uint16_t* x, const uint16_t* w, const Sums& ep, int64_t K, int64_t n0, int64_t n1) {
  const char* end = reinterpret_cast<const char*>(w + n1 * K);  // prefetches stay within the task's rows
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
      const char* p = reinterpret_cast<const char*>(r + k) + kAhead;
      if (p + 256 <= end)
        for (int u = 0; u < 4; ++u) _mm_prefetch(p + 64 * u, _MM_HINT_T1);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r + k + 64), (__m512bh)_mm512_loadu_si512(x + k + 64));
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r + k + 96), (__m512bh)_mm512_loadu_si512(x + k + 96));
    }
    for (; k + 32 <= K; k += 32)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
    if (k < K) {
      const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k)) - 1);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + k), (__m512bh)_mm512_maskz_loadu_epi16(tail, x + k));
    }
    ep.put(0, n, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))));
  }
}

const BlockFn kBf16Blocks[kMB] = {block_avx512bf16<1>, block_avx512bf16<2>, block_avx512bf16<3>,
                                  block_avx512bf16<4>};
const BlockFn kAvx512Blocks[kMB] = {block_avx512<1>, block_avx512<2>, block_avx512<3>, block_avx512<4>};

enum class Isa { kAvx512Bf16, kAvx512, kNone };

// What the CPU can run; CPUGEN_ISA=avx512 takes the AVX-512F path on an AVX512-BF16 CPU (to test it)
Isa detect() {
  __builtin_cpu_init();
  const bool base = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl");
  const char* force = std::getenv("CPUGEN_ISA");
  const bool bf16 = __builtin_cpu_supports("avx512bf16") && !(force && std::string(force) == "avx512");
  if (base && bf16) return Isa::kAvx512Bf16;
  if (base) return Isa::kAvx512;
  return Isa::kNone;
}

const Isa kIsa = detect();

// Whether the packed layout is multiplied on AMX tiles (packed_amx.h): where the CPU has AMX-BF16,
// the OS grants the tile state and CPUGEN_ISA is unset, auto or amx (a lower level runs as on a CPU
// without AMX)
bool detect_amx() {
  const char* force = std::getenv("CPUGEN_ISA");
  const std::string f = force ? force : "";
  return kIsa == Isa::kAvx512Bf16 && (f.empty() || f == "auto" || f == "amx") && cpugen_amx::available();
}

const bool kAmx = detect_amx();

// Which multiply-add the packed kernel takes where compute sets its pace (more than kMicroRows rows
// of x) at AVX512-BF16: vdpbf16ps adds a k pair of 16 outputs in one instruction, fp32 FMA in two
// (after a shift and a mask per 16 weights, shared by the rows: panel_micro_f32). AMD's Zen 4 and
// Zen 5 issue vdpbf16ps as often as an FMA (twice the FLOPs); Intel's Xeons one every 2 cycles
// against 2 FMAs a cycle (register-only on 2 Xeon AMX cores: 0.24 against 0.48 TFLOP/s), where the
// FMA kernel multiplies gptj-1b's shapes at 0.27 TFLOP/s from 128 rows against vdpbf16ps' 0.20
// (docs/performance.md). Measured once as the module loads, on the loading thread: the chains of
// chains.h, the same k pairs each way, the best of 5; FMA where vdpbf16ps takes 1.25x its time.
bool detect_fma_ahead() {
  if (kIsa != Isa::kAvx512Bf16) return false;
  const auto best = [](double (*chain)(int64_t, float, float), int64_t iters) {
    double t = 1e30;
    for (int r = 0; r < 6; ++r) {  // the first warms the units up
      const auto t0 = std::chrono::steady_clock::now();
      volatile double sum = chain(iters, 1.0f, 1.0f);
      (void)sum;
      if (r) t = std::min(t, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return t;
  };
  const double dp = best(cpugen_chains::dp_bf16, 1 << 12), fma = best(cpugen_chains::fma_avx512, 1 << 13);
  return dp > 1.25 * fma;
}

const bool kFmaAhead = detect_fma_ahead();

// ---- cpugen's packed layout ---------------------------------------------------------------------
// W (N, K) repacked once into panels of 64 outputs, each holding its outputs' k pairs side by side
// (packed_layout.h, which packs it). This is the pair order vdpbf16ps multiplies, so one broadcast pair of x (4 bytes) serves 64
// outputs (4 vectors of W), and a panel is read front to back: every matrix is one sequential
// stream, whatever the number of rows of x. The plain layout's one-row loop must load a vector
// of x beside each vector of W; in this machine's fast regime (55-65 GB/s read) that loop reads
// gptj-1b's matrices at 44-47 GB/s where a plain sum reads them at 55, and this one at 51-54
// (2 Zen 4 cores, 8 interleaved rounds). The same micro-kernel, 6 rows of x x 64 outputs in 24
// registers, serves prefill: level with oneDNN's prepacked bf16 matmul from 4 rows to 512, ahead
// at 1-2 (docs/performance.md). One layout for every batch, so the weights are never held twice.
// Where packing pays is the caller's choice (cpugen/native.py: AVX512-BF16 without AMX).
using cpugen_packed::kPanel;  // outputs per panel
constexpr int64_t kChunk = 256;  // k pairs per pass over the rows of x (64 KB of a panel: L2)
constexpr int64_t kMicroRows = 6;  // rows of x per micro-kernel call: 6 x 4 accumulators
constexpr int64_t kRowBlock = 240;  // rows of x per pass over a panel (40 micro-kernel calls)

// A panel micro-kernel's frame, shared by both levels: the masks of a panel's 4 vectors of outputs
// (`cols` of its 64 real), its MB x 4 sums loaded from C (zeros unless `more`) and stored back, and
// its prefetch of W `ahead` bytes past the k pair row r (bounded by `end`; none where `ahead` is 0).
__attribute__((target("avx512f"))) inline void panel_masks(int64_t cols, __mmask16 mask[4]) {
  for (int j = 0; j < 4; ++j) {
    const int64_t c = std::max<int64_t>(0, std::min<int64_t>(16, cols - 16 * j));
    mask[j] = static_cast<__mmask16>((1u << c) - 1);
  }
}

template <int MB>
__attribute__((target("avx512f"))) inline void load_sums(__m512 acc[][4], const float* C, int64_t ldc,
                                                         const __mmask16 mask[4], bool more) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j)
      acc[m][j] = more ? _mm512_maskz_loadu_ps(mask[j], C + m * ldc + 16 * j) : _mm512_setzero_ps();
}

template <int MB>
__attribute__((target("avx512f"))) inline void store_sums(__m512 acc[][4], float* C, int64_t ldc,
                                                          const __mmask16 mask[4]) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(C + m * ldc + 16 * j, mask[j], acc[m][j]);
}

// Where a micro-kernel call ends its panel's last chunk, it finishes its rows itself, as
// finish_tile would from a tile: bias, activation and bf16 rounding from its registers straight into
// the output, whose lines it fetched as it started (prefetch_out). At 32 rows (2 Zen 5 cores,
// medians of 6 in one process, alternating order and buffers): 0.85 -> 0.88 TFLOP/s on a 16384 x
// 2048 weight against finishing each panel from the tile, 0.81 -> 0.83 on gptj-1b's lm_head
// (50400 x 2048); the loop writing no output at all ran at 0.90.
struct Finish {
  uint16_t* out;  // the call's first row at the panel's first output
  int64_t ldo;
  const uint16_t* bias;  // the panel's, or null
  int64_t act;
};

// The lines of the outputs a finishing call writes, fetched as it starts (always_inline: see
// prefetch_row); prefetches past the end of the output are harmless (they never fault)
template <int MB>
__attribute__((always_inline)) inline void prefetch_out(const Finish* f) {
  if (f)
    for (int m = 0; m < MB; ++m)
      for (int c = 0; c < kPanel; c += 32) _mm_prefetch(reinterpret_cast<const char*>(f->out + m * f->ldo + c), _MM_HINT_T0);
}

template <int MB, __m256i (*to_bf16)(__m512)>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void finish_sums(__m512 acc[][4], const __mmask16 mask[4],
                                                                            const Finish& f) {
  for (int j = 0; j < 4; ++j) {
    const __m512 b = f.bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                  _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask[j], f.bias + 16 * j)), 16))
                            : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) {
      const __m512 v = f.bias ? _mm512_add_ps(acc[m][j], b) : acc[m][j];
      _mm256_mask_storeu_epi16(f.out + m * f.ldo + 16 * j, mask[j], to_bf16(activate(v, f.act)));
    }
  }
}

// A micro-kernel call's prefetch of W, `ahead` bytes past each k pair row it reads (none where 0):
// lines first, first + step, ... of the 4 there, into L2 (T1)
struct Prefetch {
  int64_t ahead;
  int first, step;
};

// always_inline: as a plain inline function, GCC 12 found it free of side effects (a prefetch
// changes no memory) and removed its calls before it could inline them into the micro-kernels'
// AVX-512 targets, so the kernels ran without any prefetch (no prefetch in their disassembly)
// The hint: T1. Non-temporal hints, which this kernel took before, leave a line for the first
// group of rows only on Intel's cores, so that every later group read the chunk from memory again
// (T1 there: 0.09-0.10 -> 0.19-0.22 TFLOP/s at 16 rows, 0.13 -> 0.21-0.25 at 32, 0.19-0.23 ->
// 0.22-0.30 at 128; 2 Xeon AMX cores, gptj-1b's shapes, both AVX-512 levels, medians of 5 in one
// process; T0 3-6% behind T1); on Zen 4 they cost 16-32 rows the same way, less (T1: 1.26-1.39x
// at 16 rows, 1.07-1.12x at 24-32, 0.99-1.03x at 8 and 64-512 at AVX512-BF16; 1.00-1.04x at
// 16-128 rows at AVX-512 F, bound by its FMAs there; 2 Zen 4 cores, gptj-1b's shapes x 2 on one
// shared set of packed weights, both builds in one process, shuffled rounds, medians of 9-11, the
// sums bit for bit the same); on Zen 5 the hints ran alike (docs/performance.md).
__attribute__((always_inline)) inline void prefetch_row(const uint16_t* r, const Prefetch& f, const char* end) {
  if (!f.ahead) return;
  const char* p = reinterpret_cast<const char*>(r) + f.ahead;
  if (p + 256 <= end)
    for (int l = f.first; l < 4; l += f.step) _mm_prefetch(p + 64 * l, _MM_HINT_T1);
}

// Whether one pass (up to kMicroRows rows) prefetches too: on Intel, where the hardware's
// prefetchers alone left its single stream short (linear_packed_raw); on Zen 4 the same 8 KB-ahead
// prefetch read 0.83-1.02x at 1-4 rows (the harness above), and on Zen 5 a 2 KB-ahead one 5-10%
// slower
const bool kOnePassPrefetch = [] {
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
}();

// Rows m0.. (MB of them) of x against k pairs [c0, c1) of one panel, into C's fp32 sums (row
// stride ldc; `cols` of the panel's 64 are real, the rest padding). Accumulates onto C when
// `more`; prefetches W as `ahead` says (bounded by `end`); where `fin` is given, finishes the rows
// into the output instead of storing the sums.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void panel_micro(const void* xv, int64_t K, const uint16_t* panel, float* C, int64_t ldc, int64_t cols, int64_t c0,
                 int64_t c1, bool more, const char* end, Prefetch ahead, const Finish* fin) {
  // One k pair at a time, even for one row: two pairs in flight (8 sums, 8 lines prefetched a
  // step) read gptj-1b's matrices at 87% of the fast regime's read against 91% for this loop
  // (10 rounds at 55-60 GB/s; 97% and 99% in the usual regime; torch's sum 92% and 97%).
  __mmask16 mask[4];
  panel_masks(cols, mask);
  __m512 acc[MB][4];
  load_sums<MB>(acc, C, ldc, mask, more);
  prefetch_out<MB>(fin);
  const int32_t* x2 = static_cast<const int32_t*>(xv);  // x's k pairs (bf16 rows, K apart)
  const int64_t K2 = K / 2;
  for (int64_t k2 = c0; k2 < c1; ++k2) {
    const uint16_t* r = panel + k2 * 2 * kPanel;
    prefetch_row(r, ahead, end);
    __m512i wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_si512(r + 32 * j);
    for (int m = 0; m < MB; ++m) {
      const __m512i xb = _mm512_set1_epi32(x2[m * K2 + k2]);
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)wv[j], (__m512bh)xb);
    }
  }
  if (fin)
    finish_sums<MB, to_bf16_native>(acc, mask, *fin);
  else
    store_sums<MB>(acc, C, ldc, mask);
}

// panel_micro at AVX-512 F/BW without BF16 (Skylake-SP to Ice Lake): a 512-bit load of a panel's
// k pair row is 16 outputs' pairs; a 16-bit shift gives their weights at the even k as fp32, a mask
// those at the odd k (as packed_avx2.h does at 8 lanes), and x is widened to fp32
// once a call (widen_rows) and broadcast from memory by the FMAs themselves (level at 1-32 rows, 5-6%
// faster at 128-512 on 2 Xeon cores, the sums bit for bit the same as widening each broadcast pair
// in registers). Two FMAs where vdpbf16ps takes one instruction, with fp32 products and sums
// (closer to the reference than vdpbf16ps, not bit-equal to it).
template <int MB>
__attribute__((target("avx512f,avx512bw")))
void panel_micro_f32(const void* xv, int64_t K, const uint16_t* panel, float* C, int64_t ldc, int64_t cols,
                     int64_t c0, int64_t c1, bool more, const char* end, Prefetch ahead, const Finish* fin) {
  __mmask16 mask[4];
  panel_masks(cols, mask);
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[MB][4];
  load_sums<MB>(acc, C, ldc, mask, more);
  prefetch_out<MB>(fin);
  const float* x = static_cast<const float*>(xv);  // the rows widened to fp32 (widen_rows), K apart
  for (int64_t k2 = c0; k2 < c1; ++k2) {
    const uint16_t* r = panel + k2 * 2 * kPanel;
    prefetch_row(r, ahead, end);
    __m512 we[4], wo[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(r + 32 * j);
      we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, odd));
    }
    for (int m = 0; m < MB; ++m) {  // x's pair broadcast from memory by the FMAs themselves
      const __m512 xe = _mm512_set1_ps(x[m * K + 2 * k2]), xo = _mm512_set1_ps(x[m * K + 2 * k2 + 1]);
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_fmadd_ps(xo, wo[j], _mm512_fmadd_ps(xe, we[j], acc[m][j]));
    }
  }
  if (fin)
    finish_sums<MB, to_bf16_avx512>(acc, mask, *fin);
  else
    store_sums<MB>(acc, C, ldc, mask);
}

// panel_micro_f32 for prefill's many rows (kWideRows and more), in assembly: 12 rows x half a panel
// (32 outputs) a pass, twice a call. Its 24 sums, the 4 widened weights of a k pair row's half
// (even k: shift; odd k: mask) and x's broadcast pair take 30 of the 32 registers, which the
// compiler does not allocate so: its 6 x 64 loop above keeps 8 widened weights live beside 24 sums,
// spills 3 sums a k pair and widens once per 6 rows where this widens once per 12. The same sums in
// the same order as panel_micro_f32 (bit for bit); on 2 Xeon AMX cores, gptj-1b's shapes, shuffled
// rounds, medians of 5-7: 1.07-1.09x at 64-1024 rows at avx512, 1.05-1.08x at 128-512 at
// avx512_bf16, but 0.92-0.98x at 16-32 rows (half-panel passes stride through W where fewer rows
// leave memory the pace), so it serves from kWideRows rows. zmm0-23: sums (row m: 2m, 2m + 1); zmm24/25: even
// weights, zmm26/27: odd weights; zmm28/29: x's pair; zmm30: the odd mask.
constexpr int64_t kWideRows = 64;

#define CPUGEN_SUMS_IN(m, a, b) "vmovups " #m "*256(%[C]), %%zmm" #a "\n\tvmovups " #m "*256+64(%[C]), %%zmm" #b "\n\t"
#define CPUGEN_SUMS_OUT(m, a, b) "vmovups %%zmm" #a ", " #m "*256(%[C])\n\tvmovups %%zmm" #b ", " #m "*256+64(%[C])\n\t"
#define CPUGEN_ROW12(x, a, b)                                                                             \
  "vbroadcastss " x ", %%zmm28\n\tvbroadcastss 4" x ", %%zmm29\n\t"                                     \
  "vfmadd231ps %%zmm24, %%zmm28, %%zmm" #a "\n\tvfmadd231ps %%zmm25, %%zmm28, %%zmm" #b "\n\t"          \
  "vfmadd231ps %%zmm26, %%zmm29, %%zmm" #a "\n\tvfmadd231ps %%zmm27, %%zmm29, %%zmm" #b "\n\t"
#define CPUGEN_ROWS12(M)                                                                                  \
  M(0, 0, 1) M(1, 2, 3) M(2, 4, 5) M(3, 6, 7) M(4, 8, 9) M(5, 10, 11) M(6, 12, 13) M(7, 14, 15) M(8, 16, 17) \
  M(9, 18, 19) M(10, 20, 21) M(11, 22, 23)

// Rows x0.. (12, s bytes apart, fp32) against n k pair rows of half a panel from r (256 bytes apart),
// into C's sums (64 floats a row: the tile), onto them where `more`; one line prefetched (T1) a k
// pair row at pf, which moves with r
__attribute__((target("avx512f,avx512bw"), noinline)) void half_micro12(const float* x0, int64_t s, const uint16_t* r,
                                                                        int64_t n, float* C, int64_t more,
                                                                        const char* pf) {
  static const uint32_t kOdd = 0xFFFF0000u;
  const char* b = reinterpret_cast<const char*>(x0);
  const char *x3 = b + 3 * s, *x6 = b + 6 * s, *x9 = b + 9 * s;
  asm volatile(
      "test %[more], %[more]\n\t"
      "jz 2f\n\t" CPUGEN_ROWS12(CPUGEN_SUMS_IN) "jmp 3f\n\t"
      "2:\n\t"
      "vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpxord %%zmm1, %%zmm1, %%zmm1\n\tvpxord %%zmm2, %%zmm2, %%zmm2\n\t"
      "vpxord %%zmm3, %%zmm3, %%zmm3\n\tvpxord %%zmm4, %%zmm4, %%zmm4\n\tvpxord %%zmm5, %%zmm5, %%zmm5\n\t"
      "vpxord %%zmm6, %%zmm6, %%zmm6\n\tvpxord %%zmm7, %%zmm7, %%zmm7\n\tvpxord %%zmm8, %%zmm8, %%zmm8\n\t"
      "vpxord %%zmm9, %%zmm9, %%zmm9\n\tvpxord %%zmm10, %%zmm10, %%zmm10\n\tvpxord %%zmm11, %%zmm11, %%zmm11\n\t"
      "vpxord %%zmm12, %%zmm12, %%zmm12\n\tvpxord %%zmm13, %%zmm13, %%zmm13\n\tvpxord %%zmm14, %%zmm14, %%zmm14\n\t"
      "vpxord %%zmm15, %%zmm15, %%zmm15\n\tvpxord %%zmm16, %%zmm16, %%zmm16\n\tvpxord %%zmm17, %%zmm17, %%zmm17\n\t"
      "vpxord %%zmm18, %%zmm18, %%zmm18\n\tvpxord %%zmm19, %%zmm19, %%zmm19\n\tvpxord %%zmm20, %%zmm20, %%zmm20\n\t"
      "vpxord %%zmm21, %%zmm21, %%zmm21\n\tvpxord %%zmm22, %%zmm22, %%zmm22\n\tvpxord %%zmm23, %%zmm23, %%zmm23\n\t"
      "3:\n\t"
      "vpbroadcastd (%[odd]), %%zmm30\n\t"
      ".p2align 5\n\t"
      "1:\n\t"
      "vpslld $16, (%[r]), %%zmm24\n\t"
      "vpslld $16, 64(%[r]), %%zmm25\n\t"
      "vpandd (%[r]), %%zmm30, %%zmm26\n\t"
      "vpandd 64(%[r]), %%zmm30, %%zmm27\n\t"
      "prefetcht1 (%[pf])\n\t"
      CPUGEN_ROW12("(%[x0])", 0, 1) CPUGEN_ROW12("(%[x0],%[s],1)", 2, 3) CPUGEN_ROW12("(%[x0],%[s],2)", 4, 5)
      CPUGEN_ROW12("(%[x3])", 6, 7) CPUGEN_ROW12("(%[x3],%[s],1)", 8, 9) CPUGEN_ROW12("(%[x3],%[s],2)", 10, 11)
      CPUGEN_ROW12("(%[x6])", 12, 13) CPUGEN_ROW12("(%[x6],%[s],1)", 14, 15) CPUGEN_ROW12("(%[x6],%[s],2)", 16, 17)
      CPUGEN_ROW12("(%[x9])", 18, 19) CPUGEN_ROW12("(%[x9],%[s],1)", 20, 21) CPUGEN_ROW12("(%[x9],%[s],2)", 22, 23)
      "add $256, %[r]\n\t"
      "add $256, %[pf]\n\t"
      "add $8, %[x0]\n\tadd $8, %[x3]\n\tadd $8, %[x6]\n\tadd $8, %[x9]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t" CPUGEN_ROWS12(CPUGEN_SUMS_OUT)
      : [x0] "+r"(x0), [x3] "+r"(x3), [x6] "+r"(x6), [x9] "+r"(x9), [r] "+r"(r), [n] "+r"(n), [pf] "+r"(pf)
      : [s] "r"(s), [C] "r"(C), [more] "r"(more), [odd] "r"(&kOdd)
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
        "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
}

#undef CPUGEN_SUMS_IN
#undef CPUGEN_SUMS_OUT
#undef CPUGEN_ROW12
#undef CPUGEN_ROWS12

// 12 rows x (the fp32 rows widen_rows gives) against k pairs [c0, c1) of one panel, as
// panel_micro_f32<12> would: half_micro12 on each half, the sums through C (the tile, 64 floats a
// row: only above kMicroRows rows), finished from there where `fin` is given. Of the lines
// `ahead` names, the first half prefetches the first and the second the next.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void panel_micro12_f32(const void* xv, int64_t K,
                                                                             const uint16_t* panel, float* C,
                                                                             int64_t ldc, int64_t cols, int64_t c0,
                                                                             int64_t c1, bool more, const char* end,
                                                                             Prefetch ahead, const Finish* fin) {
  const uint16_t* r = panel + c0 * 2 * kPanel;
  const char* pf[2] = {reinterpret_cast<const char*>(r), reinterpret_cast<const char*>(r)};  // an L1 line: none
  if (ahead.ahead && reinterpret_cast<const char*>(panel + c1 * 2 * kPanel) + ahead.ahead <= end) {
    pf[0] += ahead.ahead + 64 * ahead.first;
    pf[1] = ahead.first + ahead.step < 4 ? pf[0] + 64 * ahead.step : pf[0];
  }
  for (int h = 0; h < 2; ++h)
    half_micro12(static_cast<const float*>(xv) + 2 * c0, K * 4, r + 64 * h, c1 - c0, C + 32 * h, more, pf[h]);
  if (fin) {
    __mmask16 mask[4];
    panel_masks(cols, mask);
    __m512 acc[12][4];
    load_sums<12>(acc, C, ldc, mask, true);
    finish_sums<12, to_bf16_avx512>(acc, mask, *fin);
  }
}

// Values [i0, i1) of x (bf16) widened to fp32 into out, for panel_micro_f32 (once a call: widen_rows)
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void widen_range(const uint16_t* x, int64_t i0, int64_t i1,
                                                                             float* out) {
  for (int64_t i = i0; i < i1; i += 16) {
    const int64_t left = std::min<int64_t>(16, i1 - i);
    const __mmask16 k = static_cast<__mmask16>((1u << left) - 1);
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, x + i));
    _mm512_mask_storeu_ps(out + i, k, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
}

inline void widen_rows(const uint16_t* x, int64_t n, float* out) {
  at::parallel_for(0, (n + 15) / 16, 4096, [&](int64_t b0, int64_t b1) { widen_range(x, 16 * b0, std::min(n, 16 * b1), out); });
}

using PanelFn = void (*)(const void*, int64_t, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t, bool,
                         const char*, Prefetch, const Finish*);
const PanelFn kPanelMicros[kMicroRows] = {panel_micro<1>, panel_micro<2>, panel_micro<3>,
                                          panel_micro<4>, panel_micro<5>, panel_micro<6>};
const PanelFn kPanelMicrosF32[kMicroRows] = {panel_micro_f32<1>, panel_micro_f32<2>, panel_micro_f32<3>,
                                             panel_micro_f32<4>, panel_micro_f32<5>, panel_micro_f32<6>};

}  // namespace

std::string isa() {
  switch (kIsa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    default: return "none";
  }
}

// The gemv on raw pointers, checked by the caller: x (M, K), w (N, K), bias (N) or null, out
// (M, N), all bf16 and contiguous; sums: M x N floats of scratch
inline void gemv_raw(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* wp, int64_t N, const uint16_t* bp,
                     int64_t act, uint16_t* op, float* sums) {
  const Sums ep{sums, N};
  const bool bf16 = kIsa == Isa::kAvx512Bf16;
  // grain: at least 64 rows (a few hundred KB of W) per task; each task finishes its own outputs
  at::parallel_for(0, (N + kRows - 1) / kRows, 16, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kRows, n1 = std::min(N, b1 * kRows);
    if (bf16 && M == 1)
      row_stream_bf16(xp, wp, ep, K, n0, n1);
    else
      rows(bf16 ? kBf16Blocks : kAvx512Blocks, xp, wp, ep, M, K, n0, n1);
    finish(ep, bp, act, op, M, n0, n1, bf16 ? to_bf16_native : to_bf16_avx512);
  });
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
  auto sums = torch::empty({M, N}, x.options().dtype(at::kFloat));
  gemv_raw(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, reinterpret_cast<const uint16_t*>(wc.data_ptr()), N,
           bc.defined() ? reinterpret_cast<const uint16_t*>(bc.data_ptr()) : nullptr, act,
           reinterpret_cast<uint16_t*>(out.data_ptr()), sums.data_ptr<float>());
  return out;
}

bool packed_available() { return kIsa != Isa::kNone; }

// What linear_packed multiplies with: "amx" (tiles, where K is a multiple of 32), else isa()'s
std::string packed_isa() { return kAmx ? "amx" : isa(); }

// The instruction linear_packed multiplies with above kMicroRows rows (off the tiles): "vdpbf16ps",
// or "fma" (AVX-512 F, or AVX512-BF16 where vdpbf16ps is behind it: kFmaAhead); "" without AVX-512
std::string packed_multiply() {
  return kIsa == Isa::kNone ? "" : kIsa == Isa::kAvx512Bf16 && !kFmaAhead ? "vdpbf16ps" : "fma";
}

// The packed kernel on raw pointers, checked by the caller: x (M, K), p packed from an (n, K)
// weight, bias (n) or null, out (M, n), all bf16 and contiguous
inline void linear_packed_raw(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* pp, int64_t n,
                              const uint16_t* bp, int64_t act, uint16_t* op) {
  if (M == 0) return;
  if (kAmx && K % 32 == 0) {  // AMX tiles at every row count (packed_amx.h), the epilogue finish_tile's
    std::vector<uint16_t> tiles((M + 15) / 16 * 16 * K);
    cpugen_amx::linear_raw(xp, M, K, pp, n, bp, act, op, tiles.data(),
                           [](const float* s, int64_t lds, const uint16_t* b, int64_t a, uint16_t* o, int64_t ldo,
                              int64_t rows, int64_t cols) { finish_tile(s, lds, b, a, o, ldo, rows, cols, to_bf16_native); });
    return;
  }
  const int64_t K2 = K / 2, np = (n + kPanel - 1) / kPanel;
  // Up to kMicroRows rows: one pass over all of K per panel, the sums in registers. More rows: a
  // block of up to kRowBlock rows at a time against each panel, K in chunks so that the chunk of
  // W (64 KB) and the block's rows of x (kRowBlock KB) stay in L2 while the micro-kernel walks
  // the block; the sums wait in a tile the size of the block between chunks, and the last
  // chunk's calls finish their rows (bias, activation, bf16) into the output. Where groups take
  // turns on a chunk, each of the first four prefetches one line of each k pair row of the next
  // chunk (T1), so that memory streams all through the chunk's compute; one
  // pass prefetches nothing (the hardware's prefetchers follow its single stream). Measured on 2
  // Zen 5 cores, gptj-1b's four matrix shapes x 6 layers (0.6 GB) each once a pass as decode
  // reads them, kernels in one process in shuffled order, medians of 5: against the kernel
  // without any prefetch (as built before prefetch_row was always_inline), 16 rows 0.60 -> 0.68
  // TFLOP/s, 32 rows 0.73 -> 0.82, 128 rows level (0.91-0.93); one pass prefetching 2 KB ahead
  // (T1) read 5-10% slower at 1 and 4 rows (74 against 80-85 GB/s). The first group alone
  // fetching the next chunk ran as no prefetch did (0.72 at 32 rows on a 64 MiB weight).
  const int64_t chunk = M <= kMicroRows ? K2 : kChunk;
  // On Intel one pass prefetches too, each k pair row 8 KB ahead (T1): the hardware's prefetchers
  // alone left the single stream at 21-24 GB/s where the gemv's four read 30; with it 29-30 at 1
  // row, 1.4x at 4-6 rows (2 Xeon AMX cores, both AVX-512 levels; 4 and 16 KB ahead alike)
  const int64_t ahead = M <= kMicroRows ? (kOnePassPrefetch ? 8192 : 0) : chunk * 2 * kPanel * 2;
  // vdpbf16ps at AVX512-BF16 (above kMicroRows rows where it is not behind FMA: kFmaAhead), else
  // AVX-512 F/BW: panel_micro_f32, on x widened once
  const bool bf16 = kIsa == Isa::kAvx512Bf16 && !(kFmaAhead && M > kMicroRows);
  const PanelFn* micros = bf16 ? kPanelMicros : kPanelMicrosF32;
  std::vector<float> xw(bf16 ? 0 : M * K);
  if (!bf16) widen_rows(xp, M * K, xw.data());
  const auto row = [&](int64_t m) -> const void* { return bf16 ? static_cast<const void*>(xp + m * K) : xw.data() + m * K; };
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    const char* end = reinterpret_cast<const char*>(pp + p1 * K * kPanel);
    // the sums between chunks (up to kMicroRows rows, one chunk: none, the call finishes them)
    std::vector<float> sums(M > kMicroRows ? std::min(M, kRowBlock) * kPanel : 0);
    float* tile = sums.data();
    for (int64_t m1 = 0; m1 < M; m1 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, M - m1);
      const int64_t wide = !bf16 && M >= kWideRows ? rows / 12 : 0;  // 12-row calls first (panel_micro12_f32)
      const int groups = static_cast<int>(wide + (rows - 12 * wide + kMicroRows - 1) / kMicroRows);
      for (int64_t q = p0; q < p1; ++q) {
        const uint16_t* panel = pp + q * K * kPanel;
        const int64_t cols = std::min(kPanel, n - q * kPanel);
        for (int64_t c0 = 0; c0 < K2; c0 += chunk) {
          const bool last = c0 + chunk >= K2;
          for (int64_t m0 = 0, g = 0; m0 < rows; ++g) {
            const Finish fin{op + (m1 + m0) * n + q * kPanel, n, bp ? bp + q * kPanel : nullptr, act};
            const int64_t mb = g < wide ? 12 : std::min(kMicroRows, rows - m0);
            (mb == 12 ? panel_micro12_f32 : micros[mb - 1])(
                row(m1 + m0), K, panel, tile + m0 * kPanel, kPanel, cols, c0, std::min(K2, c0 + chunk), c0 > 0,
                end, Prefetch{g < 4 ? ahead : 0, static_cast<int>(g), groups},
                last ? &fin : nullptr);
            m0 += mb;
          }
        }
      }
    }
  });
}

// x (M, K) bf16 (any M), p: pack_into's form of an (n, K) weight, bias (n,) or none, act ->
// act(x W^T + bias) (M, n) bf16
torch::Tensor linear_packed(const torch::Tensor& x, const torch::Tensor& p, int64_t n,
                            const c10::optional<torch::Tensor>& bias, int64_t act) {
  TORCH_CHECK(packed_available(), "cpugen linear_packed: this CPU has no AVX-512");
  return cpugen_packed::linear_packed_with(linear_packed_raw, x, p, n, bias, act);
}

}  // namespace cpugen_gemv

#pragma once
// cpugen's packed layout (gemv_bf16.h: panels of 64 outputs, each holding its outputs' k pairs side
// by side) multiplied at the AVX2 level (AVX2 + FMA, no AVX-512): y (M, n) = act(x (M, K) W^T + b)
// for any number of rows of x, bf16 in and out, fp32 accumulation. A 256-bit load of a panel's
// k pair row is 8 outputs' pairs: a 16-bit shift gives their weights at the even k as fp32, a
// mask those at the odd k, each multiplied with FMA by one of x's values broadcast (x widened to
// fp32 once per block of rows). The micro-kernel holds 6 rows of x x 16 outputs in 12
// registers: 24 FMAs a k pair for 2 loads and 2 shifts and 2 masks of W and 12 broadcasts of x, an
// outer product as fp32 BLAS kernels run it, where the gemv (a dot product along k, one row of W
// against its own vector of x) loads a vector of x beside every few FMAs.
// Reference: kernels/reference.py's gemv on the unpacked weight; check: kernels/check_gemv.py
// (check_packed); bound in kernels/avx2.cpp, run by the decode stack (decode_layer.cpp) at the AVX2
// level.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "gemv_avx2.h"
#include "packed_layout.h"
#include "vec_avx2.h"

namespace cpugen_packed_avx2 {

using cpugen_packed::kPanel;  // outputs per panel
constexpr int64_t kChunk = 256;  // k pairs per pass over the rows of x: 64 KiB of a panel, kept in L2
// the most rows of x per micro-kernel call: 6 x 2 accumulators of 8 lanes, the 6-row loop in
// assembly (micro). On Zen 3 (4-cycle FMAs, two a cycle) 12 independent sums keep both FMA pipes
// busy where 10 do not. (In intrinsics GCC kept 4 of the 12 sums on the stack and ran gptj-1b's
// matrices at 52-60% of the FMA limit against 59-77% for 5 rows: 32 and 2048 rows of x, 2 Zen 3
// threads, 5 interleaved rounds of a throwaway harness that built both.)
constexpr int64_t kMicroRows = 6;
constexpr int64_t kRowBlock = 240;  // rows of x per pass over a panel (x widened per block)
constexpr int64_t kShare = 4;  // the most groups of rows whose calls prefetch the next chunk (micro)
// floats between widened rows of x past K: at K a multiple of 1024 the rows' lines would fall in
// the same sets of the L1 (4 KiB apart), a group's 6 rows and W's lines more than its 8 ways
constexpr int64_t kPad = 16;
// rows of x above which linear_plain (this kernel on plain weights, packed as it goes) runs ahead of
// the AVX2 gemv: gptj-1b's matrices, 2 Zen 3 threads, `python kernels/bench_gemv.py --tflops --rows
// 16,32,... --repeat 5 --layers 1`, then `--rows 16,20,24,32,...`: 0.83-1.01x the gemv at 16 rows,
// 1.09x at 20, 1.06x at 24, 1.11-1.13x at 32 (docs/performance.md)
constexpr int64_t kPlainAbove = 16;
constexpr int64_t kScratchBytes = 8 << 20;  // the most a block of widened x takes: wide models get fewer rows a block

namespace {

// Rows [0, MB) of x (fp32, row stride ldx, from the chunk's first k pair on) against `pairs` k
// pairs of a chunk of a panel (r: its first pair row, 128 bf16 a row), outputs [16 q, 16 q + 16),
// into C's fp32 sums (row stride ldc, column 16 q on); onto C's sums when `more`. The panel's k
// pair row is 256 bytes; this reads 64 of them (one cache line) per pair. `pre`, where not null,
// is the first line to prefetch (T1, up to `end`), at the k pairs whose k2 mod 4 `mine` names, the
// address moving kStep bytes a pair: one line every 64 / kStep pairs, in address order. Packed
// weights: each call of the first 1, 2 or 4 groups of rows fetches its own sequential region of the
// next chunk (a quarter, an eighth or a sixteenth of it: kStep 64, 32 or 16), so that together they
// fetch the whole next chunk while the chunk in L2 is multiplied, memory streaming through all of
// their calls rather than in a burst in the first group's (linear_raw). Plain weights (kStep 16): a
// row's segment of the next plain chunk. (A version before had each quarter fetch its own line of
// every pair row, 256 bytes apart: the sequential regions read gptj-1b's matrices 1.55x faster at
// 2 and 4 rows of x, 1.33x at 8, 1.05-1.08x at 16 and 32, on 2 Zen 3 threads, the median ratio of
// 12-16 shuffled rounds in one process: level with the AVX2 gemv at 2 rows, ahead of it from 4
// (docs/performance.md). The first version, one quarter
// fetching all of it in a burst and one row of x taken a quarter at a time too, read gptj-1b's
// matrices at 54-58% of the bandwidth at one row; with the first group fetching the whole chunk and
// a one-row kernel, 89% (one row now reads a packed panel as micro_row's streams, without
// prefetch): 2 Zen 3 threads, 5 interleaved rounds of a throwaway harness. Spread over four
// groups against the first group alone, on gptj-1b's four matrix shapes x 2 layers, 2 Zen 3
// threads, the ratio of each round's two TFLOP/s, median (quartiles) of 150 shuffled rounds: 1.09x
// (1.00-1.14) at 32 rows of x, of 40: 1.22x (1.10-1.28) at 16 rows, 1.04x (0.98-1.08) at 128; the
// T1 and NTA hints alike. kernels/bench_gemv.py measures the result.)
alignas(32) constexpr uint32_t kOddMask[8] = {0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u,
                                              0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u};

// One k pair of 6 rows x 16 outputs, the sums in 12 registers (c0, c1: row 0's 16 outputs, ...): W's
// two vectors widened (even k, then odd k) into ymm12-13, x's values broadcast into ymm14-15 in
// turn. In assembly because GCC 12, given these 16 live registers in intrinsics, stored every sum to
// the stack each k pair. xa: rows 0-2 (ld bytes apart), xb: rows 3-5.
#define CPUGEN_PAIR6_ROWS(off, a, b)                                                              \
  "vbroadcastss " off "(%[xa]), %%ymm14\n\t"                                                     \
  "vfmadd231ps %%ymm" a ", %%ymm14, %[c0]\n\tvfmadd231ps %%ymm" b ", %%ymm14, %[c1]\n\t"         \
  "vbroadcastss " off "(%[xa],%[ld]), %%ymm15\n\t"                                               \
  "vfmadd231ps %%ymm" a ", %%ymm15, %[c2]\n\tvfmadd231ps %%ymm" b ", %%ymm15, %[c3]\n\t"         \
  "vbroadcastss " off "(%[xa],%[ld],2), %%ymm14\n\t"                                             \
  "vfmadd231ps %%ymm" a ", %%ymm14, %[c4]\n\tvfmadd231ps %%ymm" b ", %%ymm14, %[c5]\n\t"         \
  "vbroadcastss " off "(%[xb]), %%ymm15\n\t"                                                     \
  "vfmadd231ps %%ymm" a ", %%ymm15, %[c6]\n\tvfmadd231ps %%ymm" b ", %%ymm15, %[c7]\n\t"         \
  "vbroadcastss " off "(%[xb],%[ld]), %%ymm14\n\t"                                               \
  "vfmadd231ps %%ymm" a ", %%ymm14, %[c8]\n\tvfmadd231ps %%ymm" b ", %%ymm14, %[c9]\n\t"         \
  "vbroadcastss " off "(%[xb],%[ld],2), %%ymm15\n\t"                                             \
  "vfmadd231ps %%ymm" a ", %%ymm15, %[c10]\n\tvfmadd231ps %%ymm" b ", %%ymm15, %[c11]\n\t"

template <int MB, int64_t kStep>
CPUGEN_AVX2 void micro(const float* x, int64_t ldx, const uint16_t* r, int64_t pairs, int q, float* C, int64_t ldc,
                       bool more, const char* pre, const char* end, unsigned mine) {
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 2; ++j)
      acc[m][j] = more ? _mm256_loadu_ps(C + m * ldc + 16 * q + 8 * j) : _mm256_setzero_ps();
  r += 32 * q;
  const float* xk = x;
  // `mine` (none without `pre`) as one bit per k2 mod 4, so that the loop carries no more state
  // than one pointer (with more, GCC spilled sums to the stack)
  const char* p = pre;
  if (!pre) mine = 0;
  if constexpr (MB == 6) {
    const float* xb = x + 3 * ldx;
    const int64_t ld = ldx * static_cast<int64_t>(sizeof(float));
    // the sums as 12 values of their own: an array stays in memory across the assembly
    __m256 c0 = acc[0][0], c1 = acc[0][1], c2 = acc[1][0], c3 = acc[1][1], c4 = acc[2][0], c5 = acc[2][1];
    __m256 c6 = acc[3][0], c7 = acc[3][1], c8 = acc[4][0], c9 = acc[4][1], c10 = acc[5][0], c11 = acc[5][1];
    for (int64_t k2 = 0; k2 < pairs; ++k2, r += 2 * kPanel, xk += 2, xb += 2, p += kStep) {
      if ((mine >> (k2 & 3)) & 1 && p + 64 <= end) _mm_prefetch(p, _MM_HINT_T1);
      asm("vmovdqu (%[r]), %%ymm12\n\tvmovdqu 32(%[r]), %%ymm13\n\t"
          "vpslld $16, %%ymm12, %%ymm12\n\tvpslld $16, %%ymm13, %%ymm13\n\t"
          CPUGEN_PAIR6_ROWS("", "12", "13")
          "vmovdqa (%[mask]), %%ymm12\n\tvpand (%[r]), %%ymm12, %%ymm12\n\t"
          "vmovdqa (%[mask]), %%ymm13\n\tvpand 32(%[r]), %%ymm13, %%ymm13\n\t"
          CPUGEN_PAIR6_ROWS("4", "12", "13")
          : [c0] "+x"(c0), [c1] "+x"(c1), [c2] "+x"(c2), [c3] "+x"(c3), [c4] "+x"(c4), [c5] "+x"(c5),
            [c6] "+x"(c6), [c7] "+x"(c7), [c8] "+x"(c8), [c9] "+x"(c9), [c10] "+x"(c10), [c11] "+x"(c11)
          : [r] "r"(r), [xa] "r"(xk), [xb] "r"(xb), [ld] "r"(ld), [mask] "r"(kOddMask)
          : "xmm12", "xmm13", "xmm14", "xmm15", "memory");
    }
    acc[0][0] = c0, acc[0][1] = c1, acc[1][0] = c2, acc[1][1] = c3, acc[2][0] = c4, acc[2][1] = c5;
    acc[3][0] = c6, acc[3][1] = c7, acc[4][0] = c8, acc[4][1] = c9, acc[5][0] = c10, acc[5][1] = c11;
  } else {
    for (int64_t k2 = 0; k2 < pairs; ++k2, r += 2 * kPanel, xk += 2, p += kStep) {
      if ((mine >> (k2 & 3)) & 1 && p + 64 <= end) _mm_prefetch(p, _MM_HINT_T1);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 16));
      const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
      const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
      for (int m = 0; m < MB; ++m) {
        const __m256 b = _mm256_broadcast_ss(xk + m * ldx);
        acc[m][0] = _mm256_fmadd_ps(b, e0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(b, e1, acc[m][1]);
      }
      const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, odd));
      const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, odd));
      for (int m = 0; m < MB; ++m) {
        const __m256 b = _mm256_broadcast_ss(xk + m * ldx + 1);
        acc[m][0] = _mm256_fmadd_ps(b, o0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(b, o1, acc[m][1]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 2; ++j) _mm256_storeu_ps(C + m * ldc + 16 * q + 8 * j, acc[m][j]);
}
#undef CPUGEN_PAIR6_ROWS

// One row of x against `pairs` k pairs of each of S segments of a panel that start `apart` pairs
// from each other (r: the first's first pair row; x from its first k pair on), all 64 outputs (8
// sums of 8), a pair row of each segment in turn, into C (onto it when `more`). At one and two rows
// a packed panel is bound by memory, not FMA: read as 4 sequential streams a thread it keeps more
// lines in flight than as one (the gemv's four rows of W a pass do the same), the hardware
// prefetchers following each. gptj-1b's shapes (384 MiB of them, 2 Zen 3 threads, the median of
// 15-21 shuffled rounds' ratios to the AVX2 gemv on the same weights, docs/performance.md):
// - one row, the panel as 4 streams: 1.06-1.13x the gemv, 1.20x the kernel before (one stream,
//   the next chunk prefetched into L2); 2 streams 1.06x, 8: 0.96x; 2-8 streams of panels far
//   apart 0.89-1.07x and noisier;
// - two rows, the rows in turn on 8 pairs of each stream (8 KiB, in L1 for the second row):
//   0.98-1.22x the gemv where the 6-row kernel's chunks ran 0.77-1.06x; at 3 and 4 rows those ran
//   ahead (1.09-1.24x against 0.89-1.05x), and keep them.
// S = 1: one row of a chunk packed from plain weights, or of a panel whose pairs S does not divide.
template <int S>
CPUGEN_AVX2 void micro_row(const float* x, const uint16_t* r, int64_t apart, int64_t pairs, float* C, bool more) {
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = more ? _mm256_loadu_ps(C + 8 * j) : _mm256_setzero_ps();
  for (int64_t k2 = 0; k2 < pairs; ++k2, r += 2 * kPanel, x += 2)
    for (int s = 0; s < S; ++s) {
      const uint16_t* rs = r + s * apart * 2 * kPanel;
      const __m256 be = _mm256_broadcast_ss(x + 2 * s * apart), bo = _mm256_broadcast_ss(x + 2 * s * apart + 1);
      for (int j = 0; j < 8; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rs + 16 * j));
        acc[j] = _mm256_fmadd_ps(be, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), acc[j]);
        acc[j] = _mm256_fmadd_ps(bo, _mm256_castsi256_ps(_mm256_and_si256(v, odd)), acc[j]);
      }
    }
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(C + 8 * j, acc[j]);
}
constexpr int kRowStreams = 4;  // micro_row's segments of a packed panel at one and two rows
constexpr int64_t kStreamRows = 2;  // the most rows of x that read packed panels as streams
constexpr int64_t kRowStep = 8;  // k pairs of each stream a row takes in turn (two rows)

// 8 rows of 8 32-bit values, transposed in registers
CPUGEN_AVX2 inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);  // (a0 b0 a1 b1 | a4 b4 a5 b5)
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);  // (a2 b2 a3 b3 | a6 b6 a7 b7)
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);  // (a0 b0 c0 d0 | a4 b4 c4 d4)
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);  // (a1 b1 c1 d1 | a5 ..)
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);  // (a2 .. | a6 ..)
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);  // (a3 .. | a7 ..)
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);  // column i
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);  // column i + 4
  }
}

// k pairs [c0, c0 + pairs) of outputs [o0, o0 + cols) of a plain (n, K) weight (w: its k pairs,
// K2 a row) written as one chunk of a panel of the packed layout (pairs rows of 64 outputs' pairs),
// zeros from cols to the chunk's last quarter: what pack_into writes there, 8 x 8 pairs at a time
CPUGEN_AVX2 void pack_chunk(const uint32_t* w, int64_t K2, int64_t o0, int64_t cols, int64_t c0, int64_t pairs,
                            uint32_t* dst) {
  const uint32_t* src = w + o0 * K2 + c0;
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    int64_t j = 0;
    for (; j + 8 <= pairs; j += 8) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (c + i) * K2 + j));
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (j + i) * kPanel + c), r[i]);
    }
    for (; j < pairs; ++j)
      for (int i = 0; i < 8; ++i) dst[j * kPanel + c + i] = src[(c + i) * K2 + j];
  }
  for (; c < cols; ++c)
    for (int64_t j = 0; j < pairs; ++j) dst[j * kPanel + c] = src[c * K2 + j];
  for (const int64_t last = std::min(kPanel, (cols + 15) / 16 * 16); c < last; ++c)
    for (int64_t j = 0; j < pairs; ++j) dst[j * kPanel + c] = 0;
}

using MicroFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, int, float*, int64_t, bool, const char*,
                         const char*, unsigned);
constexpr int64_t kPairRow = 4 * kPanel;  // bytes of a packed k pair row
// by the groups that prefetch (1, 2, 4: a line every pair, 2 pairs, 4 pairs), then rows of x
const MicroFn kMicros[3][kMicroRows] = {
    {micro<1, 64>, micro<2, 64>, micro<3, 64>, micro<4, 64>, micro<5, 64>, micro<6, 64>},
    {micro<1, 32>, micro<2, 32>, micro<3, 32>, micro<4, 32>, micro<5, 32>, micro<6, 32>},
    {micro<1, 16>, micro<2, 16>, micro<3, 16>, micro<4, 16>, micro<5, 16>, micro<6, 16>}};
constexpr unsigned kEvery[3] = {0xF, 0x5, 0x1};  // `mine`: the k2 mod 4 that prefetch
// On plain weights each call of the prefetching groups is split in parts, each part prefetching
// one row's segment of the next chunk: kParts at 4 such groups (a line every 4 k pairs), 8 at 2
// (a line every 2), 16 at 1 (every pair), so that they fetch all 64 of its rows. (With 4 parts
// at every count, 1 or 2 groups fetched only 16 or 32 of them, and the pack read the rest from
// memory: all 64 ran 1.05-1.10x at 8-18 rows of x, gptj-1b's shapes on 2 Zen 3 threads, two A/B
// runs; docs/performance.md.)
constexpr int kParts = 4;

// A buffer's first cache line boundary. malloc leaves a buffer 16 bytes into a line as often as not,
// and 32-byte loads from 16 or 48 bytes into a line split every second one: the chunk packed from
// plain weights ran gptj-1b's matrices 1.01-1.11x faster from a line's start (two A/B runs on 2 Zen 3
// threads, most at 1024 rows of x, where each block of rows allocates afresh: docs/performance.md).
constexpr uintptr_t kLine = 64;
template <class T>
T* on_lines(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + kLine - 1) & ~(kLine - 1));
}

// rows x cols of a tile's sums (row stride lds) + bias, activated, rounded into out (row stride ldo)
CPUGEN_AVX2 void finish_tile(const float* s, int64_t lds, const uint16_t* bias, int64_t act, uint16_t* out,
                             int64_t ldo, int64_t rows, int64_t cols) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t c = 0; c < cols; c += 8) {
      __m256 v = cpugen_vec2::loadf(s + m * lds + c, cols - c);
      if (bias) v = _mm256_add_ps(v, cpugen_vec2::load(bias + c, cols - c));
      cpugen_vec2::store(out + m * ldo + c, cpugen_vec2::activate(v, act), cols - c);
    }
}

// rows [r0, r1) of x (bf16, (rows, K)) widened into xs (fp32, (rows, K))
CPUGEN_AVX2 void widen_rows(const uint16_t* x, int64_t K, float* xs, int64_t ldx, int64_t r0, int64_t r1) {
  for (int64_t m = r0; m < r1; ++m)
    for (int64_t k = 0; k < K; k += 8)
      cpugen_vec2::storef(xs + m * ldx + k, cpugen_vec2::load(x + m * K + k, K - k), K - k);
}

}  // namespace

// The packed kernel on raw pointers, checked by the caller: x (M, K), w packed from an (n, K)
// weight (kPlain: the plain (n, K) weight itself), bias (n) or null, out (M, n), all bf16 and
// contiguous. Rows of x in blocks of up to kRowBlock (fewer where K is so wide that they would
// take over kScratchBytes), widened to fp32 once per block; panels split across threads; each panel
// in chunks of kChunk k pairs (64 KiB, in L2) that every group of up to 6 rows passes over, 16
// outputs at a time (one row: all 64 at once; one or two rows of packed weights: the whole panel as
// micro_row's kRowStreams streams); the sums wait in a tile of the block
// and are finished (bias, activation, bf16) into the output as each panel ends. kPlain: each chunk
// is first packed from the plain weight into a buffer of the thread's (as BLAS packs its
// operands), so the weight is read once per block of rows and never held twice.
template <bool kPlain>
void linear_raw(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* wp, int64_t n, const uint16_t* bp,
                int64_t act, uint16_t* op) {
  if (M == 0) return;
  const int64_t K2 = K / 2, np = (n + kPanel - 1) / kPanel;
  thread_local cpugen_gemv_avx2::HugeScratch xf;  // a block of x widened
  const int64_t ldx = K + kPad;
  const int64_t block = std::max(kMicroRows, std::min(kRowBlock, kScratchBytes / (4 * ldx)));
  float* xs = xf.get(std::min(M, block) * ldx);
  for (int64_t m1 = 0; m1 < M; m1 += block) {
    const int64_t rows = std::min(block, M - m1);
    // groups of rows: sixes, then the rest as one group (4 or 5 rows), or where 1-3 rows are left over,
    // the last six and those as two (3-5 rows each): group g is rows [starts[g], starts[g + 1])
    std::vector<int64_t> starts{0};
    const int64_t sixes = rows / kMicroRows, rest = rows % kMicroRows;
    for (int64_t g = 0; g < (rest == 0 || rest >= 4 || sixes == 0 ? sixes : sixes - 1); ++g)
      starts.push_back(starts.back() + kMicroRows);
    if (rows - starts.back() > kMicroRows) starts.push_back(starts.back() + (rows - starts.back() + 1) / 2);
    if (rows > starts.back()) starts.push_back(rows);
    const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
    // groups that prefetch the next chunk (1, 2 or 4: regions of a power of two), and their kMicros
    const int level = groups >= 4 ? 2 : groups >= 2 ? 1 : 0, share = 1 << level;
    static_assert(kShare == 4, "kMicros holds 1, 2 and 4 prefetching groups");
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { widen_rows(xp + m1 * K, K, xs, ldx, r0, r1); });
    at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
      const char* end = kPlain ? nullptr : reinterpret_cast<const char*>(wp + p1 * K * kPanel);  // of the thread's panels
      // the sums, and on plain weights one chunk of a panel packed, each from the start of a cache line
      std::vector<float> tile_store(rows * kPanel + kLine / sizeof(float));
      std::vector<uint32_t> packed_store(kPlain ? kChunk * kPanel + kLine / sizeof(uint32_t) : 0);
      float* const tile = on_lines(tile_store.data());
      uint32_t* const packed = on_lines(packed_store.data());
      for (int64_t q = p0; q < p1; ++q) {
        const int64_t cols = std::min(kPanel, n - q * kPanel);
        if (!kPlain && rows <= kStreamRows && K2 % kRowStreams == 0) {  // the panel as streams (micro_row)
          const uint16_t* panel = wp + q * K * kPanel;
          const int64_t seg = K2 / kRowStreams, step = rows == 1 ? seg : kRowStep;
          for (int64_t c0 = 0; c0 < seg; c0 += step)
            for (int64_t m = 0; m < rows; ++m)
              micro_row<kRowStreams>(xs + m * ldx + 2 * c0, panel + c0 * 2 * kPanel, seg, std::min(step, seg - c0),
                                     tile + m * kPanel, c0 > 0);
          finish_tile(tile, kPanel, bp ? bp + q * kPanel : nullptr, act, op + m1 * n + q * kPanel, n, rows, cols);
          continue;
        }
        const int quarters = static_cast<int>((cols + 15) / 16);
        for (int64_t c0 = 0; c0 < K2; c0 += kChunk) {
          const int64_t c1 = std::min(K2, c0 + kChunk);
          const uint16_t* r;  // the chunk's first pair row
          const char* next = nullptr;  // the next chunk's, to prefetch (packed weights)
          if (kPlain) {
            pack_chunk(reinterpret_cast<const uint32_t*>(wp), K2, q * kPanel, cols, c0, c1 - c0, packed);
            r = reinterpret_cast<const uint16_t*>(packed);
          } else {
            const uint16_t* panel = wp + q * K * kPanel;
            r = panel + c0 * 2 * kPanel;
            next = reinterpret_cast<const char*>(panel + c1 * 2 * kPanel);
          }
          if (rows == 1) {  // plain weights, or a packed panel whose pairs kRowStreams does not divide
            micro_row<1>(xs + 2 * c0, r, 0, c1 - c0, tile, c0 > 0);
            continue;
          }
          // plain weights: the next chunk to pack (this panel's next, or the thread's next panel's
          // first), whose rows the first `share` groups' calls prefetch, `parts` rows a call
          const int64_t nq = c1 < K2 ? q : q + 1, nc0 = c1 < K2 ? c1 : 0;
          const int64_t nrows = kPlain && nq < p1 ? std::min(kPanel, n - nq * kPanel) : 0;
          const int64_t nseg = (std::min(K2, nc0 + kChunk) - nc0) * 4;  // bytes of a row's segment
          const char* plain = nrows ? reinterpret_cast<const char*>(wp) + (nq * kPanel * K2 + nc0) * 4 : nullptr;
          const int parts = kParts * kShare / share;  // share x quarters x parts: the chunk's 64 rows
          const int64_t pairs = c1 - c0, part = (pairs + parts - 1) / parts;
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t m0 = starts[g], mb = starts[g + 1] - m0;
            const float* xg = xs + m0 * ldx + 2 * c0;
            float* cg = tile + m0 * kPanel;
            for (int j = 0; j < quarters; ++j) {
              if (!kPlain || g >= share) {
                // call j of group g: region 4 g + j of the next chunk's 4 share (of a partial panel's
                // chunk, regions j < quarters only)
                const int64_t region = pairs * kPairRow / (4 * share);
                kMicros[level][mb - 1](xg, ldx, r, pairs, j, cg, kPanel, c0 > 0,
                                       g < share && next ? next + (4 * g + j) * region : nullptr, end, kEvery[level]);
                continue;
              }
              // On plain weights no hardware prefetcher follows the 64 short row segments of a chunk,
              // and packing it from memory took a quarter of a 32-row pass on 2 Zen 3 cores (as much
              // as the pack's work from L2 four times over). The prefetch is spread through the
              // calls: Zen 3 dropped most prefetches issued in bursts (8 or more at once), even
              // with the chunk's compute to hide them.
              for (int s = 0; s < parts && s * part < pairs; ++s) {
                const int64_t row = (g * quarters + j) * parts + s;  // of the next chunk
                const char* pre = row < nrows ? plain + row * K2 * 4 : nullptr;
                kMicros[level][mb - 1](xg + 2 * s * part, ldx, r + s * part * 2 * kPanel,
                                       std::min(part, pairs - s * part), j, cg, kPanel, c0 > 0 || s > 0, pre,
                                       pre ? pre + nseg : nullptr, kEvery[level]);
              }
            }
          }
        }
        finish_tile(tile, kPanel, bp ? bp + q * kPanel : nullptr, act, op + m1 * n + q * kPanel, n, rows, cols);
      }
    });
  }
}

// linear_raw on cpugen's packed layout (the decode stack calls it)
inline void linear_packed_raw(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* pp, int64_t n,
                              const uint16_t* bp, int64_t act, uint16_t* op) {
  linear_raw<false>(xp, M, K, pp, n, bp, act, op);
}

// linear_raw on a plain (n, K) weight, packing it a chunk at a time (the decode stack calls it)
inline void linear_plain_raw(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* wp, int64_t n,
                             const uint16_t* bp, int64_t act, uint16_t* op) {
  linear_raw<true>(xp, M, K, wp, n, bp, act, op);
}

inline bool packed_available() { return cpugen_vec2::supported(); }

// x (M, K) bf16 (any M), p: pack_into's form of an (n, K) weight, bias (n,) or none, act ->
// act(x W^T + bias) (M, n) bf16
inline torch::Tensor linear_packed(const torch::Tensor& x, const torch::Tensor& p, int64_t n,
                                   const c10::optional<torch::Tensor>& bias, int64_t act) {
  TORCH_CHECK(packed_available(), "cpugen linear_packed: this CPU lacks AVX2 and FMA");
  return cpugen_packed::linear_packed_with(linear_packed_raw, x, p, n, bias, act);
}

// x (M, K) bf16 (any M), w (n, K) bf16, plain, bias (n,) or none, act -> act(x W^T + bias) (M, n)
// bf16: the packed kernel with w packed a chunk at a time as it goes; for more than kPlainAbove
// rows of x on weights kept plain (prefill; fewer rows run faster through the gemv)
inline torch::Tensor linear_plain(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                                  int64_t act) {
  TORCH_CHECK(packed_available(), "cpugen linear_plain: this CPU lacks AVX2 and FMA");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "cpugen linear_plain: bf16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && w.size(1) % 2 == 0,
              "cpugen linear_plain: x (M, K) and w (n, K) with K even");
  return cpugen_packed::run_linear(linear_plain_raw, "cpugen linear_plain", x, w.contiguous(), w.size(0), bias, act);
}

}  // namespace cpugen_packed_avx2

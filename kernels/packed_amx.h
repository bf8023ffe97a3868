#pragma once
// cpugen's packed layout (packed_layout.h) multiplied on AMX tiles. The layout is already what a
// tile of B wants: a panel's k pair row holds its 64 outputs' pairs side by side, so 16 k pair rows
// of 16 outputs (32 of k, 64 bytes a row, rows 256 bytes apart) are one tileloadd with a stride,
// with no copy and no second layout. tdpbf16ps then adds a (rows x 32 of k) tile of x times that
// tile into 16 outputs' fp32 sums for up to 16 rows of x at once.
//
// Tiles: tmm0-3 the sums, tmm4-5 x, tmm6-7 W. x is first copied into tiles (tile_x). Up to 16 rows
// of x (decode): one tile of x against the panel's four tiles of W, the sums of all 64 outputs in
// tmm0-3, the panel read once front to back. More rows: 2 x 2 tiles of sums (32 rows x 32 outputs)
// over a chunk of k at a time, the sums carried between chunks in a per-thread buffer.
// The sums leave through that buffer and the AVX-512 epilogue (finish_tile: bias, activation,
// bf16 rounding). K must be a multiple of 32 (every tile full in k): the caller takes the vdpbf16ps
// kernel where it is not. Reference: kernels/reference.py; check: kernels/check_gemv.py.
//
// Measured on 2 Xeon cores with AMX (tiles' register-only limit 7.0 TFLOP/s, oneDNN's 2048^3 bf16
// matmul 1.8-2.4), `kernels/bench_gemv.py` at the amx level (docs/performance.md, "AMX: cpugen's
// tile kernel against oneDNN"): at 1-16 rows of x this kernel streams gptj-1b's weights at 26 GB/s,
// oneDNN on its reordered weights at 21-22, cpugen's gemv on the plain ones at 27-29 up to 4 rows
// and 11 at 16; 0.57 against oneDNN's 0.52 TFLOP/s at 32 rows, level at 128, behind from 512 (1.26
// against 1.46-1.54, 1.28 against 1.59-1.93 at 1024). The tile loads set the pace: with W's loads
// hoisted out of the loop (wrong sums, same instructions otherwise) 512 rows ran at 2.05, with
// x's hoisted 2.11; chunks of 128-512 k, whole K, rows taking a chunk in either order, and T0/T1
// prefetches of the next chunk moved it by at most 5%.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>
#include <cstdint>
#include <cstring>
#include <vector>

#include "packed_layout.h"

namespace cpugen_amx {

using cpugen_packed::kPanel;

// Whether the CPU has AMX-BF16 and the OS hands this process the tile state (Linux asks each
// process to request it: arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); asked once
inline bool available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 22 & 1) || !(d >> 24 & 1)) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

struct TileConfig {  // ldtilecfg's 64-byte operand, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads a tile configuration (per thread: it is thread state). On the whole struct: GCC 12's
// _tile_loadconfig tells the compiler it reads 8 bytes, and the stores of the rest were dropped as
// dead (a fault at ldtilecfg). Also kernels/peak.cpp's.
__attribute__((target("amx-tile"))) inline void load_config(const TileConfig& c) { asm volatile("ldtilecfg %0" ::"m"(c)); }

// Tiles for a block of r0 rows of x (and r1 more, 0: none): sums tmm0-1 (r0 rows) and tmm2-3 (r1
// rows; for r1 = 0, tmm2-3 take r0 too: the single block's four tiles of sums), x tmm4 (r0), tmm5
// (r1), W tmm6-7 (16 k pair rows of 16 outputs' pairs)
__attribute__((target("amx-tile"))) inline void configure(int r0, int r1) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64;
  c.rows[0] = c.rows[1] = c.rows[4] = static_cast<uint8_t>(r0);
  c.rows[2] = c.rows[3] = static_cast<uint8_t>(r1 ? r1 : r0);
  c.rows[5] = static_cast<uint8_t>(r1 ? r1 : r0);
  c.rows[6] = c.rows[7] = 16;
  load_config(c);
}

// x as the tiles read it: rows in blocks of 16 (zeros past M), each block's k in tiles of 32, one
// tile (16 rows x 64 bytes) contiguous: T (ceil(M/16), K/32, 16, 32). Read with a stride of K * 2
// bytes instead, a tile's 16 rows share the same L1 sets once K reaches 2048 (4 KB apart or more).
inline void tile_x(const uint16_t* x, int64_t M, int64_t K, uint16_t* T) {
  const int64_t kb = K / 32, blocks = (M + 15) / 16;
  at::parallel_for(0, blocks * kb, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / kb, k = t % kb;
      uint16_t* d = T + t * 512;
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t m = 16 * b + r;
        if (m < M)
          std::memcpy(d + 32 * r, x + m * K + 32 * k, 64);
        else
          std::memset(d + 32 * r, 0, 64);
      }
    }
  });
}

// Up to 16 rows of x (configured) against one whole panel: the x tiles X (K/32 of them), the sums
// S (rows, 64) fp32 with rows 256 bytes apart. The panel is read once, front to back.
__attribute__((target("amx-tile,amx-bf16"))) inline void panel_1x4(const uint16_t* X, int64_t K,
                                                                   const uint16_t* panel, float* S) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t k = 0; k < K; k += 32) {
    const uint16_t* w = panel + k * kPanel;  // k pair row k / 2: 16 rows of 256 bytes from here
    // the 4 KB two k blocks ahead, into L1: gptj-1b's matrices at 1, 4 and 16 rows read 24.9-25.6 ->
    // 26.6-27.4 GB/s with it (2 Xeon AMX cores, medians of 5; 4 KB ahead 26.2-26.3, 16 KB NTA 12)
    for (int l = 0; l < 64; ++l) _mm_prefetch(reinterpret_cast<const char*>(w) + 8192 + 64 * l, _MM_HINT_T0);
    _tile_loadd(4, X + 16 * k, 64);
    _tile_loadd(6, w, 256);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, w + 32, 256);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, w + 64, 256);
    _tile_dpbf16ps(2, 4, 6);
    _tile_loadd(7, w + 96, 256);
    _tile_dpbf16ps(3, 4, 7);
  }
  _tile_stored(0, S, 256); _tile_stored(1, S + 16, 256);
  _tile_stored(2, S + 32, 256); _tile_stored(3, S + 48, 256);
}

// Two blocks of 16 rows (x tiles X0, X1; X1 null: one block) against half h of one panel (its
// outputs 32 h ..) over k [k0, k1): sums in S (rows 256 bytes apart, the half's columns), added
// onto where `more`
__attribute__((target("amx-tile,amx-bf16"))) inline void half_2x2(const uint16_t* X0, const uint16_t* X1,
                                                                  const uint16_t* panel, int h, int64_t k0,
                                                                  int64_t k1, float* S, bool more) {
  float* s = S + 32 * h;
  if (more) {
    _tile_loadd(0, s, 256); _tile_loadd(1, s + 16, 256);
    if (X1) { _tile_loadd(2, s + 16 * 64, 256); _tile_loadd(3, s + 16 * 64 + 16, 256); }
  } else {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  }
  for (int64_t k = k0; k < k1; k += 32) {
    const uint16_t* w = panel + k * kPanel + 64 * h;
    _tile_loadd(6, w, 256);
    _tile_loadd(4, X0 + 16 * k, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, w + 32, 256);
    _tile_dpbf16ps(1, 4, 7);
    if (X1) {
      _tile_loadd(5, X1 + 16 * k, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, s, 256); _tile_stored(1, s + 16, 256);
  if (X1) { _tile_stored(2, s + 16 * 64, 256); _tile_stored(3, s + 16 * 64 + 16, 256); }
}

__attribute__((target("amx-tile"))) inline void release() { _tile_release(); }

constexpr int64_t kChunkK = 512;  // k a pass over the rows takes of a panel's half: 32 KB of W
constexpr int64_t kGroupRows = 256;  // rows of x a panel's chunk takes in turn

// act(x W^T + bias) on raw pointers, checked by the caller: x (M, K), p packed from an (n, K)
// weight, bias (n) or null, out (M, n), all bf16 and contiguous; K % 32 == 0; X: scratch for
// tile_x (ceil(M/16) * 16 * K bf16); `finish` writes a block's sums (sums, stride, bias, act, out,
// ldo, rows, cols)
template <class Finish>
void linear_raw(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* pp, int64_t n, const uint16_t* bp,
                int64_t act, uint16_t* op, uint16_t* X, Finish finish) {
  if (M == 0) return;
  tile_x(xp, M, K, X);
  const int64_t np = (n + kPanel - 1) / kPanel, blocks = (M + 15) / 16;
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> sums(blocks * 16 * kPanel);
    float* S = sums.data();
    configure(M <= 16 ? static_cast<int>(M) : 16, 0);
    for (int64_t q = p0; q < p1; ++q) {
      const uint16_t* panel = pp + q * K * kPanel;
      if (M <= 16) {
        panel_1x4(X, K, panel, S);
      } else {
        // rows in groups of kGroupRows whose x (kGroupRows x kChunkK, 256 KB) stays in L2 while the
        // panel's chunk takes them; a chunk of k of a half panel (32 KB) stays in L1 while every
        // block of the group's rows takes it
        for (int64_t g = 0; g < blocks; g += kGroupRows / 16) {
          const int64_t g1 = std::min(blocks, g + kGroupRows / 16);
          for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
            const int64_t k1 = std::min(K, k0 + kChunkK);
            for (int h = 0; h < 2; ++h)
              for (int64_t b = g; b < g1; b += 2)
                half_2x2(X + b * 16 * K, b + 1 < g1 ? X + (b + 1) * 16 * K : nullptr, panel, h, k0, k1,
                         S + b * 16 * kPanel, k0 > 0);
          }
        }
      }
      const int64_t cols = std::min(kPanel, n - q * kPanel);
      finish(S, kPanel, bp ? bp + q * kPanel : nullptr, act, op + q * kPanel, n, M, cols);
    }
    release();
  });
}

}  // namespace cpugen_amx

#pragma once
// cpugen's packed layout (packed_layout.h) multiplied on AMX tiles. The layout is already what a
// tile of B wants: a panel's k pair row holds its 64 outputs' pairs side by side, so 16 k pair rows
// of 16 outputs (32 of k, 64 bytes a row, rows 256 bytes apart) are one tileloadd with a stride,
// with no copy and no second layout. tdpbf16ps then adds a (rows x 32 of k) tile of x times that
// tile into 16 outputs' fp32 sums for up to 16 rows of x at once.
//
// Tiles: tmm0-3 the sums, tmm4 x, tmm6-7 W. x is first copied into tiles (tile_x). Each block of
// 16 rows of x (zeros past M) takes a whole panel: one tile of x against the panel's four tiles of
// W, the sums of all 64 outputs in tmm0-3 from the first k to the last, the panel read front to
// back (from memory by the first block, with a prefetch ahead; from L2 by the rest). Rows go in
// groups whose tiles of x (1 MB) stay in L2 while the thread's panels take them in turn: 128 rows
// of a 4096-k chunk of each panel where K is wider (the sums carried between chunks), more rows
// of the whole K where it is narrower.
// The sums leave through a per-thread buffer and the AVX-512 epilogue (finish_tile: bias,
// activation, bf16 rounding). K must be a multiple of 32 (every tile full in k): the caller takes
// the vdpbf16ps kernel where it is not. Reference: kernels/reference.py; check: kernels/check_gemv.py.
//
// Measured on 2 Xeon cores with AMX (tiles' register-only limit 7.0 TFLOP/s, oneDNN's 2048^3 bf16
// matmul 1.8-2.4), `kernels/bench_gemv.py` at the amx level (docs/performance.md, "AMX: cpugen's
// tile kernel against oneDNN"): at 1-16 rows of x this kernel streams gptj-1b's weights at 26-27
// GB/s, oneDNN on its reordered weights at 21, cpugen's gemv on the plain ones at 28-30 up to 4
// rows and 11 at 16; at 32 rows 0.66 against oneDNN's 0.52-0.54 TFLOP/s, level at 128, behind from
// 512 (1.34-1.35 against 1.43-1.84 at 512-4096: 0.73-0.81x). Against the 2 x 2
// tiles of sums over 512-k chunks this replaced (`CPUGEN_ISA=amx python kernels/bench_ab.py
// --base <commit> --rows 17,32,...`): 1.24-1.27x at 17-32 rows, 1.05-1.09x at 64-512, level at
// 1024-2048; the groups of rows then 1.05-1.19x at 1024-4096 (groups of 512 KB or 2 MB of x, or
// of 64 rows at K 8192: 0.91-0.97x), and the chunks of k 1.16x at 4096 rows, 0.95-0.97x at 512-1024
// (where the whole K of all rows did better on gptj-1b's K 8192 matrix), 1.31x at 256 and 1024 rows
// on the 175B model's matrices (`--hidden 12288 --layers 1`: K 12288 and 49152, whose panels
// of the whole K fill 1.5-6 MB, more than L2). The tile loads set the pace at large row counts:
// with W's loads hoisted out of the loop (wrong sums, same instructions otherwise) 512 rows ran at
// 2.05, with x's hoisted 2.11.

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

// Tiles for blocks of `rows` rows of x (16, or M where M < 16): the sums tmm0-3 and x tmm4 that
// many rows, W tmm6-7 16 k pair rows of 16 outputs' pairs; tmm5 unused
__attribute__((target("amx-tile"))) inline void configure(int rows) {
  TileConfig c;
  for (int t : {0, 1, 2, 3, 4, 6, 7}) {
    c.colsb[t] = 64;
    c.rows[t] = static_cast<uint8_t>(t < 6 ? rows : 16);
  }
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

// Up to 16 rows of x (configured) against k [k0, k1) of one panel: the x tiles X (a block's K/32
// of them), the sums S (rows, 64) fp32 with rows 256 bytes apart, added onto where `more`. The
// panel's k are read once, front to back.
__attribute__((target("amx-tile,amx-bf16"))) inline void panel_1x4(const uint16_t* X, int64_t k0, int64_t k1,
                                                                   const uint16_t* panel, float* S, bool more) {
  if (more) {
    _tile_loadd(0, S, 256); _tile_loadd(1, S + 16, 256);
    _tile_loadd(2, S + 32, 256); _tile_loadd(3, S + 48, 256);
  } else {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  }
  for (int64_t k = k0; k < k1; k += 32) {
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

__attribute__((target("amx-tile"))) inline void release() { _tile_release(); }

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
  // rows in groups whose x (G blocks of 16 rows x a chunk of at most 4096 k) stays in L2 (1 MB)
  // while the thread's panels take it in turn: 128 rows of a 4096-k chunk where K is wider (the
  // sums carried in S between chunks; a chunk of a panel is 512 KB), more rows where K is narrower
  const int64_t Kc = std::min<int64_t>(K, 4096);
  const int64_t G = std::max<int64_t>(1, (int64_t(1) << 20) / (32 * Kc));
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> sums(std::min(G, blocks) * 16 * kPanel);
    float* S = sums.data();
    configure(M <= 16 ? static_cast<int>(M) : 16);
    for (int64_t g0 = 0; g0 < blocks; g0 += G) {
      const int64_t g1 = std::min(blocks, g0 + G), rows = std::min(M, g1 * 16) - g0 * 16;
      for (int64_t q = p0; q < p1; ++q) {
        const uint16_t* panel = pp + q * K * kPanel;
        // every block of 16 rows against the panel's chunk in turn, the sums in tiles throughout
        // the chunk; the blocks after the first read the chunk (128 bytes a k: up to 512 KB) from L2
        for (int64_t k0 = 0; k0 < K; k0 += Kc)
          for (int64_t b = g0; b < g1; ++b)
            panel_1x4(X + b * 16 * K, k0, std::min(K, k0 + Kc), panel, S + (b - g0) * 16 * kPanel, k0 > 0);
        const int64_t cols = std::min(kPanel, n - q * kPanel);
        finish(S, kPanel, bp ? bp + q * kPanel : nullptr, act, op + g0 * 16 * n + q * kPanel, n, rows, cols);
      }
    }
    release();
  });
}

}  // namespace cpugen_amx

// A decode step in one native call: the token embedding, every block of the model one after the
// other, the final norm and the lm_head run here, without returning to Python between their
// operations; at any batch with the weights in cpugen's packed layout, at the gemv's few rows
// with them plain.
//
// Per block (pre-norm; GPT-J's parallel residual or the sequential one):
//   h = norm_1(x); a = wo(attention(wqkv(h)))             attention: decode_attention.h's decode_step
//   parallel:   x = x + a + mlp(h)
//   sequential: x = x + a;  x = x + mlp(norm_2(x))
//   mlp(h) = w_out(act(w_in(h)))  or, GLU,  w_out(act(gate) * up) with [gate; up] = w_13(h)
// The matmuls are gemv_bf16.h's kernels (gemv_avx2.h's and packed_avx2.h's at the AVX2 level), on
// the plain weights or on cpugen's packed layout (bias and
// a plain MLP's activation in their epilogue); the norms are norm.h's and a GLU's product glu.h's,
// which the Python blocks call too (Norm.impl, MLP.glu); the residual adds round to bf16 after each
// add, as torch's do. So the logits are those of the Python blocks, bit for bit.
//
// Why one call: measured on 2 Zen 4 cores, a 24-block model 256 wide (compute negligible) took
// 3.8 ms a decode step through the Python blocks, about 160 us a block. And why no torch op
// inside it: streaming gigabytes of weights a step leaves nothing in cache, so each small torch
// op (its dispatch, allocation and checks) ran at 10-60 us cold against 1-4 us warm; a batch-1
// gptj-1b step spent 0.8 ms in the dozen ops around the blocks and about as much in the norms and
// adds between the matmuls. The step's kernels run on raw pointers into a workspace the stack
// keeps, so the blocks' code is a few kernels that stay in the instruction cache.
// Reference: the Python blocks (cpugen/model/transformer.py); refusal of what it lacks: cpugen/runtime/stack.py; check: tests/test_kernels.py.

#include "decode_attention.h"
#include "gemv_avx2.h"
#include "packed_avx2.h"
#include "gemv_bf16.h"
#include "glu.h"
#include "norm.h"

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace cpugen_layer {

using torch::Tensor;
using Opt = c10::optional<Tensor>;

using cpugen_vec::kNone;
using cpugen_vec::kSilu;
using Level = cpugen_vec::Level;

Tensor defined_or_empty(const Opt& t) { return t.has_value() ? *t : Tensor(); }

const uint16_t* bf16_ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<const uint16_t*>(t.data_ptr()) : nullptr;
}

// A weight, plain (n, K) or packed (gemv_bf16.h's layout, 3-d), and its bias, held by reference
struct Matrix {
  Tensor w, b;
  const uint16_t *wp = nullptr, *bp = nullptr;
  int64_t n = 0, K = 0;
  bool packed = false;

  Matrix() = default;
  Matrix(const Tensor& weight, const Tensor& bias, int64_t outs) : w(weight), b(bias), n(outs) {
    TORCH_CHECK(w.defined() && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && (w.dim() == 2 || w.dim() == 3),
                "cpugen decode_layer: a weight must be contiguous bf16, plain or packed");
    packed = w.dim() == 3;
    K = packed ? 2 * w.size(1) : w.size(1);
    TORCH_CHECK(packed ? (n + 63) / 64 == w.size(0) : n == w.size(0), "cpugen decode_layer: ", n,
                " outputs for a weight of ", w.sizes());
    TORCH_CHECK(!b.defined() || (b.scalar_type() == at::kBFloat16 && b.is_contiguous() && b.numel() == n),
                "cpugen decode_layer: a bias must be contiguous bf16, one per output");
    wp = bf16_ptr(w), bp = bf16_ptr(b);
  }

  // y (M, n) = act(x (M, K) w^T + b) at `level` (packed weights: packed_avx2.h's kernel at the AVX2
  // level, gemv_bf16.h's AVX512-BF16 one above; plain ones: the gemv, at the AVX2 level above
  // kPlainAbove rows packed_avx2.h's kernel packing them as it goes, as Linear.forward does); sums:
  // M x n floats of scratch for the plain gemv
  void operator()(const uint16_t* x, int64_t M, uint16_t* y, int64_t act, float* sums, Level level) const {
    if (packed && level == Level::kAvx2)
      cpugen_packed_avx2::linear_packed_raw(x, M, K, wp, n, bp, act, y);
    else if (packed)
      cpugen_gemv::linear_packed_raw(x, M, K, wp, n, bp, act, y);
    else if (level == Level::kAvx2 && M > cpugen_packed_avx2::kPlainAbove && K % 2 == 0)
      cpugen_packed_avx2::linear_plain_raw(x, M, K, wp, n, bp, act, y);
    else if (level == Level::kAvx2)
      cpugen_gemv_avx2::gemv_raw(x, M, K, wp, n, bp, act, y, sums);
    else
      cpugen_gemv::gemv_raw(x, M, K, wp, n, bp, act, y, sums);
  }
};

struct NormW {
  Tensor w, b;  // b undefined for RMSNorm
  const uint16_t *wp = nullptr, *bp = nullptr;
  NormW() = default;
  NormW(const Tensor& weight, const Tensor& bias) : w(weight), b(bias) {
    TORCH_CHECK(!w.defined() || (w.scalar_type() == at::kBFloat16 && w.is_contiguous()),
                "cpugen decode_layer: norm weights must be contiguous bf16");
    TORCH_CHECK(!b.defined() || (b.scalar_type() == at::kBFloat16 && b.is_contiguous()),
                "cpugen decode_layer: norm biases must be contiguous bf16");
    wp = bf16_ptr(w), bp = bf16_ptr(b);
  }
};

struct Block {
  NormW ln1, ln2;  // ln2 undefined with a parallel residual
  Matrix wqkv, wo, w_in, w_out;
};

struct Head {  // what a step does around the blocks (transformer.py's Transformer.forward)
  Tensor wte, wpe, cos, sin;  // wpe / cos, sin undefined where absent
  NormW lnf;
  Matrix lm;
  int64_t pos_offset = 0;
};

// x = bf16(x + a), element by element (torch's bf16 add: fp32 sum, rounded once)
__attribute__((target("avx512f,avx512bw,avx512vl"))) void add_into_avx512(uint16_t* x, const uint16_t* a, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = cpugen_vec::lanes(n, i);
    const __m512 s = _mm512_add_ps(cpugen_vec::load_bf16(x + i, m), cpugen_vec::load_bf16(a + i, m));
    _mm256_mask_storeu_epi16(x + i, m, cpugen_vec::round_bf16(s));
  }
}

CPUGEN_AVX2 void add_into_avx2(uint16_t* x, const uint16_t* a, int64_t n) {
  for (int64_t i = 0; i < n; i += 8)
    cpugen_vec2::store(x + i, _mm256_add_ps(cpugen_vec2::load(x + i, n - i), cpugen_vec2::load(a + i, n - i)), n - i);
}

// A stack's level: "avx2", "avx512" (AVX-512 F/BW/VL: decode attention takes the AVX2 kernel, as
// its AVX-512 one needs vdpbf16ps) or "avx512_bf16" -> (the level of the matmuls, norms and adds,
// the level of decode attention)
std::pair<Level, Level> parse_level(const std::string& isa) {
  TORCH_CHECK(isa == "avx2" || isa == "avx512" || isa == "avx512_bf16",
              "cpugen decode_layer: level avx2, avx512 or avx512_bf16, not ", isa);
  const bool ok = isa == "avx2"     ? cpugen_vec2::supported()
                  : isa == "avx512" ? cpugen_gemv::kIsa != cpugen_gemv::Isa::kNone && cpugen_vec2::supported()
                                    : cpugen_gemv::kIsa == cpugen_gemv::Isa::kAvx512Bf16;
  TORCH_CHECK(ok, "cpugen decode_layer: this CPU cannot run the ", isa, " level");
  return {isa == "avx2" ? Level::kAvx2 : Level::kAvx512, isa == "avx512_bf16" ? Level::kAvx512 : Level::kAvx2};
}

class Stack {
 public:
  // blocks: per block [ln1_w, ln1_b, ln2_w, ln2_b, wqkv, bqkv, wo, bo, w_in, b_in, w_out, b_out],
  // None where absent, each weight plain or packed; outs: per block the outputs of wqkv, wo, w_in,
  // w_out; isa: the level its kernels run at, "avx2", "avx512" or "avx512_bf16" (parse_level).
  // Holds references to the model's own tensors: no weight is copied.
  Stack(const std::vector<std::vector<Opt>>& blocks, const std::vector<std::vector<int64_t>>& outs,
        const std::string& norm, double eps, bool parallel, bool glu, int64_t act, int64_t nh, int64_t rd,
        const std::string& isa)
      : rms_(norm == "rmsnorm"), eps_(static_cast<float>(eps)), parallel_(parallel), glu_(glu), act_(act), nh_(nh),
        rd_(rd) {
    std::tie(level_, attn_level_) = parse_level(isa);
    TORCH_CHECK(norm == "rmsnorm" || norm == "layernorm", "cpugen decode_layer: unknown norm ", norm);
    TORCH_CHECK(act >= kNone && act <= kSilu, "cpugen decode_layer: unknown activation ", act);
    TORCH_CHECK(outs.size() == blocks.size() && !blocks.empty(), "cpugen decode_layer: one list of outputs per block");
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto& b = blocks[i];
      TORCH_CHECK(b.size() == 12 && outs[i].size() == 4, "cpugen decode_layer: 12 tensors and 4 outputs a block");
      std::vector<Tensor> t;
      for (const auto& o : b) t.push_back(defined_or_empty(o));
      TORCH_CHECK(t[4].defined() && t[6].defined() && t[8].defined() && t[10].defined() && t[0].defined(),
                  "cpugen decode_layer: a block without its weights");
      TORCH_CHECK(parallel || t[2].defined(), "cpugen decode_layer: a sequential block needs its second norm");
      Block k{NormW(t[0], t[1]), NormW(t[2], t[3]), Matrix(t[4], t[5], outs[i][0]), Matrix(t[6], t[7], outs[i][1]),
              Matrix(t[8], t[9], outs[i][2]), Matrix(t[10], t[11], outs[i][3])};
      TORCH_CHECK(k.wqkv.K == k.wo.n && k.w_in.K == k.wo.n && k.w_out.n == k.wo.n &&
                      k.w_out.K == (glu ? k.w_in.n / 2 : k.w_in.n),
                  "cpugen decode_layer: the matrices of block ", i, " do not chain");
      blocks_.push_back(std::move(k));
    }
    h_ = blocks_[0].wo.n;
  }

  // Tensor parallel: `reduce` sums a (B, h) bf16 tensor over the ranks in place (the
  // row-parallel matmuls' partial outputs); called with the GIL held where the Python blocks call
  // Block.reduce: once a block for the parallel residual (attention and MLP together), twice for
  // the sequential one. None: a model held whole.
  void set_reduce(py::object reduce) { reduce_ = std::move(reduce); }

  // wte (V, h); wpe (P, h) or none, read at pos + pos_offset; cos/sin tables (P, rd/2) fp32 or
  // none; the final norm; lm_w plain (n_vocab, h) or packed, lm_b or none
  void set_head(const Tensor& wte, const Opt& wpe, int64_t pos_offset, const Opt& cos, const Opt& sin,
                const Tensor& lnf_w, const Opt& lnf_b, const Tensor& lm_w, const Opt& lm_b, int64_t n_vocab) {
    TORCH_CHECK(wte.dim() == 2 && wte.size(1) == h_ && wte.scalar_type() == at::kBFloat16 && wte.is_contiguous(),
                "cpugen decode_layer: wte (V, h) contiguous bf16");
    const Tensor pe = defined_or_empty(wpe);
    TORCH_CHECK(!pe.defined() || (pe.dim() == 2 && pe.size(1) == h_ && pe.scalar_type() == at::kBFloat16 &&
                                  pe.is_contiguous()), "cpugen decode_layer: wpe (P, h) contiguous bf16");
    TORCH_CHECK(cos.has_value() == sin.has_value() && cos.has_value() == (rd_ > 0),
                "cpugen decode_layer: rotary tables where the blocks rotate, none where they do not");
    if (rd_) TORCH_CHECK(cos->scalar_type() == at::kFloat && cos->is_contiguous() && cos->dim() == 2 &&
                             cos->size(1) == rd_ / 2 && sin->sizes() == cos->sizes() && sin->is_contiguous() &&
                             sin->scalar_type() == at::kFloat,
                         "cpugen decode_layer: rotary tables (P, rd / 2) contiguous fp32");
    head_ = Head{wte, pe, defined_or_empty(cos), defined_or_empty(sin), NormW(lnf_w, defined_or_empty(lnf_b)),
                 Matrix(lm_w, defined_or_empty(lm_b), n_vocab), pos_offset};
    TORCH_CHECK(head_.lm.K == h_, "cpugen decode_layer: an lm_head of ", head_.lm.K, " inputs for a model ", h_, " wide");
    has_head_ = true;
  }

  // tokens, pos (B,) int64: each sequence's new token and its position; the blocks' caches (B, nkv,
  // S_max, hd) bf16; index: this token's cache position -> logits (B, n_vocab)
  Tensor step(const Tensor& tokens, const Tensor& pos, const std::vector<Tensor>& k_caches,
              const std::vector<Tensor>& v_caches, int64_t index) {
    TORCH_CHECK(has_head_, "cpugen decode_layer: step needs set_head first");
    TORCH_CHECK(tokens.dim() == 1 && pos.dim() == 1 && tokens.size(0) == pos.size(0) &&
                    tokens.scalar_type() == at::kLong && pos.scalar_type() == at::kLong,
                "cpugen decode_layer: tokens, pos (B,) int64");
    TORCH_CHECK(k_caches.size() == blocks_.size() && v_caches.size() == blocks_.size(),
                "cpugen decode_layer: one cache per block");
    const int64_t B = tokens.size(0), h = h_;
    const int64_t max_rows = level_ == Level::kAvx2 ? cpugen_gemv_avx2::kMaxRows : cpugen_gemv::kMaxM;
    TORCH_CHECK(B >= 1 && (B <= max_rows || all_packed()), "cpugen decode_layer: ", B,
                " sequences a step: the plain weights' gemv takes at most ", max_rows);
    const auto tc = tokens.contiguous(), pc = pos.contiguous();
    const int64_t* tok = tc.data_ptr<int64_t>();
    const int64_t* ps = pc.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(tok[b] >= 0 && tok[b] < head_.wte.size(0), "cpugen decode_layer: token ", tok[b],
                  " outside the vocabulary");
      const int64_t rows = head_.wpe.defined() ? head_.wpe.size(0) - head_.pos_offset
                                               : (rd_ ? head_.cos.size(0) : ps[b] + 1);
      TORCH_CHECK(ps[b] >= 0 && ps[b] < rows, "cpugen decode_layer: position ", ps[b], " outside the model's ", rows);
    }
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Tensor &k = k_caches[i], &v = v_caches[i];
      TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.is_contiguous() && v.is_contiguous() && v.sizes() == k.sizes() &&
                      k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
                      nh_ % k.size(1) == 0 && k.size(3) % 32 == 0 && k.size(3) <= 256 &&
                      blocks_[i].wqkv.n == (nh_ + 2 * k.size(1)) * k.size(3) && index >= 0 && index < k.size(2),
                  "cpugen decode_layer: block ", i, "'s cache does not fit its heads or position ", index);
    }
    reserve(B);
    uint16_t* x = bf(kX);
    const int64_t row = h * static_cast<int64_t>(sizeof(uint16_t));
    for (int64_t b = 0; b < B; ++b)  // the token embedding (and learned positions)
      std::memcpy(x + b * h, bf16_ptr(head_.wte) + tok[b] * h, row);
    if (head_.wpe.defined())
      for (int64_t b = 0; b < B; ++b) add(x + b * h, bf16_ptr(head_.wpe) + (ps[b] + head_.pos_offset) * h, h);
    float *cos = nullptr, *sin = nullptr;
    if (rd_) {  // each sequence's angles, (B, rd/2)
      cos = f32(kCos), sin = f32(kSin);
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(cos + b * rd_ / 2, head_.cos.data_ptr<float>() + ps[b] * rd_ / 2, rd_ / 2 * sizeof(float));
        std::memcpy(sin + b * rd_ / 2, head_.sin.data_ptr<float>() + ps[b] * rd_ / 2, rd_ / 2 * sizeof(float));
      }
    }
    for (size_t i = 0; i < blocks_.size(); ++i) block(blocks_[i], B, x, cos, sin, k_caches[i], v_caches[i], index);
    cpugen_norm::norm_raw(x, head_.lnf.wp, head_.lnf.bp, eps_, rms_, bf(kH), B, h, level_);
    auto logits = torch::empty({B, head_.lm.n}, head_.wte.options());
    head_.lm(bf(kH), B, reinterpret_cast<uint16_t*>(logits.data_ptr()), kNone, f32(kSums), level_);
    return logits;
  }

  int64_t size() const { return static_cast<int64_t>(blocks_.size()); }

 private:
  bool all_packed() const {
    for (const Block& b : blocks_)
      if (!b.wqkv.packed || !b.wo.packed || !b.w_in.packed || !b.w_out.packed) return false;
    return head_.lm.packed;
  }

  // The workspace: bf16 buffers of B rows each, then fp32 ones
  enum Buf { kX, kH, kQkv, kY, kA, kM1, kGlu, kM, kBf16Bufs };
  enum FBuf { kSums, kCos, kSin, kF32Bufs };

  void reserve(int64_t B) {
    if (B == rows_) return;
    const bool plain = !all_packed();
    int64_t widest = plain ? head_.lm.n : 0;  // the plain gemv's sums: the widest matrix's outputs
    int64_t width[kBf16Bufs] = {h_, h_, 0, 0, h_, 0, 0, h_};
    for (const Block& b : blocks_) {
      width[kQkv] = std::max(width[kQkv], b.wqkv.n);
      width[kY] = std::max(width[kY], b.wo.K);
      width[kM1] = std::max(width[kM1], b.w_in.n);
      width[kGlu] = std::max(width[kGlu], b.w_out.K);
      if (plain)
        for (const Matrix* m : {&b.wqkv, &b.wo, &b.w_in, &b.w_out}) widest = std::max(widest, m->n);
    }
    int64_t at = 0;
    for (int i = 0; i < kBf16Bufs; ++i) bf_at_[i] = at, at += (B * width[i] + 31) / 32 * 32;  // 64-byte aligned
    bf16_.assign(at, 0);
    const int64_t fw[kF32Bufs] = {widest, rd_ / 2, rd_ / 2};
    at = 0;
    for (int i = 0; i < kF32Bufs; ++i) f32_at_[i] = at, at += (B * fw[i] + 15) / 16 * 16;
    f32_.assign(at, 0.f);
    rows_ = B;
  }
  uint16_t* bf(int i) { return bf16_.data() + bf_at_[i]; }
  float* f32(int i) { return f32_.data() + f32_at_[i]; }

  void norm(const NormW& n, const uint16_t* x, uint16_t* y, int64_t B) {
    cpugen_norm::norm_raw(x, n.wp, n.bp, eps_, rms_, y, B, h_, level_);
  }

  void add(uint16_t* x, const uint16_t* a, int64_t n) const {
    (level_ == Level::kAvx2 ? add_into_avx2 : add_into_avx512)(x, a, n);
  }

  // Tensor parallel: the ranks' partial sums a (B, h) summed in place (a no-op for a whole model)
  void reduce(uint16_t* a, int64_t B) {
    if (reduce_.is_none()) return;
    py::gil_scoped_acquire gil;
    reduce_(torch::from_blob(a, {B, h_}, torch::TensorOptions().dtype(at::kBFloat16)));
  }

  void block(const Block& b, int64_t B, uint16_t* x, const float* cos, const float* sin, const Tensor& kc,
             const Tensor& vc, int64_t index) {
    float* sums = f32(kSums);
    uint16_t *hn = bf(kH), *a = bf(kA), *m = bf(kM);
    norm(b.ln1, x, hn, B);
    b.wqkv(hn, B, bf(kQkv), kNone, sums, level_);  // (B, (nh + 2 nkv) hd)
    cpugen_attn::decode_step_raw(bf(kQkv), b.wqkv.n, cos, sin, reinterpret_cast<uint16_t*>(kc.data_ptr()),
                                 reinterpret_cast<uint16_t*>(vc.data_ptr()), B, kc.size(1), kc.size(2), kc.size(3),
                                 index, nh_, rd_, bf(kY), attn_level_);
    b.wo(bf(kY), B, a, kNone, sums, level_);  // (B, h)
    if (parallel_) {
      mlp(b, hn, m, B);
      if (reduce_.is_none()) {
        add(x, a, B * h_);  // x = (x + a) + mlp(h), rounded after each add
        add(x, m, B * h_);
      } else {  // x = x + reduce(a + mlp(h)): both partial sums in one all-reduce
        add(a, m, B * h_);
        reduce(a, B);
        add(x, a, B * h_);
      }
    } else {
      reduce(a, B);
      add(x, a, B * h_);
      norm(b.ln2, x, hn, B);
      mlp(b, hn, m, B);
      reduce(m, B);
      add(x, m, B * h_);
    }
  }

  void mlp(const Block& b, const uint16_t* hn, uint16_t* out, int64_t B) {
    float* sums = f32(kSums);
    if (!glu_) {
      b.w_in(hn, B, bf(kM1), act_, sums, level_);
      b.w_out(bf(kM1), B, out, kNone, sums, level_);
      return;
    }
    b.w_in(hn, B, bf(kM1), kNone, sums, level_);  // (B, 2 ffn): [gate; up]
    cpugen_glu::glu_raw(bf(kM1), B, b.w_out.K, act_, bf(kGlu), level_);  // (B, ffn)
    b.w_out(bf(kGlu), B, out, kNone, sums, level_);
  }

  std::vector<Block> blocks_;
  Head head_;
  bool has_head_ = false;
  bool rms_;
  float eps_;
  bool parallel_, glu_;
  int64_t act_, nh_, rd_, h_ = 0;
  Level level_, attn_level_;  // of the matmuls, norms and adds; of decode attention
  py::object reduce_ = py::none();
  int64_t rows_ = 0;  // the batch the workspace is laid out for
  std::vector<uint16_t> bf16_;
  std::vector<float> f32_;
  int64_t bf_at_[kBf16Bufs] = {}, f32_at_[kF32Bufs] = {};
};

}  // namespace cpugen_layer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<cpugen_layer::Stack>(m, "Stack")
      .def(py::init<const std::vector<std::vector<cpugen_layer::Opt>>&, const std::vector<std::vector<int64_t>>&,
                    const std::string&, double, bool, bool, int64_t, int64_t, int64_t, const std::string&>(),
           py::arg("blocks"), py::arg("outs"), py::arg("norm"), py::arg("eps"), py::arg("parallel"), py::arg("glu"),
           py::arg("act"), py::arg("nh"), py::arg("rd"), py::arg("isa"))
      .def("set_reduce", &cpugen_layer::Stack::set_reduce, "tensor parallel: the in-place all-reduce of (B, h) partial sums",
           py::arg("reduce"))
      .def("set_head", &cpugen_layer::Stack::set_head, "what a step does around the blocks", py::arg("wte"), py::arg("wpe"),
           py::arg("pos_offset"), py::arg("cos"), py::arg("sin"), py::arg("lnf_w"), py::arg("lnf_b"), py::arg("lm_w"),
           py::arg("lm_b"), py::arg("n_vocab"))
      .def("step", &cpugen_layer::Stack::step, "tokens, pos (B,) -> logits (B, V): a whole decode step",
           py::call_guard<py::gil_scoped_release>())
      .def("__len__", &cpugen_layer::Stack::size);
}

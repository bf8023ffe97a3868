// A decode step in one native call: for batches the gemv serves (at most a few rows), the token
// embedding, every block of the model one after the other, the final norm and the lm_head run
// here, without returning to Python between their operations.
//
// Per block (pre-norm; GPT-J's parallel residual or the sequential one):
//   h = norm_1(x); a = wo(attention(wqkv(h)))             attention: decode_attention.h's decode_step
//   parallel:   x = x + a + mlp(h)
//   sequential: x = x + a;  x = x + mlp(norm_2(x))
//   mlp(h) = w_out(act(w_in(h)))  or, GLU,  w_out(act(gate) * up) with [gate; up] = w_13(h)
// The matmuls are gemv_bf16.h's kernels, on the plain weights or on cpugen's packed layout (bias and
// a plain MLP's activation in their epilogue); norms,
// the GLU product and the residual adds are the same ATen ops the Python blocks call, in the same
// order, so the numbers are those of the per-op path. What this saves is the time between the
// kernels: measured on 2 Zen 4 cores, a 24-block model 256 wide (compute negligible) took 3.8 ms
// a decode step through the Python blocks, about 160 us a block. The head (embedding, positions,
// final norm, lm_head) came in later for the same reason at a larger scale: streaming gigabytes of
// weights a step leaves nothing of the interpreter in cache, and the dozen small torch calls
// around the blocks took 0.8 ms of a 48 ms batch-1 gptj-1b step (each op 10-60 us cold against
// 1-4 us warm).
// Reference: the Python blocks (cpugen/model.py); check: tests/test_kernels.py.

#include "decode_attention.h"
#include "gemv_bf16.h"

#include <string>
#include <vector>

namespace cpugen_layer {

using torch::Tensor;
using Opt = c10::optional<Tensor>;

enum Act : int64_t { kNone = 0, kGeluTanh = 1, kGelu = 2, kRelu = 3, kSilu = 4 };  // as gemv_bf16.h

Tensor defined_or_empty(const Opt& t) { return t.has_value() ? *t : Tensor(); }
Opt opt(const Tensor& t) { return t.defined() ? Opt(t) : c10::nullopt; }

struct Head {  // what a step does around the blocks (model.py's Transformer.forward)
  Tensor wte, wpe, cos, sin, lnf_w, lnf_b, lm_w, lm_b;  // wpe / cos, sin / biases undefined where absent
  int64_t pos_offset = 0, n_vocab = 0;
};

struct Block {
  Tensor ln1_w, ln1_b, ln2_w, ln2_b;  // ln2 undefined with a parallel residual; biases with RMSNorm
  Tensor wqkv, bqkv, wo, bo, w_in, b_in, w_out, b_out;  // biases undefined where the model has none
  int64_t n_qkv, n_o, n_in, n_out;  // outputs of each matmul (a packed weight's shape rounds them up)
};

// y = act(x w^T + bias), w plain (N, K) or packed (gemv_bf16.h's packed layout, 3-d)
Tensor matmul(const Tensor& x, const Tensor& w, int64_t n, const Tensor& bias, int64_t act) {
  return w.dim() == 3 ? cpugen_gemv::linear_packed(x, w, n, opt(bias), act) : cpugen_gemv::gemv(x, w, opt(bias), act);
}

class Stack {
 public:
  // blocks: per block [ln1_w, ln1_b, ln2_w, ln2_b, wqkv, bqkv, wo, bo, w_in, b_in, w_out, b_out],
  // None where absent, each weight plain or packed; outs: per block the outputs of wqkv, wo, w_in,
  // w_out. Holds references to the model's own tensors: no weight is copied.
  Stack(const std::vector<std::vector<Opt>>& blocks, const std::vector<std::vector<int64_t>>& outs,
        const std::string& norm, double eps, bool parallel, bool glu, int64_t act, int64_t nh, int64_t rd)
      : rms_(norm == "rmsnorm"), eps_(eps), parallel_(parallel), glu_(glu), act_(act), nh_(nh), rd_(rd) {
    TORCH_CHECK(norm == "rmsnorm" || norm == "layernorm", "cpugen decode_layer: unknown norm ", norm);
    TORCH_CHECK(act >= kNone && act <= kSilu, "cpugen decode_layer: unknown activation ", act);
    TORCH_CHECK(outs.size() == blocks.size(), "cpugen decode_layer: one list of outputs per block");
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto& b = blocks[i];
      TORCH_CHECK(b.size() == 12 && outs[i].size() == 4, "cpugen decode_layer: 12 tensors and 4 outputs a block");
      Block k;
      Tensor* slots[12] = {&k.ln1_w, &k.ln1_b, &k.ln2_w, &k.ln2_b, &k.wqkv, &k.bqkv,
                           &k.wo,    &k.bo,    &k.w_in,  &k.b_in,  &k.w_out, &k.b_out};
      for (int j = 0; j < 12; ++j) *slots[j] = defined_or_empty(b[j]);
      k.n_qkv = outs[i][0], k.n_o = outs[i][1], k.n_in = outs[i][2], k.n_out = outs[i][3];
      TORCH_CHECK(k.wqkv.defined() && k.wo.defined() && k.w_in.defined() && k.w_out.defined() && k.ln1_w.defined(),
                  "cpugen decode_layer: a block without its weights");
      TORCH_CHECK(parallel || k.ln2_w.defined(), "cpugen decode_layer: a sequential block needs its second norm");
      blocks_.push_back(std::move(k));
    }
  }

  // x (B, h) bf16, cos/sin (B, rd/2) fp32 (empty without rotary), the blocks' caches
  // (B, nkv, S_max, hd), index: this token's cache position -> x after every block (B, h)
  Tensor forward(Tensor x, const Tensor& cos, const Tensor& sin, std::vector<Tensor> k_caches,
                 std::vector<Tensor> v_caches, int64_t index) const {
    TORCH_CHECK(k_caches.size() == blocks_.size() && v_caches.size() == blocks_.size(),
                "cpugen decode_layer: one cache per block");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "cpugen decode_layer: x (B, h) bf16");
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& b = blocks_[i];
      const Tensor h = norm(x, b.ln1_w, b.ln1_b);
      const Tensor qkv = matmul(h, b.wqkv, b.n_qkv, b.bqkv, kNone);  // (B, (nh + 2 nkv) hd)
      const Tensor y = cpugen_attn::decode_step(qkv, cos, sin, k_caches[i], v_caches[i], index, nh_, rd_);
      const Tensor a = matmul(y, b.wo, b.n_o, b.bo, kNone);  // (B, h)
      if (parallel_) {
        x = at::add(at::add(x, a), mlp(b, h));
      } else {
        x = at::add(x, a);
        x = at::add(x, mlp(b, norm(x, b.ln2_w, b.ln2_b)));
      }
    }
    return x;
  }

  // wte (V, h); wpe (P, h) or none, read at pos + pos_offset; cos/sin tables (P, rd/2) fp32 or
  // none; the final norm; lm_w plain (n_vocab, h) or packed, lm_b or none
  void set_head(const Tensor& wte, const Opt& wpe, int64_t pos_offset, const Opt& cos, const Opt& sin,
                const Tensor& lnf_w, const Opt& lnf_b, const Tensor& lm_w, const Opt& lm_b, int64_t n_vocab) {
    TORCH_CHECK(wte.dim() == 2 && (lm_w.dim() == 2 || lm_w.dim() == 3), "cpugen decode_layer: a head needs wte and lm_head");
    TORCH_CHECK(cos.has_value() == sin.has_value() && cos.has_value() == (rd_ > 0),
                "cpugen decode_layer: rotary tables where the blocks rotate, none where they do not");
    head_ = Head{wte, defined_or_empty(wpe), defined_or_empty(cos), defined_or_empty(sin), lnf_w,
                 defined_or_empty(lnf_b), lm_w, defined_or_empty(lm_b), pos_offset, n_vocab};
    has_head_ = true;
  }

  // tokens, pos (B,) int64: each sequence's new token and its position -> logits (B, n_vocab)
  Tensor step(const Tensor& tokens, const Tensor& pos, std::vector<Tensor> k_caches, std::vector<Tensor> v_caches,
              int64_t index) const {
    TORCH_CHECK(has_head_, "cpugen decode_layer: step needs set_head first");
    TORCH_CHECK(tokens.dim() == 1 && pos.dim() == 1 && tokens.size(0) == pos.size(0), "cpugen decode_layer: tokens, pos (B,)");
    const Head& hd = head_;
    Tensor x = at::embedding(hd.wte, tokens);  // (B, h)
    if (hd.wpe.defined()) x = at::add(x, at::embedding(hd.wpe, at::add(pos, hd.pos_offset)));
    Tensor cos = empty_, sin = empty_;
    if (hd.cos.defined()) cos = at::index_select(hd.cos, 0, pos), sin = at::index_select(hd.sin, 0, pos);  // (B, rd/2)
    x = forward(x, cos, sin, std::move(k_caches), std::move(v_caches), index);
    return matmul(norm(x, hd.lnf_w, hd.lnf_b), hd.lm_w, hd.n_vocab, hd.lm_b, kNone);  // (B, n_vocab)
  }

  int64_t size() const { return static_cast<int64_t>(blocks_.size()); }

 private:
  Tensor norm(const Tensor& x, const Tensor& w, const Tensor& bias) const {  // as model.py's Norm
    if (!rms_) return at::layer_norm(x, {x.size(-1)}, w, bias, eps_);
    Tensor xf = x.to(at::kFloat);
    xf = xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps_);
    return w * xf.to(x.scalar_type());
  }

  Tensor mlp(const Block& b, const Tensor& h) const {
    if (!glu_) return matmul(matmul(h, b.w_in, b.n_in, b.b_in, act_), b.w_out, b.n_out, b.b_out, kNone);
    const Tensor gu = matmul(h, b.w_in, b.n_in, b.b_in, kNone);  // (B, 2 ffn): [gate; up]
    const auto halves = gu.chunk(2, -1);
    return matmul(activate(halves[0]) * halves[1], b.w_out, b.n_out, b.b_out, kNone);
  }

  Tensor activate(const Tensor& v) const {  // model.py's ACTIVATIONS
    switch (act_) {
      case kGeluTanh: return at::gelu(v, "tanh");
      case kGelu: return at::gelu(v);
      case kRelu: return at::relu(v);
      case kSilu: return at::silu(v);
      default: return v;
    }
  }

  std::vector<Block> blocks_;
  Head head_;
  bool has_head_ = false;
  Tensor empty_ = at::empty({0}, at::kFloat);
  bool rms_;
  double eps_;
  bool parallel_, glu_;
  int64_t act_, nh_, rd_;
};

}  // namespace cpugen_layer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<cpugen_layer::Stack>(m, "Stack")
      .def(py::init<const std::vector<std::vector<cpugen_layer::Opt>>&, const std::vector<std::vector<int64_t>>&,
                    const std::string&, double, bool, bool, int64_t, int64_t, int64_t>(),
           py::arg("blocks"), py::arg("outs"), py::arg("norm"), py::arg("eps"), py::arg("parallel"), py::arg("glu"), py::arg("act"),
           py::arg("nh"), py::arg("rd"))
      .def("forward", &cpugen_layer::Stack::forward, "x (B, h) through every block for one decode step",
           py::call_guard<py::gil_scoped_release>())
      .def("set_head", &cpugen_layer::Stack::set_head, "what a step does around the blocks", py::arg("wte"), py::arg("wpe"),
           py::arg("pos_offset"), py::arg("cos"), py::arg("sin"), py::arg("lnf_w"), py::arg("lnf_b"), py::arg("lm_w"),
           py::arg("lm_b"), py::arg("n_vocab"))
      .def("step", &cpugen_layer::Stack::step, "tokens, pos (B,) -> logits (B, V): a whole decode step",
           py::call_guard<py::gil_scoped_release>())
      .def("__len__", &cpugen_layer::Stack::size);
}

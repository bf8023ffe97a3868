"""The native decode stack (kernels/decode_layer.cpp): a whole decode step in one call, from the
tokens to the logits, over the model's own weights (plain or in cpugen's packed layout, no copy).

It is a second implementation of the model, so it fails closed: every ModelConfig field is listed
below as handled by the stack (with what it supports) or irrelevant to a decode step, a test fails
when a field is added without a place here, and `refusal()` names what a model needs that the
stack lacks, in which case `install()` gives no stack and the Python blocks run every step. The
record says what ran (`observed`), counted as the steps run, not re-derived.
"""

from __future__ import annotations

from collections import Counter

import torch

from cpugen.model.activations import KERNEL_CODE
from cpugen.model.config import ModelConfig
from cpugen.model.transformer import Linear, Norm, Transformer
from cpugen.runtime import native

# ModelConfig field -> how the stack handles it
HANDLED = {
    "vocab_size": "the embedding and lm_head shapes",
    "n_layer": "one entry per block",
    "n_embd": "the residual width",
    "n_head": "query heads of the decode step",
    "n_kv_head": "grouped-query attention: each kv head serves n_head / n_kv_head query heads",
    "head_dim": "decode attention: a multiple of 32, at most 256 (refused otherwise)",
    "intermediate_size": "the MLP's matrix shapes",
    "max_positions": "the position tables' rows",
    "norm": "layernorm or rmsnorm (kernels/norm.h)",
    "norm_eps": "passed to the norms",
    "activation": "every name of the activation table (kernels/vec_math.h)",
    "mlp": "plain or glu",
    "parallel_residual": "GPT-J's parallel block or the sequential one",
    "position": "rotary (the model's cos/sin tables) or learned (the model's wpe)",
    "position_offset": "OPT's learned positions' offset",
    "rotary_dim": "partial rotary: the first rotary_dim dims, half-split pairs",
    "rope_theta": "in the cos/sin tables the model computes and hands over",
    "rope_scaling": "in the cos/sin tables the model computes and hands over",
    "sliding_window": "a step whose context passes the window has a mask, and masked steps take the Python blocks",
    "qkv_bias": "biases go to the matmuls' epilogue",
    "out_bias": "biases go to the matmuls' epilogue",
    "mlp_bias": "biases go to the matmuls' epilogue",
    "lm_head_bias": "biases go to the matmuls' epilogue",
    "tie_embeddings": "the lm_head's weight is whatever tensor the model's lm_head holds",
}
IRRELEVANT = {
    "name": "a label",
    "family": "how checkpoint tensors are named",
    "source": "a label",
    "rope_interleaved": "checkpoints that rotate interleaved pairs have their q/k rows permuted at load",
    "bos_token_id": "sampling and prompts",
    "eos_token_id": "sampling and prompts",
    "pad_token_id": "sampling and prompts",
}
NORMS = ("layernorm", "rmsnorm")
MLPS = ("plain", "glu")
POSITIONS = ("rotary", "learned")
ANY_BATCH = 1 << 20  # the stack's rows where every weight is packed
# the tensors of one block, in the order kernels/decode_layer.cpp's Stack takes them
BLOCK_TENSORS = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "wqkv.weight", "wqkv.bias",
                 "wo.weight", "wo.bias", "w_in.weight", "w_in.bias", "w_out.weight", "w_out.bias")


def attention_supported(head_dim: int) -> bool:
    """What kernels/decode_attention.h takes."""
    return head_dim % 32 == 0 and head_dim <= 256


def refusal(cfg: ModelConfig) -> str | None:
    """Why the stack cannot run this model, or None."""
    if not attention_supported(cfg.head_dim):
        return f"head_dim {cfg.head_dim} (decode attention takes multiples of 32 up to 256)"
    for field, value, allowed in (("norm", cfg.norm, NORMS), ("mlp", cfg.mlp, MLPS),
                                  ("position", cfg.position, POSITIONS),
                                  ("activation", cfg.activation, tuple(a for a in KERNEL_CODE if a))):
        if value not in allowed:
            return f"{field} {value!r}"
    if cfg.position == "rotary" and not (0 < cfg.rotary_dim <= cfg.head_dim and cfg.rotary_dim % 2 == 0):
        return f"rotary_dim {cfg.rotary_dim}"
    return None


def _modules_ready(model: Transformer) -> str | None:
    """Why the model's modules are not what the stack reads (a backend replaced one), or None."""
    native_impl = lambda f: getattr(f, "runs_native_kernel", False)  # noqa: E731 - eager.py's NativeNorm / NativeGlu
    head = model.lm_head
    mats = [head, *(m for b in model.blocks for m in (b.attn.wqkv, b.attn.wo, b.mlp.w_in, b.mlp.w_out))]
    if any(type(m) is not Linear or (m.weight is None and m.panels is None) for m in mats):
        return "a matmul that is not a plain or packed cpugen Linear"
    norms = [model.ln_f, *(n for b in model.blocks for n in (b.ln_1, b.ln_2) if n is not None)]
    if any(type(n) is not Norm or not native_impl(n.impl) for n in norms):
        return "a norm without the native kernel"
    if any(b.mlp.glu and not native_impl(b.mlp.product) for b in model.blocks):
        return "a GLU product without the native kernel"
    return None


def _block_tensors(block) -> dict[str, torch.Tensor | None]:
    t = {"ln_1.weight": block.ln_1.weight, "ln_1.bias": block.ln_1.bias,
         "ln_2.weight": block.ln_2.weight if block.ln_2 is not None else None,
         "ln_2.bias": block.ln_2.bias if block.ln_2 is not None else None}
    for name, m in (("wqkv", block.attn.wqkv), ("wo", block.attn.wo), ("w_in", block.mlp.w_in),
                    ("w_out", block.mlp.w_out)):
        t[f"{name}.weight"], t[f"{name}.bias"] = (m.weight if m.panels is None else m.panels), m.bias
    return t


def install(model: Transformer) -> bool:
    """Gives the model a decode stack; False (the model keeps its Python blocks, and
    `model.stack_refused` says why) where the model needs what the stack lacks, its modules are
    not the stack's, or the stack does not build."""
    cfg = model.cfg
    why = refusal(cfg) or _split(model) or _modules_ready(model)
    isa = native.level()
    if why is None and isa is None:
        why = "the CPU lacks AVX2 and FMA"
    if why is None and native.extension("decode_layer") is None:
        why = f"the native stack is unavailable ({native.why_not('decode_layer')})"
    model.stack_refused = why
    if why is not None:
        return False
    blocks, outs = [], []
    for b in model.blocks:
        t = _block_tensors(b)
        blocks.append([t[k] for k in BLOCK_TENSORS])
        outs.append([m.out_features for m in (b.attn.wqkv, b.attn.wo, b.mlp.w_in, b.mlp.w_out)])
    ext = native.extension("decode_layer")
    model.decode_stack = ext.Stack(blocks, outs, cfg.norm, cfg.norm_eps, cfg.parallel_residual, cfg.mlp == "glu",
                                   KERNEL_CODE[cfg.activation], cfg.n_head,
                                   cfg.rotary_dim if cfg.position == "rotary" else 0, isa)
    reduce = model.blocks[0].reduce
    if reduce is not None:  # tensor parallel: the all-reduce between the row-parallel matmuls
        model.decode_stack.set_reduce(reduce)
    head = model.lm_head
    every = [*(m for b in model.blocks for m in (b.attn.wqkv, b.attn.wo, b.mlp.w_in, b.mlp.w_out)), head]
    model.decode_stack_rows = ANY_BATCH if all(m.panels is not None for m in every) else min(m.kernel_rows for m in every)
    rope = model.rotary
    model.decode_stack.set_head(model.wte.weight, model.wpe.weight if model.wpe is not None else None,
                                cfg.position_offset, rope.cos if rope else None, rope.sin if rope else None,
                                model.ln_f.weight, model.ln_f.bias,
                                head.weight if head.panels is None else head.panels, head.bias, head.out_features)
    return True


def _split(model: Transformer) -> str | None:
    """A tensor-parallel rank's model: the stack calls one all-reduce for every block (they share
    the group's), where the Python blocks call Block.reduce; the logits' gather stays in Python."""
    if any(b.reduce != model.blocks[0].reduce for b in model.blocks):
        return "tensor parallel: blocks with different all-reduces"
    if (model.blocks[0].reduce is None) != (model.gather is None):
        return "tensor parallel: a model with its logits gathered but no all-reduce between blocks, or the reverse"
    return None


def drop(model: Transformer):
    """Removes the stack (it holds references to the weights it was built on)."""
    model.decode_stack = None
    model.decode_stack_rows = 0


def observed(counts: Counter) -> str:
    """How the decode steps ran, from the model's counts of the steps each path took."""
    stack, python = counts.get("native-stack", 0), counts.get("python", 0)
    if stack and python:
        return f"mixed: native-stack {stack}, python {python} steps"
    return "native-stack" if stack else "python"

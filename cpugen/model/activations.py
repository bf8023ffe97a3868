"""The one activation table: each name a config may give, its torch function, and its code in the
native kernels' epilogue (kernels/vec_math.h, enum Act; code 0 is no activation)."""

import torch.nn.functional as F

# name -> (torch function, kernel code)
TABLE = {
    "gelu_new": (lambda x: F.gelu(x, approximate="tanh"), 1),  # kGeluTanh
    "gelu": (F.gelu, 2),  # kGelu
    "relu": (F.relu, 3),  # kRelu
    "silu": (F.silu, 4),  # kSilu
}
NAMES = tuple(TABLE)
TORCH = {name: fn for name, (fn, _) in TABLE.items()}
KERNEL_CODE = {None: 0, **{name: code for name, (_, code) in TABLE.items()}}
# Hugging Face's names for the same functions
HF_ALIASES = {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}

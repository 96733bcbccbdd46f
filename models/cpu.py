"""Make a model fast on MLX's CPU backend (Linux without a GPU).

On the CPU, MLX's quantized matmuls and half-precision math run far slower
than float32 matmuls through OpenBLAS (see mlx_cache.backend). When a model is
small enough, its weights are expanded to float32 once at load: more memory,
much faster prompt processing. Metal and CUDA keep the weights as they are.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_cache.memory import available_system_memory


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def _float32(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.QuantizedLinear):
        w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
        has_bias = "bias" in module
        out = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        out.weight = w.astype(mx.float32)
        if has_bias:
            out.bias = module.bias.astype(mx.float32)
        return out
    if isinstance(module, nn.QuantizedEmbedding):
        w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
        out = nn.Embedding(w.shape[0], w.shape[1])
        out.weight = w.astype(mx.float32)
        return out
    return module


def expand_for_cpu(model: nn.Module, parameters: int) -> bool:
    """Expand quantized/half weights to float32 on the CPU if they fit; returns True if done.

    Set KVCHAT_CPU_FLOAT32=0 to keep the stored precision.
    """
    if not on_cpu() or os.environ.get("KVCHAT_CPU_FLOAT32") == "0":
        return False
    if parameters * 4 > available_system_memory() // 3:
        return False  # too big to expand comfortably: keep it compact
    replaced = [
        (name, _float32(m))
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    ]
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    floats = [(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())
              if v.dtype in (mx.float16, mx.bfloat16)]
    if floats:
        model.update(tree_unflatten(floats))
    mx.eval(model.parameters())
    return bool(replaced or floats)

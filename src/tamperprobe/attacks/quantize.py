"""Quantization and precision attacks (weight-only; work on TorchScript and torch.export modules too).

``dynamic-int8`` holds DynamicQuantizedLinear modules: it runs and evaluates like any module and
can be written as TorchScript (trace), not as torch.export or safetensors. It needs a plain
nn.Module (not TorchScript / torch.export). Its activation scales are computed per call from
the whole batch, so its logits depend on how inputs are batched (compare runs with the same
batching).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .._torch import quiet
from ..errors import UsageError
from .base import Attack, Context, float_parameters, is_script


def fake_int8(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Symmetric int8 fake-quantization: scale = max|w| / 127 (per tensor or per output channel), w <- round(w / scale) * scale."""
    w = t.detach()
    if per_channel and w.dim() >= 2:
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    else:
        amax = w.abs().max()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return (torch.round(w / scale).clamp(-127, 127) * scale).to(w.dtype)


class Int8(Attack):
    """Per-tensor symmetric int8 fake-quantization of every weight matrix / kernel (dim >= 2; bias=true adds the 1-D parameters)."""

    name = "int8"
    per_channel: ClassVar[bool] = False

    def __init__(self, *, bias: bool = False) -> None:
        self.bias = bias

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        with torch.no_grad():
            for _, t in float_parameters(model, matrices_only=not self.bias):
                t.copy_(fake_int8(t, self.per_channel))
        return model


class Int8Channel(Int8):
    """Per-output-channel symmetric int8 fake-quantization of every weight (one scale per row of dim 0)."""

    name = "int8-channel"
    per_channel = True


class DynamicInt8(Attack):
    """torch.ao.quantization.quantize_dynamic on every nn.Linear (int8 weights, dynamically quantized activations)."""

    name = "dynamic-int8"
    torchscript_only = True

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        if is_script(model) or not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise UsageError("dynamic-int8 needs an nn.Module with nn.Linear layers (not TorchScript or torch.export); try --kind int8")
        engines = torch.backends.quantized.supported_engines
        if torch.backends.quantized.engine == "none" and engines:
            torch.backends.quantized.engine = next(e for e in engines if e != "none")
        with quiet():
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)


class FP16(Attack):
    """Round every floating-point parameter through float16."""

    name = "fp16"
    dtype: ClassVar[torch.dtype] = torch.float16

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        with torch.no_grad():
            for _, t in float_parameters(model):
                t.copy_(t.to(self.dtype).to(t.dtype))
        return model


class BF16(FP16):
    """Round every floating-point parameter through bfloat16."""

    name = "bf16"
    dtype = torch.bfloat16

"""Quantization and precision attacks (weight-only; work on TorchScript and torch.export modules too).

``int8``: per-tensor symmetric fake-quantization of every weight matrix / kernel (dim >= 2;
``bias=true`` adds the 1-D parameters): scale = max|w| / 127, w <- round(w / scale) * scale.
``int8-channel``: the same with one scale per output channel (dim 0).
``dynamic-int8``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (int8
weights, dynamically quantized activations). The result holds DynamicQuantizedLinear
modules: it runs and evaluates like any module and can be written as TorchScript (trace),
not as torch.export or safetensors. Needs a plain nn.Module (not TorchScript / torch.export).
Its activation scales are computed per call from the whole batch, so its logits depend on
how inputs are batched (compare runs with the same batching).
``fp16`` / ``bf16``: every floating-point parameter rounded through half / bfloat16 precision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .base import Attack, Context, float_parameters, is_script, quiet, register


def fake_int8(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    w = t.detach()
    if per_channel and w.dim() >= 2:
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    else:
        amax = w.abs().max()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return (torch.round(w / scale).clamp(-127, 127) * scale).to(w.dtype)


class _Int8(Attack):
    per_channel = False
    defaults = {"bias": False}

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        with torch.no_grad():
            for _, t in float_parameters(model, matrices_only=not p["bias"]):
                t.copy_(fake_int8(t, self.per_channel))
        return model


@register
class Int8(_Int8):
    name = "int8"
    summary = "per-tensor symmetric int8 fake-quantization of every weight"


@register
class Int8Channel(_Int8):
    name = "int8-channel"
    summary = "per-output-channel symmetric int8 fake-quantization of every weight"
    per_channel = True


@register
class DynamicInt8(Attack):
    name = "dynamic-int8"
    summary = "torch.ao.quantization.quantize_dynamic on nn.Linear (int8 weights and activations)"
    defaults: dict[str, Any] = {}

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        if is_script(model) or not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise UsageError("dynamic-int8 needs an nn.Module with nn.Linear layers (not TorchScript or torch.export); try --kind int8")
        engines = torch.backends.quantized.supported_engines
        if torch.backends.quantized.engine == "none" and engines:
            torch.backends.quantized.engine = next(e for e in engines if e != "none")
        with quiet():
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)


class _Cast(Attack):
    dtype: torch.dtype = torch.float16
    defaults: dict[str, Any] = {}

    def apply(self, model: nn.Module, ctx: Context, p: dict[str, Any]) -> nn.Module:
        with torch.no_grad():
            for _, t in float_parameters(model):
                t.copy_(t.to(self.dtype).to(t.dtype))
        return model


@register
class FP16(_Cast):
    name = "fp16"
    summary = "round every parameter through float16"
    dtype = torch.float16


@register
class BF16(_Cast):
    name = "bf16"
    summary = "round every parameter through bfloat16"
    dtype = torch.bfloat16

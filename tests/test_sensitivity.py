"""Batched sensitivity against the per-class autograd reference, on every computation path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tamperprobe.errors import UsageError
from tamperprobe.models import ExportedModel, Model, OnnxModel, ScriptedModel, TorchModel
from tamperprobe.owner.sensitivity import activations, naive_sensitivity, resolve_params, sensitivity

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RTOL = 1e-5
GRAD_RTOL = 1e-4


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 7)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 10), nn.Softplus(), nn.Linear(10, 5)
    ).eval()


class _Scaled(nn.Module):
    """The last Linear's output is not the model output: the closed form must not apply."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 9), nn.ReLU())
        self.head = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.head(self.body(x)) + 0.5


BUILDERS = {"mlp": _mlp, "cnn": _cnn}
LAST = {"mlp": ["5.weight", "5.bias"], "cnn": ["6.weight", "6.bias"]}


def _x(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32))


def _compare(model: Model, ref_model: Model, params: list[str], ref_params: list[str], output: str, path: str = "auto") -> None:
    x1 = _x().requires_grad_(True)
    s = sensitivity(model, x1, params, output, path=path)
    (g,) = torch.autograd.grad(s.sum(), x1)
    x2 = _x().requires_grad_(True)
    ref = naive_sensitivity(ref_model, x2, ref_params, output)
    (g_ref,) = torch.autograd.grad(ref.sum(), x2)
    assert s.shape == (5,)
    assert torch.all(ref > 0)
    torch.testing.assert_close(s, ref, rtol=RTOL, atol=0.0)
    if float(g_ref.norm()) == 0.0:  # S does not depend on x (logits, bias only: S = classes)
        assert float(g.norm()) == 0.0
    else:
        assert float((g - g_ref).norm() / g_ref.norm()) < GRAD_RTOL


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("output", ["softmax", "logits"])
@pytest.mark.parametrize("path", ["closed", "func", "loop"])
def test_last_layer_matches_naive(arch: str, output: str, path: str) -> None:
    m = TorchModel(BUILDERS[arch](), arch)
    params = resolve_params(m.module, None)
    assert params == LAST[arch]
    _compare(m, m, params, params, output, path)


@pytest.mark.parametrize("leaf", ["weight", "bias"])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_closed_form_weight_only_or_bias_only(leaf: str, output: str) -> None:
    m = TorchModel(_mlp(), "mlp")
    _compare(m, m, [f"5.{leaf}"], [f"5.{leaf}"], output, "closed")


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_inner_layers_use_torch_func(arch: str, output: str) -> None:
    m = TorchModel(BUILDERS[arch](), arch)
    params = ["1.weight", "5.bias"] if arch == "mlp" else ["0.weight", "0.bias", "4.weight"]
    with pytest.raises(UsageError):
        sensitivity(m, _x(), params, output, path="closed")
    _compare(m, m, params, params, output, "auto")
    _compare(m, m, params, params, output, "loop")


def test_closed_form_refused_when_output_is_transformed() -> None:
    m = TorchModel(_Scaled().eval(), "scaled")
    params = resolve_params(m.module, None)
    assert params == ["head.weight", "head.bias"]
    with pytest.raises(UsageError):
        sensitivity(m, _x(), params, "softmax", path="closed")
    for output in ("softmax", "logits"):
        _compare(m, m, params, params, output, "auto")


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_torchscript_copy_uses_the_loop(arch: str, output: str) -> None:
    module = BUILDERS[arch]()
    traced = torch.jit.trace(module, _x(2), check_trace=False)
    ts = ScriptedModel(traced, "ts")
    params = resolve_params(traced, None)
    assert params == LAST[arch]
    assert not ts.functional
    _compare(ts, TorchModel(module, arch), params, params, output)
    with pytest.raises(UsageError):
        sensitivity(ts, _x(), params, output, path="func")


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_export_copy_uses_torch_func(arch: str, output: str) -> None:
    module = BUILDERS[arch]()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(module, (_x(2),), dynamic_shapes=({0: batch},)).module()
    ex = ExportedModel(exported, "ep")
    params = resolve_params(exported, None)
    assert params == LAST[arch]
    _compare(ex, TorchModel(module, arch), params, params, output)


def test_frozen_torchscript_parameters_are_restored() -> None:
    module = _mlp()
    for p in module.parameters():
        p.requires_grad_(False)
    traced = torch.jit.trace(module, _x(2), check_trace=False)
    ts = ScriptedModel(traced, "ts")
    s = sensitivity(ts, _x(), ["5.weight"], "softmax")
    assert torch.all(s > 0)
    assert not any(p.requires_grad for p in traced.parameters())


def test_resolve_params_errors_and_fallback() -> None:
    m = _mlp()
    with pytest.raises(UsageError, match="valid names are"):
        resolve_params(m, ["nope.weight"])
    with pytest.raises(UsageError):
        resolve_params(m, [])
    assert resolve_params(m, ["1.weight", "1.weight"]) == ["1.weight"]
    no_bias = nn.Sequential(nn.Flatten(), nn.Linear(64, 3, bias=False))
    assert resolve_params(no_bias, None) == ["1.weight"]
    with pytest.raises(UsageError):
        resolve_params(nn.Sequential(nn.ReLU()), None)


def test_bad_output_and_onnx_are_usage_errors() -> None:
    m = TorchModel(_mlp(), "mlp")
    with pytest.raises(UsageError):
        sensitivity(m, _x(), ["5.weight"], "probabilities")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        sensitivity(OnnxModel(object(), "m.onnx"), _x(), ["5.weight"])


def test_activations_default_layer_and_named_layer() -> None:
    m = TorchModel(_cnn(), "cnn")
    x = _x(7).numpy()
    acts = activations(m, x)
    assert acts.shape == (7, 10)  # input of the last Linear: the Softplus output
    with torch.no_grad():
        expect = m.module[:6](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(acts, expect, rtol=1e-6)
    conv = activations(m, x, "1", batch_size=3)
    assert conv.shape == (7, 3 * 6 * 6)
    with pytest.raises(UsageError, match="valid names"):
        activations(m, x, "nope")


def test_activations_without_hookable_layers_is_a_usage_error() -> None:
    module = _mlp()
    traced = torch.jit.trace(module, _x(2), check_trace=False)
    with pytest.raises(UsageError, match="--select random"):
        activations(ScriptedModel(traced, "ts"), _x().numpy())
    exported = torch.export.export(module, (_x(2),), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},)).module()
    with pytest.raises(UsageError, match="--select random"):
        activations(ExportedModel(exported, "ep"), _x().numpy())

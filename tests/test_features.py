"""What MANC covers (``owner.features``) on every format, and the one forward-hook helper (``_torch.recording``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tamperprobe._torch import layer_activations, only_call, recording
from tamperprobe.errors import UsageError
from tamperprobe.models import ExportedModel, Model, ScriptedModel, TorchModel, load_model, save_model
from tamperprobe.owner.features import activations as features_activations
from tamperprobe.owner.features import coverage, penultimate, pooled_map
from tamperprobe.owner.methods.base import Bag
from tamperprobe.owner.selection import manc, select

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _x(n: int = 5, seed: int = 0, side: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, side, side), dtype=np.float32)


def _cnn() -> nn.Module:
    """Conv, max pool, flatten, a hidden layer: the output layer reads a fully connected layer, not a pooled map."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 10), nn.Softplus(), nn.Linear(10, 5)
    ).eval()


class _Pooled(nn.Module):
    """Two conv blocks, a functional ReLU, global pooling (mean or max) and one linear layer: a ResNet's head."""

    def __init__(self, pool: str = "mean", hidden: bool = False) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.pool, self.hidden = pool, hidden
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 6)
        self.linear = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        h = out.mean((2, 3)) if self.pool == "mean" else torch.amax(out, dim=(2, 3))
        if self.hidden:  # a hidden layer after the pool: the output layer no longer reads pooled features
            h = torch.relu(self.fc(h))
        return self.linear(h)

    def relu_map(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = torch.relu(self.conv2(torch.relu(self.conv1(torch.from_numpy(x)))))
        return out.reshape(len(x), -1).numpy()


class _Tokens(nn.Module):
    """Channels last: (batch, tokens, width) averaged over the tokens, as a vision transformer's mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.embed = nn.Linear(8, 5)
        self.linear = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu(self.embed(x.reshape(x.shape[0], 8, 8))).mean(1))


def _as(fmt: str, module: nn.Module, example: np.ndarray, tmp: Path | None = None) -> Model:
    ex = torch.from_numpy(example[:2])
    if fmt == "module":
        return TorchModel(module, "module")
    if fmt == "torchscript":
        return ScriptedModel(torch.jit.trace(module, ex, check_trace=False), "ts")
    if fmt == "export":
        batch = torch.export.Dim("batch", min=1, max=4096)
        return ExportedModel(torch.export.export(module, (ex,), dynamic_shapes=({0: batch},)).module(), "ep")
    assert tmp is not None
    path = tmp / "m.onnx"
    save_model(module, path, example)
    return load_model(path)


FORMATS = ("module", "torchscript", "export", "onnx")


# ---------------------------------------------------------------------------- the default rule


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooled_output_layer_covers_the_map_it_pools_on_every_format(fmt: str, pool: str, tmp_path: Path) -> None:
    module = _Pooled(pool).eval()
    x = _x(11)
    found = coverage(_as(fmt, module, x, tmp_path), x, batch_size=4)
    assert found.values.shape == (11, 6 * 8 * 8) and "6×8×8" in found.what
    np.testing.assert_allclose(found.values, module.relu_map(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_layer_reading_a_hidden_layer_keeps_its_input(fmt: str, tmp_path: Path) -> None:
    """A pooled map followed by a hidden layer, and a flattened map with a hidden layer: the rule keeps ``h``."""
    for module in (_Pooled("mean", hidden=True).eval(), _cnn()):
        x = _x(7)
        found = coverage(_as(fmt, module, x, tmp_path), x)
        h = penultimate(TorchModel(module, "m"), x)
        assert h is not None and found.values.shape == h.shape and "output layer's input" in found.what
        np.testing.assert_allclose(found.values, h, rtol=1e-5, atol=1e-6)


def test_channels_last_pooling_is_recognised() -> None:
    module = _Tokens().eval()
    x = _x(6)
    found = coverage(TorchModel(module, "tokens"), x)
    with torch.no_grad():
        tokens = torch.relu(module.embed(torch.from_numpy(x).reshape(6, 8, 8))).numpy()  # (6, 8 tokens, 5)
    np.testing.assert_allclose(found.values, np.moveaxis(tokens, 1, 2).reshape(6, -1), rtol=1e-6)


def test_pooled_map_needs_the_numbers_to_agree() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((4, 3, 2, 2)).astype(np.float32)
    assert pooled_map(a, a.mean((2, 3))) is not None
    assert pooled_map(a, a.max((2, 3))) is not None
    assert pooled_map(a, a.mean((2, 3)) * 1.01) is None  # off by 1 %
    assert pooled_map(a, a.mean((2, 3))[:, :2]) is None  # other width
    assert pooled_map(a[:, :, :1, :1], a[:, :, 0, 0]) is None  # no spatial extent left


def test_select_manc_covers_the_pooled_map() -> None:
    module = _Pooled().eval()
    model, x = TorchModel(module, "pooled"), _x(12)
    idx = select("manc", model, Bag(x, x.copy(), None), 5, np.random.default_rng(3))
    assert idx.tolist() == manc(module.relu_map(x), 5, np.random.default_rng(3)).tolist()


# ---------------------------------------------------------------------------- named layers and errors


def test_activations_default_layer_and_named_layer() -> None:
    m = TorchModel(_cnn(), "cnn")
    x = _x(7)
    acts = features_activations(m, x)
    assert acts.shape == (7, 10)  # input of the last Linear: the Softplus output
    with torch.no_grad():
        expect = m.module[:6](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(acts, expect, rtol=1e-6)
    conv = features_activations(m, x, "1", batch_size=3)
    assert conv.shape == (7, 3 * 6 * 6)
    with pytest.raises(UsageError, match="valid names"):
        features_activations(m, x, "nope")


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_named_layer_needs_hooks(fmt: str) -> None:
    module = _cnn()
    x = _x(23)
    model = _as(fmt, module, x)  # one trace or export for both calls
    got = features_activations(model, x, batch_size=9)
    np.testing.assert_allclose(got, features_activations(TorchModel(module, "cnn"), x), rtol=1e-6, atol=1e-7)
    with pytest.raises(UsageError, match="--select random"):
        features_activations(model, x, "1")


def test_onnx_named_tensor_and_unknown_name(tmp_path: Path) -> None:
    module = _Pooled().eval()
    x = _x(5)
    model = _as("onnx", module, x, tmp_path)
    h = penultimate(model, x)
    expect = penultimate(TorchModel(module, "m"), x)
    assert h is not None and expect is not None
    np.testing.assert_allclose(h, expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="unknown layer 'nope'.*--select random"):
        coverage(model, x, "nope")


class _Scaled(nn.Module):
    """The last Linear's output is not the model output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 9), nn.ReLU())
        self.head = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.head(self.body(x)) + 0.5


def test_without_a_linear_output_or_hooks_is_a_usage_error() -> None:
    module = _Scaled().eval()
    x = _x()
    with torch.no_grad():
        body = module.body(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(features_activations(TorchModel(module, "scaled"), x), body, rtol=1e-6)  # the input of the last nn.Linear
    with pytest.raises(UsageError, match="--select random"):
        features_activations(_as("torchscript", module, x), x)


# ---------------------------------------------------------------------------- the one hook helper


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh())
        self.head = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.head(self.body(x))))


def test_recording_reads_inputs_and_outputs_with_one_rule() -> None:
    module = _Twice().eval()
    x = torch.from_numpy(_x(3))
    with recording(module.body[1], "output") as out, recording(module.body[1], "input") as inp, torch.no_grad():
        module(x)
    assert len(out) == len(inp) == 1
    torch.testing.assert_close(only_call(inp, 3), x.reshape(3, -1))
    torch.testing.assert_close(only_call(out, 3), module.body[1](x.reshape(3, -1)))
    assert only_call(out, 4) is None  # not this batch
    with recording(module.head, "input") as seen, torch.no_grad():
        module(x)
    assert len(seen) == 2 and only_call(seen, 3) is None  # two calls: no single activation per sample
    assert not module.head._forward_pre_hooks and not module.body[1]._forward_hooks  # removed afterwards


def test_layer_activations_refuse_a_layer_run_twice() -> None:
    module = _Twice().eval()
    with pytest.raises(UsageError, match="once per forward pass"):
        layer_activations(module, _x(3), "head")
    assert layer_activations(module, _x(3), "body.1").shape == (3, 6)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_select_manc_picks_the_same_markers_on_every_format(fmt: str, tmp_path: Path) -> None:
    module = _Pooled().eval()
    x = _x(12)
    bag = Bag(x, x.copy(), None)
    expect = select("manc", TorchModel(module, "pooled"), bag, 5, np.random.default_rng(4))
    assert select("manc", _as(fmt, module, x, tmp_path), bag, 5, np.random.default_rng(4)).tolist() == expect.tolist()

"""Sensitivity against the float64 per-class autograd reference, on every model format and route.

The reference (``naive_sensitivity``) runs a float64 copy of the model with one backward per
sample and class; it is itself checked against mpmath. The decisive cases are *confident*
inputs of a trained model (top probability > 0.9999), where a float32 closed form cancels.
"""

from __future__ import annotations

import copy

import mpmath
import numpy as np
import pytest
import torch
from torch import nn

from tamperprobe.errors import UsageError
from tamperprobe.models import ExportedModel, Model, OnnxModel, ScriptedModel, TorchModel
from tamperprobe.owner import sensitivity as sens
from tamperprobe.owner.features import penultimate
from tamperprobe.owner.sensitivity import (
    jacobian_norm,
    naive_sensitivity,
    resolve_params,
    sensitivity,
    sensitivity_and_grad,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RTOL = 1e-5  # float32 models against the float64 reference
RTOL64 = 1e-9  # float64 models: the algorithm itself


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 7)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 10), nn.Softplus(), nn.Linear(10, 5)
    ).eval()


class _Scaled(nn.Module):
    """The last Linear's output is not the model output: the output-layer route must not apply."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 9), nn.ReLU())
        self.head = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.head(self.body(x)) + 0.5


BUILDERS = {"mlp": _mlp, "cnn": _cnn}
LAST = {"mlp": ["5.weight", "5.bias"], "cnn": ["6.weight", "6.bias"]}
INNER = {"mlp": ["1.weight", "5.bias"], "cnn": ["0.weight", "0.bias", "4.weight"]}
FORMATS = ("module", "torchscript", "export")


def _x(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32))


def _as(fmt: str, module: nn.Module, example: torch.Tensor) -> Model:
    """``module`` in the given format (TorchScript by tracing, torch.export with a dynamic batch)."""
    if fmt == "module":
        return TorchModel(module, "module")
    if fmt == "torchscript":
        return ScriptedModel(torch.jit.trace(module, example[:2], check_trace=False), "ts")
    batch = torch.export.Dim("batch", min=1, max=4096)
    return ExportedModel(torch.export.export(module, (example[:2],), dynamic_shapes=({0: batch},)).module(), "ep")


def _reference(module: nn.Module, x: torch.Tensor, params: list[str], output: str) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_(True)
    ref = naive_sensitivity(TorchModel(module, "ref"), xr, params, output)  # type: ignore[arg-type]
    (g,) = torch.autograd.grad(ref.sum(), xr, allow_unused=True)
    return ref.detach(), torch.zeros_like(xr) if g is None else g


class _Shared:
    """Models in each format and float64 references, made once per module and kept by name.

    ``torch.export`` and the per-sample, per-class reference are most of this module's work, and each is the same
    for every parametrized case that asks for it: the cases differ in what they compare, not in these. Sharing is
    sound because nothing here modifies a model (``test_frozen_torchscript_parameters_are_restored`` checks that
    the routes put the parameters' flags back) and the cached tensors are never written to.
    """

    def __init__(self) -> None:
        self.modules: dict[str, nn.Module] = {}
        self.models: dict[tuple[str, str], Model] = {}
        self.refs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def module(self, arch: str) -> nn.Module:
        """The small model ``arch`` of BUILDERS (seeded: the same weights a fresh build has)."""
        if arch not in self.modules:
            self.modules[arch] = BUILDERS[arch]()
        return self.modules[arch]

    def model(self, name: str, fmt: str, module: nn.Module, example: torch.Tensor) -> Model:
        if (name, fmt) not in self.models:
            self.models[(name, fmt)] = _as(fmt, module, example)
        return self.models[(name, fmt)]

    def reference(self, name: str, module: nn.Module, x: torch.Tensor, params: list[str], output: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``_reference`` of ``module`` (kept as ``name``) on ``x``, keyed by the inputs' bytes too."""
        key = (name, x.dtype, tuple(x.shape), x.numpy().tobytes(), tuple(params), output)
        if key not in self.refs:
            self.refs[key] = _reference(module, x, params, output)
        return self.refs[key]


@pytest.fixture(scope="module")
def shared() -> _Shared:
    return _Shared()


def _compare(
    model: Model,
    ref_module: nn.Module,
    x: torch.Tensor,
    params: list[str],
    output: str,
    rtol: float = RTOL,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """S and dS/dx of both entry points against the reference (``reference``: already computed for these arguments):
    S per sample, the gradient over the batch."""
    ref, g_ref = _reference(ref_module, x, params, output) if reference is None else reference
    assert torch.all(ref > 0)
    s, g = sensitivity_and_grad(model, x, params, output)  # type: ignore[arg-type]
    xd = x.clone().requires_grad_(True)
    s_diff = sensitivity(model, xd, params, output)  # type: ignore[arg-type]
    (g_diff,) = torch.autograd.grad(s_diff.sum(), xd, allow_unused=True)
    g_diff = torch.zeros_like(xd) if g_diff is None else g_diff
    for value, grad in ((s, g), (s_diff.detach(), g_diff)):
        assert value.shape == (x.shape[0],) and value.dtype == torch.float64
        assert float(((value - ref).abs() / ref).max()) < rtol
        if float(g_ref.norm()) == 0.0:  # S does not depend on x (logits, bias only: S = classes)
            assert float(grad.norm()) == 0.0
        else:
            assert float((grad.double() - g_ref.double()).norm() / g_ref.double().norm()) < rtol


# ---------------------------------------------------------------------------- the reference and ||J||^2


def _mp_jacobian_norm(z: list) -> mpmath.mpf:
    zs = [mpmath.mpf(v) for v in z]
    top = max(zs)
    e = [mpmath.exp(v - top) for v in zs]
    p = [v / sum(e) for v in e]
    return sum((p[i] * ((1 if i == k else 0) - p[k])) ** 2 for i in range(len(p)) for k in range(len(p)))


def test_jacobian_norm_is_exact_for_confident_logits() -> None:
    mpmath.mp.dps = 50
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=10) * scale for scale in (0.1, 1.0, 5.0, 20.0, 40.0) for _ in range(8)]
    rows += [np.array([30.0, 0.0, -1.0, 2.0]), np.array([0.0, -36.0, -37.0, -40.0, -80.0]), np.array([1.0, 1.0, 1.0])]
    z = torch.tensor(np.stack([np.pad(r, (0, 10 - len(r)), constant_values=-1e4) for r in rows]))
    got = jacobian_norm(z)
    assert got.dtype == torch.float64
    tops = torch.softmax(z, -1).max(-1).values
    assert bool((tops > 1 - 1e-12).any())  # some rows are far beyond float32's reach
    for row, value in zip(z.tolist(), got.tolist()):
        ref = _mp_jacobian_norm(row)
        assert abs(mpmath.mpf(value) - ref) <= 1e-13 * ref
    logits = jacobian_norm(z, "logits")
    assert torch.equal(logits, torch.full((len(rows),), 10.0, dtype=torch.float64))


def test_closed_form_gradient_of_the_jacobian_norm() -> None:
    """The output-layer node's backward: against autograd of the float64 norm, and mpmath at extreme logits."""
    mpmath.mp.dps = 60
    torch.manual_seed(0)
    for scale in (0.5, 3.0, 10.0, 25.0):
        z = (torch.randn(20, 10, dtype=torch.float64) * scale).requires_grad_(True)
        (ref,) = torch.autograd.grad(jacobian_norm(z).sum(), z)
        _, got = sens._softmax_norm(z.detach(), grad=True)
        assert got is not None
        assert float(((got - ref).norm(dim=1) / ref.norm(dim=1)).max()) < 1e-12
    z = torch.tensor([[30.0, 0.0, -1.0, 2.0, 5.0], [0.0, -20.0, -21.0, -25.0, -3.0]], dtype=torch.float64)
    _, got = sens._softmax_norm(z, grad=True)
    assert got is not None
    step = mpmath.mpf("1e-25")
    for b in range(2):
        for j in range(5):
            plus, minus = [mpmath.mpf(v) for v in z[b].tolist()], [mpmath.mpf(v) for v in z[b].tolist()]
            plus[j] += step
            minus[j] -= step
            ref = (_mp_jacobian_norm(plus) - _mp_jacobian_norm(minus)) / (2 * step)
            assert abs(mpmath.mpf(float(got[b, j])) - ref) <= 1e-12 * abs(ref)


def test_reference_is_exact_for_confident_inputs() -> None:
    """naive_sensitivity against mpmath on a linear model with confident outputs (S = ||J||^2 (||x||^2 + 1))."""
    mpmath.mp.dps = 50
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    with torch.no_grad():
        lin[1].weight.mul_(30.0)
    x = _x(6)
    s = naive_sensitivity(TorchModel(lin, "lin"), x, ["1.weight", "1.bias"]).detach()
    z = lin.double()(x.double()).detach()
    assert float(torch.softmax(z, -1).max(-1).values.max()) > 1 - 1e-8  # far beyond float32
    for b in range(6):
        h2 = sum(mpmath.mpf(v) ** 2 for v in x[b].double().flatten().tolist())
        ref = _mp_jacobian_norm(z[b].tolist()) * (h2 + 1)
        assert abs(mpmath.mpf(float(s[b])) - ref) <= 1e-12 * ref


# ---------------------------------------------------------------------------- trained, confident models


@pytest.fixture(scope="module")
def confident(trained_cnn, digits) -> torch.Tensor:
    """Inputs of the trained digits CNN: the 12 most confident (top probability > 0.9999) and 8 others."""
    x = torch.from_numpy(np.concatenate([digits[0].x, digits[1].x]).astype(np.float32))
    with torch.no_grad():
        z = trained_cnn(x).double()
    rest = -torch.expm1(torch.log_softmax(z, -1).max(-1).values)  # 1 - p_top
    order = torch.argsort(rest)
    picked = torch.cat([order[:12], order[len(order) // 2 :: len(order) // 16][:8]])
    assert float(rest[order[:12]].max()) < 1e-4  # top probability > 0.9999
    return x[picked]


@pytest.fixture(scope="module")
def trained64(trained_cnn) -> nn.Module:
    return copy.deepcopy(trained_cnn).double()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_trained_model_on_confident_inputs(trained_cnn, confident, shared, fmt: str, output: str) -> None:
    params = resolve_params(trained_cnn, None)
    assert params == ["head.3.weight", "head.3.bias"]
    ref = shared.reference("trained", trained_cnn, confident, params, output)
    _compare(shared.model("trained", fmt, trained_cnn, confident), trained_cnn, confident, params, output, reference=ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_trained_model_in_float64_is_exact(trained64, confident, shared, fmt: str) -> None:
    """In float64 the only error left is the algorithm's: far below the float32 tolerance."""
    x = confident.double()
    model = shared.model("trained64", fmt, trained64, x)
    for params in (["head.3.weight", "head.3.bias"], ["head.3.weight"], ["head.3.bias"], ["features.0.weight", "head.1.bias"]):
        ref = shared.reference("trained64", trained64, x, params, "softmax")
        _compare(model, trained64, x, params, "softmax", RTOL64, reference=ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_trained_model_inner_parameters(trained_cnn, confident, shared, fmt: str) -> None:
    params = ["features.0.weight", "head.1.bias"]
    ref = shared.reference("trained", trained_cnn, confident[:8], params, "softmax")
    _compare(shared.model("trained", fmt, trained_cnn, confident), trained_cnn, confident[:8], params, "softmax", reference=ref)


# ---------------------------------------------------------------------------- small models, every route


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_last_layer_matches_naive(shared, fmt: str, arch: str, output: str) -> None:
    module = shared.module(arch)
    model = shared.model(arch, fmt, module, _x(2))
    params = resolve_params(model.module, None)
    assert params == LAST[arch]
    for x in (_x(), _x(13, seed=1)):  # 13: more samples than classes, several cotangent batches
        _compare(model, module, x, params, output, reference=shared.reference(arch, module, x, params, output))


@pytest.mark.parametrize("leaf", ["weight", "bias"])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_output_layer_weight_only_or_bias_only(leaf: str, output: str) -> None:
    m = TorchModel(_mlp(), "mlp")
    _compare(m, m.module, _x(), [f"5.{leaf}"], output)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_inner_layers_match_naive(shared, fmt: str, arch: str, output: str) -> None:
    module = shared.module(arch)
    ref = shared.reference(arch, module, _x(), INNER[arch], output)
    _compare(shared.model(arch, fmt, module, _x(2)), module, _x(), INNER[arch], output, reference=ref)


def test_inner_layers_in_small_chunks_of_classes(monkeypatch) -> None:
    """A chunk budget below one class per chunk still gives the same S (one class at a time)."""
    module = _cnn()
    model = TorchModel(module, "cnn")
    whole = sensitivity_and_grad(model, _x(), INNER["cnn"])
    for budget in (1, 600):  # 1 and 2 classes per chunk (the chosen tensors hold 27 + 3 + 270 numbers)
        monkeypatch.setattr(sens, "CHUNK_ELEMENTS", budget)
        part = sensitivity_and_grad(model, _x(), INNER["cnn"])
        torch.testing.assert_close(part[0], whole[0], rtol=1e-6, atol=0.0)  # float32 backward, other batching
        torch.testing.assert_close(part[1], whole[1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("fmt", ["module", "torchscript"])
def test_transformed_output_takes_the_any_parameter_route(fmt: str) -> None:
    module = _Scaled().eval()
    model = _as(fmt, module, _x(2))
    params = resolve_params(model.module, None)
    assert params == ["head.weight", "head.bias"]
    assert penultimate(model, _x()) is None  # 2 (W h + b) + 0.5 is not W h + b
    for output in ("softmax", "logits"):
        _compare(model, module, _x(), params, output)


def test_static_batch_export_runs_row_by_row() -> None:
    module = _mlp()
    ep = ExportedModel(torch.export.export(module, (_x(1),)).module(), "ep1")
    _compare(ep, module, _x(), LAST["mlp"], "softmax")


def test_frozen_torchscript_parameters_are_restored() -> None:
    module = _mlp()
    for p in module.parameters():
        p.requires_grad_(False)
    traced = torch.jit.trace(module, _x(2), check_trace=False)
    ts = ScriptedModel(traced, "ts")
    for params in (["5.weight"], ["1.weight"]):
        s = sensitivity(ts, _x(), params, "softmax")
        assert torch.all(s > 0)
        s, g = sensitivity_and_grad(ts, _x(), params)
        assert torch.all(s > 0) and float(g.norm()) > 0
    assert not any(p.requires_grad for p in traced.parameters())


def test_bf16_autocast_is_close() -> None:
    model = TorchModel(_cnn(), "cnn")
    s32, g32 = sensitivity_and_grad(model, _x(), LAST["cnn"])
    s16, g16 = sensitivity_and_grad(model, _x(), LAST["cnn"], autocast="bf16")
    assert g16.dtype == torch.float32 and s16.dtype == torch.float64
    torch.testing.assert_close(s16, s32, rtol=0.1, atol=0.0)
    assert float((g16 - g32).norm() / g32.norm()) < 0.2
    with pytest.raises(UsageError, match="autocast"):
        sensitivity_and_grad(model, _x(), LAST["cnn"], autocast="fp8")  # type: ignore[arg-type]


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
    with pytest.raises(UsageError):
        sensitivity_and_grad(OnnxModel(object(), "m.onnx"), _x(), ["5.weight"])


def test_output_layer_route_in_pieces(monkeypatch) -> None:
    """A bag larger than RECOVERY_ROWS runs in pieces with the same result."""
    module = _cnn()
    model = _as("torchscript", module, _x(2))
    whole = sensitivity_and_grad(model, _x(13), LAST["cnn"])
    monkeypatch.setattr(sens, "RECOVERY_ROWS", 4)  # pieces of max(4, 5 classes) = 5 samples
    part = sensitivity_and_grad(model, _x(13), LAST["cnn"])
    torch.testing.assert_close(part[0], whole[0], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(part[1], whole[1], rtol=1e-5, atol=1e-9)
    _compare(model, module, _x(13), LAST["cnn"], "softmax")


class _Nudged(nn.Module):
    """Logits a hair away from the last Linear's output: within bfloat16 rounding, far outside float32's."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + 1e-3


def test_output_layer_check_runs_in_full_precision_under_autocast() -> None:
    model = TorchModel(_Nudged().eval(), "nudged")
    params = resolve_params(model.module, None)
    route = sens.Sensitivity(model, params)
    assert route.penultimate(_x(), create_graph=False, autocast="bf16") is None
    s16, _ = sensitivity_and_grad(model, _x(), params, autocast="bf16")  # the any-parameter route instead
    ref, _ = _reference(model.module, _x(), params, "softmax")
    torch.testing.assert_close(s16, ref, rtol=0.1, atol=0.0)


# ---------------------------------------------------------------------------- the hook route on nn.Module


class _Unhookable(TorchModel):
    """The same eager module, but taken as not hookable: the backward route reads h."""

    hookable = False


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_hook_route_gives_the_backward_routes_values(trained_cnn, confident, autocast) -> None:
    """On an nn.Module h is the output layer's input read by a hook; S and dS/dx equal the backward route's bit for bit."""
    params = resolve_params(trained_cnn, None)
    hooked = sens.Sensitivity(TorchModel(trained_cnn, "cnn"), params)
    recovered = sens.Sensitivity(_Unhookable(trained_cnn, "cnn"), params)
    assert hooked._linear is trained_cnn.head[3] and recovered._linear is None
    x = torch.cat([confident, confident.flip(0)])  # 40 samples: several cotangent batches on the backward route
    z1, h1 = hooked.penultimate(x, create_graph=False) or (None, None)
    z2, h2 = recovered.penultimate(x, create_graph=False) or (None, None)
    assert h1 is not None and h2 is not None and torch.equal(z1, z2) and torch.equal(h1, h2)
    s1, g1 = hooked.value_and_grad(x, autocast=autocast)
    s2, g2 = recovered.value_and_grad(x, autocast=autocast)
    assert torch.equal(s1, s2) and torch.equal(g1, g2)
    with hooked.session():  # the same inside one session (an ascent)
        s3, g3 = hooked.value_and_grad(x, autocast=autocast)
    assert torch.equal(s1, s3) and torch.equal(g1, g3)


class _KeywordHead(nn.Module):
    """The output layer called with a keyword argument: a forward pre-hook sees no positional input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 9), nn.Tanh())
        self.head = nn.Linear(9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(input=self.body(x))


class _SharedHead(nn.Module):
    """The output layer runs twice (shared weights): the logits are not W h + b for the first input the hook sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh())
        self.head = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.head(self.body(x))))


def test_hook_route_falls_back_when_the_hook_cannot_read_h() -> None:
    keyword = _KeywordHead().eval()
    model = TorchModel(keyword, "kw")
    route = sens.Sensitivity(model, ["head.weight", "head.bias"])
    assert route._linear is keyword.head
    assert route.penultimate(_x(), create_graph=False) is not None
    assert route._linear is None  # no positional input seen: the backward route from then on
    _compare(model, keyword, _x(13), ["head.weight", "head.bias"], "softmax")
    shared = _SharedHead().eval()  # two calls: neither route applies, the any-parameter route does
    assert penultimate(TorchModel(shared, "shared"), _x()) is None
    _compare(TorchModel(shared, "shared"), shared, _x(), ["head.weight", "head.bias"], "softmax")

"""The sensitive-sample generator: constraints, progress, determinism, model kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tamperprobe.data import Dataset
from tamperprobe.errors import UsageError
from tamperprobe.models import Model, OnnxModel, ScriptedModel, TorchModel
from tamperprobe.owner.methods import get_method
from tamperprobe.owner.methods.sensitive import SensitiveSamples
from tamperprobe.owner.sensitivity import resolve_params, sensitivity, sensitivity_and_grad

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def data() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:300].astype(np.float32) / 16.0)[:, None]
    return Dataset(x, d.target[:300].astype(np.int64), "digits300", 0.0, 1.0)


def _model(kind: str = "cnn") -> Model:
    torch.manual_seed(0)
    if kind == "mlp":
        module = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    else:
        module = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)
        )
    return TorchModel(module.eval(), kind)


def _check_constraints(bag, data: Dataset, epsilon: float) -> None:
    assert bag.inputs.dtype == np.float32 and bag.inputs.shape == bag.seeds.shape
    assert bag.inputs.min() >= data.low and bag.inputs.max() <= data.high
    d = (bag.inputs.astype(np.float64) - bag.seeds).reshape(len(bag), -1)
    rel = np.linalg.norm(d, axis=1) / np.linalg.norm(bag.seeds.astype(np.float64).reshape(len(bag), -1), axis=1)
    assert rel.max() <= epsilon + 1e-6
    # the seeds are natural samples of the data set
    flat = data.x.reshape(len(data), -1)
    for s in bag.seeds.reshape(len(bag), -1):
        assert np.any(np.all(flat == s, axis=1))


@pytest.mark.parametrize("output", ["softmax", "logits"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_constraints_and_sensitivity_gain(data: Dataset, arch: str, output: str) -> None:
    model = _model(arch)
    calls: list[tuple[int, int]] = []
    gen = SensitiveSamples(epsilon=0.1, lr=0.02, steps=40, output=output)
    bag = gen.generate(model, data, 24, np.random.default_rng(0), lambda d, t: calls.append((d, t)))
    assert len(bag) == 24 and bag.groups is None
    _check_constraints(bag, data, 0.1)
    s0, s1 = bag.info["sensitivity_seed"], bag.info["sensitivity"]
    assert s0.shape == s1.shape == (24,)
    assert np.all(s1 >= s0)  # the best iterate starts at the seed
    assert s1.mean() > s0.mean() * 1.001
    assert 1 <= bag.info["steps"] <= 40 and calls and calls[-1] == (40, 40)
    # the recorded sensitivity is that of the returned inputs
    names = resolve_params(model.module, None)
    recomputed = sensitivity(model, torch.from_numpy(bag.inputs), names, output).detach().numpy()
    np.testing.assert_allclose(recomputed, s1, rtol=1e-4)


def test_small_box_and_large_epsilon_still_hold(data: Dataset) -> None:
    clipped = Dataset(np.clip(data.x, 0.2, 0.7), data.y, "clipped", 0.2, 0.7)
    bag = SensitiveSamples(epsilon=0.5, lr=0.2, steps=15).generate(_model("mlp"), clipped, 16, np.random.default_rng(1))
    _check_constraints(bag, clipped, 0.5)
    assert np.any(bag.inputs == 0.2) or np.any(bag.inputs == 0.7)  # the box was active


def test_deterministic_for_a_seed(data: Dataset) -> None:
    model = _model("cnn")
    gen = get_method("sensitive", steps=10)
    a = gen.generate(model, data, 8, np.random.default_rng(5))
    b = gen.generate(model, data, 8, np.random.default_rng(5))
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.info["sensitivity"], b.info["sensitivity"])
    c = gen.generate(model, data, 8, np.random.default_rng(6))
    assert not np.array_equal(a.seeds, c.seeds)


def test_seeds_without_replacement_when_possible(data: Dataset) -> None:
    small = Dataset(data.x[:5], data.y[:5], "five", 0.0, 1.0)
    bag = SensitiveSamples(steps=0).generate(_model("mlp"), small, 5, np.random.default_rng(0))
    assert len({s.tobytes() for s in bag.seeds}) == 5
    np.testing.assert_array_equal(bag.inputs, bag.seeds)  # no step: the seeds themselves
    assert len(SensitiveSamples(steps=0).generate(_model("mlp"), small, 9, np.random.default_rng(0))) == 9


def test_early_stopping_with_patience(data: Dataset) -> None:
    gen = SensitiveSamples(epsilon=1e-6, steps=200, patience=3, min_delta=0.5)
    bag = gen.generate(_model("mlp"), data, 6, np.random.default_rng(0))
    assert bag.info["steps"] == 3


def test_torchscript_and_inner_params(data: Dataset) -> None:
    model = _model("mlp")
    traced = torch.jit.trace(model.module, torch.from_numpy(data.x[:2]), check_trace=False)
    ts = ScriptedModel(traced, "ts")
    gen = SensitiveSamples(steps=5, lr=0.05)
    a = gen.generate(ts, data, 4, np.random.default_rng(2))
    b = gen.generate(model, data, 4, np.random.default_rng(2))
    _check_constraints(a, data, 0.1)
    np.testing.assert_allclose(a.inputs, b.inputs, atol=1e-5)
    inner = SensitiveSamples(steps=5, params=["1.weight", "1.bias"]).generate(model, data, 4, np.random.default_rng(2))
    assert inner.info["params"] == ["1.weight", "1.bias"]
    assert np.all(inner.info["sensitivity"] >= inner.info["sensitivity_seed"])


def test_misuse_is_a_usage_error(data: Dataset) -> None:
    # the constructor only stores; bad values are refused by validation, by get_method and by generate
    for bad in (SensitiveSamples(output="probs"), SensitiveSamples(epsilon=-1)):
        with pytest.raises(UsageError):
            bad.validated()
        with pytest.raises(UsageError):
            get_method(bad)
        with pytest.raises(UsageError):
            bad.generate(_model("mlp"), data, 4, np.random.default_rng(0))
    with pytest.raises(UsageError):
        get_method("sensitive", output="probs")
    with pytest.raises(UsageError):
        get_method("sensitive", epsilon=-1)
    with pytest.raises(UsageError):
        get_method("sensitive", bogus=1)
    with pytest.raises(UsageError, match="PyTorch"):
        SensitiveSamples().generate(OnnxModel(object(), "m.onnx"), data, 4, np.random.default_rng(0))
    with pytest.raises(UsageError, match="valid names"):
        SensitiveSamples(params=["nope"]).generate(_model("mlp"), data, 4, np.random.default_rng(0))
    defaults = {
        "epsilon": 0.1,
        "rms": None,
        "lr": 0.01,
        "steps": 200,
        "patience": 20,
        "min_delta": 1e-4,
        "output": "softmax",
        "params": None,
        "autocast": None,
        "preset": None,
    }
    assert get_method("sensitive").get_params() == defaults
    assert get_method("sensitive").validated() == defaults


def test_samples_leave_the_batch_when_they_stop_improving(data: Dataset) -> None:
    """Per-sample convergence: each sample ends where it would alone, after its own number of steps."""
    model = _model("cnn")
    six = Dataset(data.x[:6], data.y[:6], "six", 0.0, 1.0)
    gen = SensitiveSamples(epsilon=0.2, lr=0.01, steps=60, patience=2, min_delta=0.005)
    bag = gen.generate(model, six, 6, np.random.default_rng(0))
    ran = bag.info["ascent_steps"]
    assert ran.shape == (6,) and len(set(ran.tolist())) > 1  # they left at different steps
    assert bag.info["steps"] == ran.max() < 60 and ran.min() >= 2
    for i in range(6):
        k = int(np.flatnonzero(np.all(six.x.reshape(6, -1) == bag.seeds[i].reshape(1, -1), axis=1))[0])
        alone = gen.generate(model, Dataset(six.x[k : k + 1], six.y[k : k + 1], "one", 0.0, 1.0), 1, np.random.default_rng(0))
        assert alone.info["ascent_steps"][0] == ran[i]
        np.testing.assert_allclose(alone.inputs[0], bag.inputs[i], atol=1e-5)
        np.testing.assert_allclose(alone.info["sensitivity"][0], bag.info["sensitivity"][i], rtol=1e-5)


def test_adam_step_matches_torch_optim() -> None:
    gen = SensitiveSamples(lr=0.03)
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    grads = [torch.randn(4, 1, 8, 8) for _ in range(5)]
    var = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([var], lr=0.03, maximize=True)
    ours, m1, m2 = x.clone(), torch.zeros_like(x), torch.zeros_like(x)
    for step, g in enumerate(grads, start=1):
        var.grad = g
        opt.step()
        ours = gen._adam(ours, m1, m2, g, step)
    torch.testing.assert_close(ours, var.detach(), rtol=1e-6, atol=1e-7)


def test_bf16_autocast_records_float32_sensitivities(data: Dataset) -> None:
    model = _model("cnn")
    gen = SensitiveSamples(steps=15, lr=0.02, autocast="bf16")
    bag = gen.generate(model, data, 8, np.random.default_rng(0))
    _check_constraints(bag, data, 0.1)
    s0, s1 = bag.info["sensitivity_seed"], bag.info["sensitivity"]
    assert np.all(s1 >= s0) and s1.mean() > s0.mean()
    names = resolve_params(model.module, None)
    np.testing.assert_allclose(sensitivity(model, torch.from_numpy(bag.inputs), names).detach().numpy(), s1, rtol=1e-6)
    np.testing.assert_allclose(sensitivity(model, torch.from_numpy(bag.seeds), names).detach().numpy(), s0, rtol=1e-6)
    assert get_method("sensitive", autocast="bf16").autocast == "bf16"
    with pytest.raises(UsageError, match="autocast"):
        get_method("sensitive", autocast="fp16")


def test_verideep_preset(data: Dataset) -> None:
    from tamperprobe._params import parse_params

    kwargs = parse_params(SensitiveSamples, ["preset=verideep"])
    gen = get_method("sensitive", **kwargs)
    settings = gen.validated()
    assert (settings["lr"], settings["steps"], settings["patience"], settings["rms"], settings["preset"]) == (1e-3, 1000, 0, 10 / 255, "verideep")
    assert settings["params"] is None  # W is chosen at generation time (the last layer's weight)
    assert get_method("sensitive", preset="verideep", lr=1e-3, min_delta=0.5).validated()["min_delta"] == 0.5
    for clash in ({"lr": 0.05}, {"steps": 10}, {"patience": 5}, {"rms": 0.1}):
        with pytest.raises(UsageError, match="preset=verideep"):
            get_method("sensitive", preset="verideep", **clash)
    with pytest.raises(UsageError, match="preset"):
        get_method("sensitive", preset="paper")
    with pytest.raises(UsageError, match="two radii"):
        get_method("sensitive", preset="verideep", epsilon=0.2)
    # 1,000 steps, no early stop, W = the last layer's weight alone
    model = _model("mlp")
    bag = SensitiveSamples(preset="verideep").generate(model, data, 2, np.random.default_rng(0))
    assert bag.info["steps"] == 1000 and bag.info["ascent_steps"].tolist() == [1000, 1000]
    assert bag.info["params"] == ["3.weight"]
    explicit = SensitiveSamples(preset="verideep", steps=1000, params=["1.weight"])
    assert explicit.validated()["params"] == ["1.weight"]


def _reference_ascent(model: Model, seeds: np.ndarray, *, epsilon: float, lr: float, steps: int, patience: int, min_delta: float):
    """The ascent written plainly, one sample at a time: ``torch.optim.Adam(maximize=True)``, the ε-ball then the
    box [0, 1], the best iterate kept, a stop after ``patience`` steps without a gain by ``min_delta``."""
    names = resolve_params(model.module, None)
    inputs, values, ran = [], [], []
    for v0 in torch.from_numpy(seeds):
        v0 = v0[None]
        radius = epsilon * float(v0.double().norm())
        var = v0.clone().requires_grad_(True)
        opt = torch.optim.Adam([var], lr=lr, maximize=True)
        s, g = sensitivity_and_grad(model, v0, names)
        best, best_x, stall, taken = float(s[0]), v0.clone(), 0, 0
        for step in range(1, steps + 1):
            var.grad = g
            opt.step()
            with torch.no_grad():
                d = var.double() - v0.double()
                d *= min(1.0, radius / float(d.norm()))
                var.copy_((v0.double() + d).clamp(0.0, 1.0))
            s, g = sensitivity_and_grad(model, var.detach(), names)
            taken = step
            stall = 0 if float(s[0]) > best * (1 + min_delta) else stall + 1
            if float(s[0]) > best:
                best, best_x = float(s[0]), var.detach().clone()
            if patience and stall >= patience:
                break
        inputs.append(best_x[0].numpy())
        values.append(best)
        ran.append(taken)
    return np.stack(inputs), np.array(values), np.array(ran)


@pytest.mark.parametrize("patience", [0, 3])
def test_ascent_matches_a_plain_per_sample_reference(data: Dataset, patience: int) -> None:
    """The batched, compacted ascent (checks every CHECK_EVERY steps) ends where each sample alone would."""
    model = _model("cnn")
    settings = {"epsilon": 0.2, "lr": 0.02, "steps": 25, "patience": patience, "min_delta": 0.01}
    bag = SensitiveSamples(**settings).generate(model, data, 10, np.random.default_rng(4))
    inputs, values, ran = _reference_ascent(model, bag.seeds, **settings)
    np.testing.assert_array_equal(bag.info["ascent_steps"], ran)
    if patience:
        assert len(set(ran.tolist())) > 1 and ran.max() < 25  # samples stopped, at different steps
    assert bag.info["steps"] == ran.max()
    np.testing.assert_allclose(bag.inputs, inputs, atol=2e-5)
    np.testing.assert_allclose(bag.info["sensitivity"], values, rtol=1e-4)


def test_check_interval_and_route_do_not_change_the_markers(data: Dataset, monkeypatch) -> None:
    """Early-stopping checks every step or every few give the same markers; so do the hook and backward routes."""
    import tamperprobe.owner.methods.sensitive as sensitive

    class Unhookable(TorchModel):
        hookable = False

    model = _model("cnn")
    gen = SensitiveSamples(epsilon=0.2, lr=0.02, steps=40, patience=2, min_delta=0.005)
    default = gen.generate(model, data, 12, np.random.default_rng(0))
    assert len(set(default.info["ascent_steps"].tolist())) > 1
    for every in (1, 7):
        monkeypatch.setattr(sensitive, "CHECK_EVERY", every)
        other = gen.generate(model, data, 12, np.random.default_rng(0))
        np.testing.assert_array_equal(other.info["ascent_steps"], default.info["ascent_steps"])
        np.testing.assert_allclose(other.inputs, default.inputs, atol=1e-6)  # batch sizes differ: float rounding
    monkeypatch.setattr(sensitive, "CHECK_EVERY", 1)
    hooked = SensitiveSamples(steps=30, patience=0).generate(model, data, 12, np.random.default_rng(1))
    recovered = SensitiveSamples(steps=30, patience=0).generate(Unhookable(model.module, "cnn"), data, 12, np.random.default_rng(1))
    np.testing.assert_array_equal(hooked.inputs, recovered.inputs)
    np.testing.assert_array_equal(hooked.info["sensitivity"], recovered.info["sensitivity"])


def test_rms_ball_is_the_same_for_every_seed(data: Dataset) -> None:
    """``rms``: every marker within an RMS distance of rms × (high − low) of its seed, whatever the seed's norm."""
    shifted = Dataset(data.x * 2, data.y, "digits[0,2]", 0.0, 2.0)  # range 2: the radius scales with it
    rms = 0.02
    bag = SensitiveSamples(rms=rms, lr=0.05, steps=30, patience=0).generate(_model("mlp"), shifted, 16, np.random.default_rng(2))
    d = (bag.inputs.astype(np.float64) - bag.seeds).reshape(len(bag), -1)
    dist = np.sqrt((d**2).mean(axis=1))
    assert dist.max() <= rms * 2.0 * (1 + 1e-6)
    # lr 0.05 for 30 steps moves far beyond the ball: every marker ends near it (the box clips a little), whatever its seed's norm
    assert dist.min() > rms * 2.0 * 0.85
    norms = np.linalg.norm(bag.seeds.reshape(len(bag), -1), axis=1)
    assert norms.max() > 1.1 * norms.min()
    with pytest.raises(UsageError, match="rms"):
        get_method("sensitive", rms=-0.1)
    # a larger rms ball reaches beyond the default relative one (epsilon=0.1 of the seed's norm): rms replaced it
    wide = SensitiveSamples(rms=0.1, lr=0.05, steps=30, patience=0).generate(_model("mlp"), shifted, 16, np.random.default_rng(2))
    dw = (wide.inputs.astype(np.float64) - wide.seeds).reshape(len(wide), -1)
    assert np.sqrt((dw**2).mean(axis=1)).max() <= 0.1 * 2.0 * (1 + 1e-6)
    rel = np.linalg.norm(dw, axis=1) / np.linalg.norm(wide.seeds.reshape(len(wide), -1), axis=1)
    assert rel.max() > 0.1

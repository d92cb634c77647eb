"""Where and how wide models run: ``--threads``, ``$TAMPERPROBE_THREADS``, ``--device``.

CUDA is not available here, so the device tests check what can be checked on a CPU: that
``--device cpu`` gives the same fingerprint as the default, that an unavailable or unknown device
is a one-line error with exit code 2 on every command that runs a model, and that every tensor the
generation and attack paths create follows the model's device (see
``test_generation_creates_every_tensor_on_the_models_device``). Nothing here ran on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tamperprobe._torch import DEFAULT_THREADS, THREADS_ENV, resolve_device, thread_count
from tamperprobe.cli.app import app
from tamperprobe.errors import UsageError
from tamperprobe.fingerprint import load
from tamperprobe.models import TorchModel, load_model, save_model

SENSITIVE = ["--method", "sensitive", "--param", "steps=4"]  # the default method for logits is natural (advice)
# where the tolerance is not what a test checks, a given one skips the benign-noise measurement (a trace, an ONNX export and
# four more runs of the model per fingerprint; test_tolerance.py checks the measurement)
GIVEN_TOLERANCE = ["--tolerance", "3e-5"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained_cnn, digits):
    d = tmp_path_factory.mktemp("runtime")
    model = save_model(trained_cnn, d / "model.pt", digits[1].x[:2])
    np.savez(d / "data.npz", x=digits[0].x[:60], y=digits[0].y[:60])
    r = run(
        "fingerprint",
        model,
        "--data",
        d / "data.npz",
        "--out",
        d / "fp.tpf",
        "--size",
        "4",
        "--bag",
        "8",
        "--method",
        "natural",
        "--no-check",
        *GIVEN_TOLERANCE,
    )
    assert r.exit_code == 0, r.stderr
    return d, model


# ------------------------------------------------------------------ threads


def test_thread_count_default_env_and_option(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert thread_count() == DEFAULT_THREADS == 1
    monkeypatch.setenv(THREADS_ENV, " 3 ")
    assert thread_count() == 3
    assert thread_count(2) == 2  # the option wins over the environment
    assert thread_count(0) == 0  # torch's own default
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(UsageError, match=r"\$TAMPERPROBE_THREADS must be a whole number"):
        thread_count()
    with pytest.raises(UsageError, match="--threads must be 0"):
        thread_count(-1)


# every command that runs a model, with what it needs to reach the model
COMMANDS = {
    "fingerprint": ["fingerprint", "{model}", "--data", "{d}/data.npz", "--out", "{d}/x.tpf"],
    "calibrate": ["calibrate", "{model}", "--data", "{d}/data.npz"],
    "verify": ["verify", "{d}/fp.tpf", "--model", "{model}", "--trusted-model", "--no-history"],
    "serve": ["serve", "{model}", "--input-shape", "1,8,8"],
    "train": ["train", "cnn", "--data", "{d}/data.npz", "--out", "{d}/t.pt"],
    "attack": ["attack", "{model}", "--kind", "int8", "--out", "{d}/a.pt"],
    "evaluate": ["evaluate", "{model}", "--data", "{d}/data.npz", "--out", "{d}/ev"],
    "demo": ["demo"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_model_command_applies_threads_then_checks_the_device(files, command, restore_threads):
    """``--threads`` takes effect and ``--device`` is checked before any work: a bad device stops the
    command with one line and exit code 2 (here after the thread count was set, which shows both are wired)."""
    d, model = files
    torch.set_num_threads(1)
    args = [a.format(d=d, model=model) for a in COMMANDS[command]]
    r = run(*args, "--threads", "3", "--device", "tpu")
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert "unknown device 'tpu': use cpu, cuda or cuda:N" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert torch.get_num_threads() == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_exit_2(files, command, device):
    d, model = files
    r = run(*[a.format(d=d, model=model) for a in COMMANDS[command]], "--device", device)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert f"--device {device}: CUDA is not available on this machine" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_resolve_device_accepts_cpu_spellings_and_refuses_others():
    assert resolve_device(None) == resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("cpu:1", "mps", "meta", "cuda:x", ""):
        with pytest.raises(UsageError, match="unknown device"):
            resolve_device(bad)


def test_threads_changes_no_result(files, restore_threads):
    """The same fingerprint whatever the thread count, up to float rounding (sums split over threads
    round differently): ``--threads`` is a speed setting only."""
    d, model = files
    common = ["fingerprint", model, "--data", d / "data.npz", "--size", "3", "--bag", "6", "--no-check", "--seed", "0", *SENSITIVE, *GIVEN_TOLERANCE]
    for n in (1, 2):
        r = run(*common, "--out", d / f"t{n}.tpf", "--threads", n)
        assert r.exit_code == 0, r.stderr
    one, two = load(d / "t1.tpf"), load(d / "t2.tpf")
    np.testing.assert_allclose(one.inputs, two.inputs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(one.logits, two.logits, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ devices


def test_fingerprint_with_device_cpu_is_the_default_fingerprint(files):
    d, model = files
    common = ["fingerprint", model, "--data", d / "data.npz", "--size", "3", "--bag", "6", "--no-check", "--seed", "0", *SENSITIVE, *GIVEN_TOLERANCE]
    r = run(*common, "--out", d / "cpu.tpf", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    r = run(*common, "--out", d / "default.tpf")
    assert r.exit_code == 0, r.stderr
    on_cpu, default = load(d / "cpu.tpf"), load(d / "default.tpf")
    assert on_cpu.logits.dtype == np.float32 and on_cpu.inputs.dtype == default.inputs.dtype
    np.testing.assert_array_equal(on_cpu.inputs, default.inputs)
    np.testing.assert_array_equal(on_cpu.logits, default.logits)


def test_load_model_places_the_weights_and_logits_come_back_as_cpu_float32(files, digits):
    _, model = files
    m = load_model(model, device="cpu")
    assert isinstance(m, TorchModel) and m.device == torch.device("cpu")
    z = m.logits(digits[1].x[:5])
    assert isinstance(z, np.ndarray) and z.dtype == np.float32 and z.shape == (5, 10)
    with pytest.raises(UsageError, match="unknown device"):
        load_model(model, device="gpu")


def _methods() -> list[str]:
    from tamperprobe.owner.methods import method_names

    return method_names()


@contextmanager
def meta_default_device() -> Iterator[None]:
    """Make tensors created without an explicit device land on ``meta``.

    The model and its inputs stay on the CPU, so a tensor that the code creates without naming the
    model's device (``torch.zeros(n)``, ``torch.arange(n)``) is a meta tensor and the first operation
    that mixes it with the model's tensors fails, as a CPU tensor would next to a CUDA model. This
    is the closest check of the device flow a machine without a GPU allows; it does not catch a
    ``torch.from_numpy`` left on the CPU (that needs a real second device).
    """
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


CHEAP_SEARCH = {"sensitive": {"steps": 3}, "matched": {"steps": 3}, "boundary": {"rounds": 1}, "crossed": {"rounds": 1}, "wght": {"candidates": 64}}


@pytest.mark.parametrize("method", _methods())
def test_generation_creates_every_tensor_on_the_models_device(trained_cnn, digits, method):
    from tamperprobe.outputs import DEFAULT_TOLERANCE
    from tamperprobe.owner.budget import self_check
    from tamperprobe.owner.generate import create_fingerprint

    model = TorchModel(trained_cnn, "cnn")
    spec = "top1" if method in ("boundary", "crossed", "matched") else "logits"
    # fewer iterations of the same loops: the tensors each creates, not how far it searches, are what is checked here
    params = CHEAP_SEARCH.get(method)
    kwargs = dict(method=method, size=4, bag=8, output_spec=spec, params=params, seed=0)  # the same seed: the default is drawn afresh
    # the reference skips the noise measurement (a given tolerance), the run on the meta default device makes it
    reference = create_fingerprint(model, digits[0], **kwargs, tolerance=DEFAULT_TOLERANCE)
    with meta_default_device():
        fp = create_fingerprint(model, digits[0], **kwargs)
        rows = self_check(model, fp)
    np.testing.assert_array_equal(fp.inputs, reference.inputs)
    np.testing.assert_array_equal(fp.logits, reference.logits)
    assert fp.logits.dtype == np.float32 and len(rows) > 0


def _attacks() -> list[str]:
    from tamperprobe.attacks import attack_names

    # dynamic-int8 runs torch's CPU-only quantized kernels, which build their own tensors
    return [a for a in attack_names() if a != "dynamic-int8"]


@pytest.mark.parametrize("kind", _attacks())
def test_attacks_create_every_tensor_on_the_models_device(trained_mlp, digits, kind):
    from tamperprobe.attacks import run_attack

    train = digits[0].split(0.7, seed=0)[1]
    params = {"epochs": 1} if kind in ("finetune", "watermark", "trojan", "trojan-neuron", "poison-generic", "poison-specific") else {}
    reference = run_attack(kind, trained_mlp, train, seed=0, **params)
    with meta_default_device():
        result = run_attack(kind, trained_mlp, train, seed=0, **params)
    for (name, a), b in zip(reference.model.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(a, b), name

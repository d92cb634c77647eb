"""Owner-side generation end to end: create_fingerprint for each method, uint8 markers, selection fallback."""

import numpy as np
import pytest
import torch

from tamperprobe._params import Interval
from tamperprobe.errors import UsageError
from tamperprobe.models import TorchModel, load_model, save_model
from tamperprobe.outputs import DEFAULT_TOLERANCE
from tamperprobe.owner.generate import create_fingerprint
from tamperprobe.owner.methods import Bag, Method, get_method, method_names
from tamperprobe.served.targets import LocalTarget
from tamperprobe.served.verify import INTACT, TAMPERED, verify

# For tests of what generation records or reproduces, not of the tolerance: a given tolerance skips the benign-noise
# measurement (a trace, an ONNX export and four more runs of the model per fingerprint). The digits CNN's measured
# tolerance is this default anyway (test_tolerance.py checks the measurement, and that this model keeps the default margin).
GIVEN_TOLERANCE = {"tolerance": DEFAULT_TOLERANCE}


@pytest.fixture(scope="module")
def cnn(trained_cnn):
    return TorchModel(trained_cnn, "cnn")


@pytest.mark.parametrize("method", ["sensitive", "natural", "grid", "badv", "boundary"])
def test_every_method_verifies_its_own_model(cnn, digits, method):
    params = {"steps": 20} if method == "sensitive" else {}
    fp = create_fingerprint(cnn, digits[0], method=method, size=6, bag=24, seed=1, output_spec="top1", params=params)
    assert len(fp) >= 6
    assert fp.generator["method"] == method and fp.generator["seed"] == 1
    assert fp.model_digest == cnn.digest()
    assert verify(fp, LocalTarget(cnn, input_spec=fp.input_spec)).verdict == INTACT


def test_uint8_boundary_markers_round_trip_through_verify(cnn, digits, tmp_path):
    from tamperprobe.fingerprint import load, save

    fp = create_fingerprint(cnn, digits[0], method="boundary", size=4, bag=12, seed=0, output_spec="top1", params={"uint8": True})
    assert fp.inputs.dtype == np.uint8 and fp.input_spec.dtype == "uint8"
    save(fp, tmp_path / "u8.tpf")
    back = load(tmp_path / "u8.tpf")
    assert back.inputs.tobytes() == fp.inputs.tobytes()
    # the recorded logits are the model's logits on the decoded 8-bit images
    np.testing.assert_array_equal(back.logits, cnn.logits(back.input_spec.decode(back.inputs)))
    assert verify(back, LocalTarget(cnn, input_spec=back.input_spec)).verdict == INTACT
    with pytest.raises(Exception, match="input spec"):
        verify(back, LocalTarget(cnn))


def test_boundary_pairs_catch_int8_with_top1(cnn, digits, trained_cnn):
    import copy

    fp = create_fingerprint(cnn, digits[0], method="boundary", size=8, bag=24, seed=0, output_spec="top1", **GIVEN_TOLERANCE)
    q = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        for p in q.parameters():
            scale = p.abs().max() / 127
            p.copy_(torch.round(p / scale) * scale)
    assert verify(fp, LocalTarget(TorchModel(q, "q"))).verdict == TAMPERED


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_manc_works_on_torchscript_and_export(trained_cnn, cnn, digits, tmp_path, suffix):
    saved = load_model(save_model(trained_cnn, tmp_path / f"m{suffix}", digits[1].x))
    fp = create_fingerprint(saved, digits[0], method="natural", size=4, bag=10, seed=0)
    assert fp.generator["selection"] == "manc"
    same = create_fingerprint(cnn, digits[0], method="natural", size=4, bag=10, seed=0, **GIVEN_TOLERANCE)
    assert fp.inputs.tobytes() == same.inputs.tobytes()  # the same activations, so the same picks
    assert verify(fp, LocalTarget(saved)).verdict == INTACT


class _Shifted(torch.nn.Module):
    """Logits that are not a linear layer's output (scaled and shifted after it)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.inner(x) + 0.5


def test_manc_falls_back_to_random_without_a_linear_output(trained_cnn, digits, tmp_path):
    ts = load_model(save_model(_Shifted(trained_cnn).eval(), tmp_path / "m.pt", digits[1].x))
    fp = create_fingerprint(ts, digits[0], method="natural", size=4, bag=10, seed=0, **GIVEN_TOLERANCE)
    assert fp.generator["selection"].startswith("random (manc unavailable")
    assert verify(fp, LocalTarget(ts)).verdict == INTACT


def test_generation_is_deterministic(cnn, digits):
    a = create_fingerprint(cnn, digits[0], method="sensitive", size=4, bag=8, seed=3, params={"steps": 10}, **GIVEN_TOLERANCE)
    b = create_fingerprint(cnn, digits[0], method="sensitive", size=4, bag=8, seed=3, params={"steps": 10}, **GIVEN_TOLERANCE)
    assert a.inputs.tobytes() == b.inputs.tobytes() and a.logits.tobytes() == b.logits.tobytes()


def test_self_check_reports_per_unit_trigger_ratio(cnn, digits):
    from tamperprobe.owner.budget import detection_confidence, self_check

    fp = create_fingerprint(cnn, digits[0], method="boundary", size=6, bag=18, seed=0, output_spec="top1", **GIVEN_TOLERANCE)
    rows = self_check(cnn, fp, attacks=("int8", "noise"), seeds=(0, 1))
    assert [r["attack"] for r in rows] == ["int8", "noise", "noise"]  # int8 is not random: one seed
    for r in rows:
        assert r["units"] == len(set(fp.groups.tolist())) and 0.0 <= r["p"] <= 1.0
        assert r["detected"] == (r["p"] > 0)
        assert r["confidence"] == detection_confidence(r["p"], r["units"])
    assert rows[0]["detected"]


def test_fingerprint_cli_prints_budget(tmp_path, trained_cnn, digits):
    from typer.testing import CliRunner

    from tamperprobe.cli.app import app

    save_model(trained_cnn, tmp_path / "m.pt", digits[1].x)
    args = ["fingerprint", str(tmp_path / "m.pt"), "--data", "digits", "--out", str(tmp_path / "f.tpf"), "--tolerance", str(DEFAULT_TOLERANCE)]
    r = CliRunner().invoke(app, [*args, "--method", "natural", "--select", "random", "--size", "5", "--bag", "20"])
    assert r.exit_code == 0, r.output
    assert "query budget: 5 markers + 5 decoys a run, each sent once: 1 runs in the pool" in r.stdout
    assert "expected detection" in r.stdout
    # --param values are coerced by the constructor's annotations; unknown keys and bad values are one-line usage errors
    r = CliRunner().invoke(app, [*args, "--method", "natural", "--param", "replace=yes", "--size", "2", "--bag", "4", "--no-check"])
    assert r.exit_code == 0, r.output
    from tamperprobe.fingerprint import load

    assert load(tmp_path / "f.tpf").generator["params"] == {"replace": True}
    for bad, message in (("bogus=1", "unknown parameter"), ("replace=maybe", "true or false"), ("replace", "key=value")):
        r = CliRunner().invoke(app, [*args, "--method", "natural", "--param", bad, "--no-check"])
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(app, ["fingerprint", "--help"])
    assert r.exit_code == 0
    from tamperprobe.owner.methods import method_names

    assert all(name in r.stdout for name in method_names())


def test_fingerprint_uses_calibrated_noise_and_refuses_delta_below_it(tmp_path, trained_cnn, digits):
    import json

    from typer.testing import CliRunner

    from tamperprobe.cli.app import app

    model = save_model(trained_cnn, tmp_path / "m.pt", digits[1].x)
    runner = CliRunner()
    run = lambda *a: runner.invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("calibrate", model, "--data", "digits", "--runtimes", "batch1,batch64,onnx", "--samples", "64", "--out", tmp_path / "n.json")
    assert r.exit_code == 0, r.output
    floor = json.loads((tmp_path / "n.json").read_text())
    r = run(
        "fingerprint",
        model,
        "--data",
        "digits",
        "--out",
        tmp_path / "f.tpf",
        "--method",
        "boundary",
        "--select",
        "random",
        "--size",
        "4",
        "--bag",
        "12",
        "--output-spec",
        "top1",
        "--noise",
        tmp_path / "n.json",
        "--no-check",
        "--seed",
        "0",
    )
    assert r.exit_code == 0, r.output
    from tamperprobe.fingerprint import load
    from tamperprobe.owner.calibrate import delta_from_noise, load_noise

    fp = load(tmp_path / "f.tpf")
    noise_floor = delta_from_noise(load_noise(tmp_path / "n.json"), 1.0)
    assert noise_floor > 0, floor
    assert fp.generator["params"]["delta"] >= 10 * noise_floor and fp.tolerance >= 2 * noise_floor
    r = run(
        "fingerprint",
        model,
        "--data",
        "digits",
        "--out",
        tmp_path / "g.tpf",
        "--method",
        "boundary",
        "--select",
        "random",
        "--size",
        "4",
        "--bag",
        "12",
        "--noise",
        tmp_path / "n.json",
        "--param",
        f"delta={noise_floor / 2}",
        "--no-check",
    )
    assert r.exit_code == 2 and "noise" in r.output.lower()
    assert "noise floor" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert isinstance(r.exception, SystemExit)  # a handled one-line error, not a crash


# ----------------------------------------------------------------------------- the plug-in convention

CHEAP = {"sensitive": {"steps": "2"}, "boundary": {"rounds": 1}, "wght": {"candidates": 64}}  # text is coerced by annotation


@pytest.mark.parametrize("name", method_names())
def test_fingerprint_records_exactly_the_constructor_parameters(cnn, digits, tmp_path, name):
    from tamperprobe.fingerprint import load, save

    params = CHEAP.get(name, {})
    gen = get_method(name, **params)
    cls = type(gen)
    fp = create_fingerprint(cnn, digits[1], method=name, select="random", size=2, bag=4, seed=0, params=params, **GIVEN_TOLERANCE)
    recorded = fp.generator["params"]
    assert fp.generator["method"] == name == cls.name
    assert list(recorded) == cls.param_names()  # every constructor parameter, in signature order, nothing else
    assert recorded == gen.validated()
    for key, default in cls.defaults().items():
        if key not in params:
            assert recorded[key] == default
        if default is not None:
            assert type(recorded[key]) is type(default), key  # floats stay floats, ints ints
    if name == "sensitive":
        assert recorded["steps"] == 2 and recorded["params"] is None
    # the same parameters from an instance; and they survive the file
    again = create_fingerprint(cnn, digits[1], method=gen, select="random", size=2, bag=4, seed=0, **GIVEN_TOLERANCE)
    assert again.generator == fp.generator and again.inputs.tobytes() == fp.inputs.tobytes()
    save(fp, tmp_path / "f.tpf")
    assert load(tmp_path / "f.tpf").generator["params"] == recorded


class Constant(Method):
    """Test method: the first natural input, shifted by ``shift`` and clipped to the range."""

    name = "constant"
    constraints = {"shift": Interval(-1.0, 1.0)}

    def __init__(self, *, shift: float = 0.0) -> None:
        self.shift = shift

    def _generate(self, model, data, bag, rng, progress):
        seeds = np.repeat(data.x[:1], bag, axis=0)
        return Bag(np.clip(seeds + self.shift, data.low, data.high).astype(np.float32), seeds)


def test_a_new_method_is_one_class_and_one_registry_line(monkeypatch, cnn, digits):
    from tamperprobe.owner.methods import REGISTRY, method_descriptions

    monkeypatch.setitem(REGISTRY, "constant", f"{__name__}:Constant")
    assert "constant" in method_names() and method_descriptions()["constant"].startswith("Test method")
    kwargs = dict(select="random", size=3, bag=5, seed=0, **GIVEN_TOLERANCE)
    by_name = create_fingerprint(cnn, digits[1], method="constant", params={"shift": "0.25"}, **kwargs)
    by_instance = create_fingerprint(cnn, digits[1], method=Constant(shift=0.25), **kwargs)
    for fp in (by_name, by_instance):
        assert fp.generator["method"] == "constant" and fp.generator["params"] == {"shift": 0.25}
        assert verify(fp, LocalTarget(cnn)).verdict == INTACT
    assert by_name.inputs.tobytes() == by_instance.inputs.tobytes()
    # the base class checks what every method shares: parameters, bag size, data
    with pytest.raises(UsageError, match="unknown parameter"):
        get_method("constant", bogus=1)
    with pytest.raises(UsageError, match="shift"):
        create_fingerprint(cnn, digits[1], method=Constant(shift=2.0), **kwargs)
    with pytest.raises(UsageError):
        get_method(Constant(), shift=0.5)  # an instance already holds its parameters
    with pytest.raises(UsageError, match="bag"):
        Constant().generate(cnn, digits[1], 0, np.random.default_rng(0))


# --------------------------------------------------------------------------- the result object and the seed


def test_the_default_seed_is_drawn_recorded_and_reproduces(cnn, digits):
    """No seed given: one drawn from the OS CSPRNG, recorded in the file; giving it back reproduces the markers."""
    from tamperprobe.owner.generate import SEED_BITS, generate_fingerprint

    kwargs = dict(method="natural", select="random", size=3, bag=12, tolerance=1e-4, decoys=0)
    a, b = generate_fingerprint(cnn, digits[0], **kwargs), generate_fingerprint(cnn, digits[0], **kwargs)
    assert a.seed != b.seed and 0 <= a.seed < 2**SEED_BITS
    assert a.fingerprint.generator["seed"] == a.seed and b.fingerprint.generator["seed"] == b.seed
    again = generate_fingerprint(cnn, digits[0], **kwargs, seed=a.seed)
    assert again.fingerprint.inputs.tobytes() == a.fingerprint.inputs.tobytes()


def test_generated_says_how_it_chose_as_fields(trained_cnn, digits, tmp_path):
    """The method chosen and why, the selection used and its fallback, the bag: typed fields, nothing to parse back."""
    from tamperprobe.owner.generate import choose, generate_fingerprint

    ts = load_model(save_model(_Shifted(trained_cnn).eval(), tmp_path / "m.pt", digits[1].x))
    made = generate_fingerprint(ts, digits[0], size=2, bag=None, seed=0, tolerance=1e-4, decoys=0)
    assert made.method == "natural" and made.choice.reason is not None and made.choice.reason.startswith("natural")  # logits: advice
    assert made.choice.weak is None and made.bag == 100  # the default bag, computed once
    assert made.selection == "random" and made.selection_fallback is not None and made.selection_fallback.startswith("random (manc unavailable")
    assert made.fingerprint.generator["selection"] == made.selection_fallback  # the file records the fallback as before
    weak = choose("top1", "sensitive", {"steps": 2})
    assert weak.reason is None and weak.weak is not None and "weak under top1" in weak.weak
    with pytest.raises(UsageError, match="unknown parameter"):
        choose("logits", "natural", {"bogus": 1})  # refused before any model is needed


def test_cli_fingerprint_reports_the_drawn_seed(trained_cnn, digits, tmp_path):
    import json

    from typer.testing import CliRunner

    from tamperprobe.cli.app import app
    from tamperprobe.fingerprint import load

    model = save_model(trained_cnn, tmp_path / "m.pt", digits[1].x[:2])
    args = ["fingerprint", str(model), "--data", "digits", "--method", "natural", "--select", "random", "--size", "2", "--bag", "4"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "f.tpf"), "--no-check", "--tolerance", "1e-4", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["seed"] == load(tmp_path / "f.tpf").generator["seed"] and doc["bag"] == 4 and doc["method_reason"] is None

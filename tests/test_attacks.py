"""The attack suite: every kind tampers a copy, keeps the model useful, is seeded, and round-trips."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tamperprobe._params import Interval
from tamperprobe._torch import module_logits, predict
from tamperprobe.attacks import REGISTRY, Attack, AttackResult, attack_names, run_attack
from tamperprobe.attacks.base import weight_view
from tamperprobe.errors import UsageError

KINDS = [
    "trojan",
    "trojan-neuron",
    "poison-generic",
    "poison-specific",
    "int8",
    "int8-channel",
    "dynamic-int8",
    "fp16",
    "bf16",
    "floor",
    "prune",
    "finetune",
    "watermark",
    "noise",
]
# largest accuracy drop allowed on the digits test split (absolute). Poisoning takes one class
# (~10 % of the test set) away on purpose, so its bound is the class share plus a margin.
MAX_DROP = {
    "int8": 0.02,
    "int8-channel": 0.02,
    "dynamic-int8": 0.02,
    "fp16": 0.02,
    "bf16": 0.02,
    "floor": 0.02,
    "prune": 0.02,
    "noise": 0.02,
    "finetune": 0.05,
    "watermark": 0.05,
    "trojan": 0.05,
    "trojan-neuron": 0.05,
    "poison-generic": 0.15,
    "poison-specific": 0.15,
}
MIN_SUCCESS = {"trojan": 0.8, "trojan-neuron": 0.8, "poison-generic": 0.8, "poison-specific": 0.8}


@pytest.fixture(scope="module")
def split(digits):
    """The digits split the shared models were trained on (conftest ``digits``)."""
    return digits


@pytest.fixture(scope="module")
def models(trained_mlp, trained_cnn):
    """The conftest models, trained once per test run and shared with the other modules (attacks work on copies)."""
    return {"mlp": trained_mlp, "cnn": trained_cnn}


@pytest.fixture(scope="module")
def small(split):
    """A few hundred training and evaluation samples, every class present: for properties that do not depend on
    how much an attack trains (determinism, round trips, export against eager)."""
    tr, te = split
    cut = lambda ds, n: replace(ds, x=ds.x[:n], y=ds.y[:n])  # noqa: E731
    out = cut(tr, 320), cut(te, 120)
    assert all(set(d.y.tolist()) == set(range(10)) for d in out)
    return out


@pytest.fixture(scope="module")
def saved(models, small, tmp_path_factory):
    """The shared models written once per module as TorchScript (.pt) and torch.export (.pt2) files, traced on the small
    split: the tests that read them write their outputs to folders of their own and never change these files."""
    from tamperprobe.models import save_model

    folder = tmp_path_factory.mktemp("saved")
    example = small[0].x
    return {(arch, suffix): save_model(models[arch], folder / f"{arch}{suffix}", example) for arch in ("mlp", "cnn") for suffix in (".pt", ".pt2")}


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_weights(a, b) -> bool:
    wa, wb = weight_view(a), weight_view(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


_CACHE: dict[tuple[str, str, int], AttackResult] = {}


def _run(models, split, arch: str, kind: str, seed: int = 0) -> AttackResult:
    key = (arch, kind, seed)
    if key not in _CACHE:
        tr, te = split
        _CACHE[key] = run_attack(kind, models[arch], tr, seed=seed, eval_data=te)
    return _CACHE[key]


def test_names_and_flags():
    assert attack_names() == KINDS
    assert {k for k in KINDS if REGISTRY[k].random} == {
        "trojan",
        "trojan-neuron",
        "poison-generic",
        "poison-specific",
        "finetune",
        "watermark",
        "noise",
    }
    assert {k for k in KINDS if REGISTRY[k].needs_data} == {"trojan", "trojan-neuron", "poison-generic", "poison-specific", "finetune", "watermark"}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("kind", KINDS)
def test_attack_tampers_a_copy_and_keeps_the_model_useful(models, split, arch, kind):
    module = models[arch]
    before = _snapshot(module)
    flags = [m.training for m in module.modules()]
    r = _run(models, split, arch, kind)
    assert r.kind == kind and r.params["seed"] == 0
    assert r.changed > 0
    assert r.model is not module
    after = _snapshot(module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in module.modules()] == flags
    assert r.acc_before is not None and r.acc_after is not None
    assert r.acc_before > 0.9
    assert r.acc_after >= r.acc_before - MAX_DROP[kind], (kind, r.acc_before, r.acc_after)
    if kind in MIN_SUCCESS:
        assert r.success is not None and r.success > MIN_SUCCESS[kind], (kind, r.success)
    else:
        assert r.success is None
    out = module_logits(r.model, split[1].x[:5])
    assert out.shape == (5, 10) and np.isfinite(out).all()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("kind", KINDS)
def test_seeded(models, small, arch, kind):
    tr, te = small
    # training attacks: one epoch on a few hundred samples is enough to show (non-)determinism
    short = {"epochs": 1} if "epochs" in REGISTRY[kind].param_names() else {}
    first = run_attack(kind, models[arch], tr, seed=0, eval_data=te, **short)
    again = run_attack(kind, models[arch], tr, seed=0, eval_data=te, **short)
    assert _same_weights(first.model, again.model), "same seed must give bit-identical weights"
    other = run_attack(kind, models[arch], tr, seed=1, eval_data=te, **short)
    if REGISTRY[kind].random:
        assert not _same_weights(first.model, other.model), "another seed must give other weights"
    else:
        assert _same_weights(first.model, other.model)


def test_params_record_everything_and_replay(models, split, small):
    r = _run(models, split, "mlp", "trojan-neuron")
    assert {"target", "layer", "neurons", "size", "value", "epochs", "lr", "seed"} <= set(r.params)
    assert r.params["layer"] == "net.1" and r.params["size"] == 2 and r.params["value"] == 1.0
    # the replay: a short run (one epoch on the small split, another seed) and the same attack from everything it recorded
    tr, te = small
    short = run_attack("trojan-neuron", models["mlp"], tr, seed=5, eval_data=te, epochs=1)
    replay = run_attack("trojan-neuron", models["mlp"], tr, eval_data=te, **short.params)
    assert replay.params == short.params and _same_weights(short.model, replay.model)


def test_trojan_neuron_touches_only_the_chosen_units_onward(models, split):
    r = _run(models, split, "mlp", "trojan-neuron")
    orig, new = weight_view(models["mlp"]), weight_view(r.model)
    rows = (orig["net.1.weight"] != new["net.1.weight"]).any(1)
    assert 0 < int(rows.sum()) <= r.params["neurons"]
    cols = (orig["net.3.weight"] != new["net.3.weight"]).any(0)
    assert int(cols.sum()) <= r.params["neurons"] and bool((cols & ~rows).sum() == 0)
    assert torch.equal(orig["net.3.bias"], new["net.3.bias"])


def test_poison_specific_sends_the_class_to_the_chosen_one(models, split):
    tr, te = split
    r = run_attack("poison-specific", models["mlp"], tr, seed=0, eval_data=te, target=3, to=8)
    assert r.params["to"] == 8 and r.success > 0.8
    assert (predict(r.model, te.x[te.y == 3]) == 8).mean() == pytest.approx(r.success)


def test_default_split_and_data_free_runs(models, split):
    from tamperprobe.data import load_data

    full = load_data("digits")
    r = run_attack("int8", models["mlp"], full, seed=0)
    assert r.params["eval_fraction"] == 0.25 and r.acc_before is not None
    assert run_attack("fp16", models["mlp"], None).acc_before is None
    assert run_attack("noise", models["mlp"], None, seed=2).changed == round(0.001 * sum(p.numel() for p in models["mlp"].parameters()))


def test_usage_errors(models, split):
    tr, te = split
    from tamperprobe.data import Dataset

    unlabelled = Dataset(tr.x, None, "nolabels", 0.0, 1.0)
    for kind in ("trojan", "poison-generic", "finetune", "watermark"):
        with pytest.raises(UsageError, match="needs labelled training data"):
            run_attack(kind, models["mlp"], None)
        with pytest.raises(UsageError, match="no labels"):
            run_attack(kind, models["mlp"], unlabelled)
    with pytest.raises(UsageError, match="unknown attack"):
        run_attack("nope", models["mlp"], tr)
    with pytest.raises(UsageError, match="unknown parameter"):
        run_attack("prune", models["mlp"], None, amount=0.3)
    with pytest.raises(UsageError, match="ratio"):
        run_attack("prune", models["mlp"], None, ratio=1.5)
    with pytest.raises(UsageError, match="not a class"):
        run_attack("trojan", models["mlp"], tr, target=10)
    with pytest.raises(UsageError, match="consecutive"):
        from tamperprobe import zoo

        run_attack("trojan-neuron", zoo.build("perceptron"), tr)
    assert "\n" not in str(pytest.raises(UsageError, run_attack, "trojan", models["mlp"], None).value)


def test_prune_on_torchscript_matches_torch_prune(models, split):
    from tamperprobe._torch import quiet
    from tamperprobe.attacks.base import copy_module

    with quiet():
        scripted = torch.jit.trace(copy_module(models["cnn"]).eval(), torch.from_numpy(split[0].x[:2]))
    eager = run_attack("prune", models["cnn"], None, ratio=0.3)
    ts = run_attack("prune", scripted, None, ratio=0.3)
    we, wt = weight_view(eager.model), weight_view(ts.model)
    assert all(torch.equal(we[k], wt[k]) for k in we)
    assert eager.changed == ts.changed > 0


def test_weight_attacks_on_irnn():
    from tamperprobe import zoo

    torch.manual_seed(0)
    m = zoo.build("irnn", (1, 8, 8))
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    ref = module_logits(m, x)
    for kind in ("int8", "int8-channel", "fp16", "bf16", "floor", "prune", "noise"):
        # the untrained recurrence is the identity: 94 % of its entries are exact zeros, so prune harder
        extra = {"ratio": 0.9} if kind == "prune" else {"sigma": 0.5} if kind == "noise" else {}
        r = run_attack(kind, m, None, seed=0, **extra)
        assert r.changed > 0, kind
        out = module_logits(r.model, x)
        assert out.shape == (4, 10) and not np.array_equal(out, ref), kind


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_round_trip_through_files(saved, small, tmp_path, suffix):
    from tamperprobe.attacks.io import write_attacked
    from tamperprobe.models import load_model

    tr, te = small
    loaded = load_model(saved["cnn", suffix])
    ref = loaded.logits(te.x)
    for kind in ("int8", "fp16", "floor", "noise", "prune", "trojan"):
        r = run_attack(kind, loaded.module, tr, seed=0, eval_data=te, **({"epochs": 1} if kind == "trojan" else {}))
        assert r.changed > 0
        out = tmp_path / f"{kind}{suffix}"
        write_attacked(r.model, kind, loaded.format, out, tr)
        back = load_model(out)
        assert back.format == loaded.format
        np.testing.assert_allclose(back.logits(te.x), module_logits(r.model, te.x), rtol=0, atol=1e-5)
        assert not np.array_equal(back.logits(te.x), ref)
    np.testing.assert_array_equal(loaded.logits(te.x), ref)  # the loaded input is untouched


def test_round_trip_reference_and_dynamic_int8(models, split, tmp_path):
    from safetensors.torch import save_file

    from tamperprobe.attacks.io import write_attacked
    from tamperprobe.models import load_model

    tr, te = split
    weights = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in models["mlp"].state_dict().items()}, str(weights))
    loaded = load_model("tamperprobe.zoo:digits_mlp", weights)
    r = run_attack("floor", loaded.module, tr, seed=0, eval_data=te)
    write_attacked(r.model, "floor", loaded.format, tmp_path / "floor.safetensors", tr)
    back = load_model("tamperprobe.zoo:digits_mlp", tmp_path / "floor.safetensors")
    np.testing.assert_array_equal(back.logits(te.x), module_logits(r.model, te.x))

    q = run_attack("dynamic-int8", loaded.module, tr, seed=0, eval_data=te)
    assert q.changed > 0 and q.acc_after >= q.acc_before - 0.02
    with pytest.raises(UsageError, match="TorchScript"):
        write_attacked(q.model, "dynamic-int8", loaded.format, tmp_path / "q.safetensors", tr)
    write_attacked(q.model, "dynamic-int8", loaded.format, tmp_path / "q.pt", tr)
    # dynamic quantization scales the activations per batch: compare with the same batching
    np.testing.assert_allclose(
        load_model(tmp_path / "q.pt").logits(te.x, batch_size=64), module_logits(q.model, te.x, batch_size=64), rtol=0, atol=1e-5
    )


def test_trojan_neuron_on_export_matches_eager(models, saved, small):
    from tamperprobe.models import load_model

    tr, te = small
    loaded = load_model(saved["cnn", ".pt2"])
    ex = run_attack("trojan-neuron", loaded.module, tr, seed=0, eval_data=te, epochs=1)
    eager = run_attack("trojan-neuron", models["cnn"], tr, seed=0, eval_data=te, epochs=1)
    assert ex.params == eager.params and ex.changed == eager.changed > 0
    assert ex.success == eager.success


def test_unsupported_on_torchscript(saved, split):
    from tamperprobe.models import load_model

    tr, _ = split
    for suffix in (".pt", ".pt2"):
        loaded = load_model(saved["mlp", suffix])
        if suffix == ".pt":
            with pytest.raises(UsageError, match="trojan-neuron needs"):
                run_attack("trojan-neuron", loaded.module, tr)
        with pytest.raises(UsageError, match="dynamic-int8 needs"):
            run_attack("dynamic-int8", loaded.module, tr)


# -- adding an attack ---------------------------------------------------------------------


class ShiftBias(Attack):
    """Add a constant to every bias (a test attack: one class and one registry line)."""

    name = "shift-bias"
    constraints = {"by": Interval(0, None, closed="neither")}

    def __init__(self, *, by: float = 0.5) -> None:
        self.by = by

    def apply(self, model, ctx):
        with torch.no_grad():
            for name, t in model.named_parameters():
                if name.endswith("bias"):
                    t.add_(self.by)
        return model


def test_a_registered_attack_runs_by_name_and_as_an_instance(models, split, monkeypatch):
    from tamperprobe.evaluation import run_evaluation
    from tamperprobe.models import TorchModel
    from tamperprobe.owner.methods import method_class

    monkeypatch.setitem(REGISTRY, "shift-bias", ShiftBias)
    assert attack_names()[-1] == "shift-bias" and REGISTRY["shift-bias"] is ShiftBias
    tr, te = split
    by_name = run_attack("shift-bias", models["mlp"], tr, seed=3, eval_data=te, by="0.25")  # text, coerced by annotation
    as_instance = run_attack(ShiftBias(by=0.25), models["mlp"], tr, seed=3, eval_data=te)
    assert by_name.kind == as_instance.kind == "shift-bias"
    assert by_name.params == as_instance.params == {"by": 0.25, "seed": 3}
    assert by_name.changed == as_instance.changed == sum(p.numel() for n, p in models["mlp"].named_parameters() if n.endswith("bias"))
    assert _same_weights(by_name.model, as_instance.model) and by_name.acc_before == as_instance.acc_before
    assert repr(ShiftBias(by=0.25)) == "ShiftBias(by=0.25)"
    with pytest.raises(UsageError, match="unknown parameter"):
        run_attack("shift-bias", models["mlp"], None, amount=1)
    with pytest.raises(UsageError, match="by must be > 0"):
        run_attack(ShiftBias(by=-1.0), models["mlp"], None)
    with pytest.raises(UsageError, match="constructor"):
        run_attack(ShiftBias(), models["mlp"], None, by=1.0)

    # through the evaluation: by name with text parameters, and as instances (attack and method)
    common = dict(specs=["top1", "logits"], bag=12, resamples=50, select="random", seed=1, baselines=False, runtimes=[], trials=2)
    model = TorchModel(models["mlp"], "mlp")
    named = run_evaluation(model, tr, methods=["natural"], attacks=["shift-bias"], attack_params={"shift-bias": {"by": "0.5"}}, **common)
    built = run_evaluation(model, tr, methods=[method_class("natural")()], attacks=[ShiftBias(by=0.5)], **common)
    assert not named.errors and not built.errors, (named.errors, built.errors)
    assert [(a["attack"], a["trial"]) for a in named.attacks] == [("shift-bias", 0)]  # not random: one instance
    for table in ("methods", "attacks", "trigger", "detection", "key_sizes"):
        assert getattr(named, table) == getattr(built, table), table
    assert named.attacks[0]["params"]["by"] == 0.5
    assert any(t["changed"] > 0 for t in named.trigger if t["spec"] == "logits")


# -- CLI ----------------------------------------------------------------------------------


def _cli(*args: str):
    from tamperprobe.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_train(tmp_path):
    from tamperprobe.models import load_model

    out = tmp_path / "m.pt2"
    res = _cli("train", "mlp", "--data", "digits", "--out", out, "--epochs", "1", "--seed", "1")
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output
    assert load_model(out).format == "export"
    res = _cli("train", "resnet", "--data", "digits", "--out", out)
    assert res.exit_code == 2 and "unknown architecture" in res.output


def test_cli_attack(models, saved, split, tmp_path):
    from tamperprobe.models import load_model

    res = _cli("attack", saved["mlp", ".pt"], "--kind", "prune", "--data", "digits", "--out", tmp_path / "p.pt", "--param", "ratio=0.3")
    assert res.exit_code == 0, res.stderr
    assert "accuracy before" in res.stdout and "changed weights" in res.stdout
    r = run_attack("prune", models["mlp"], None, ratio=0.3)
    np.testing.assert_allclose(load_model(tmp_path / "p.pt").logits(split[1].x), module_logits(r.model, split[1].x), atol=1e-5)


def test_cli_attack_errors_exit_2(saved, tmp_path):
    src = str(saved["mlp", ".pt"])
    cases = [
        (["--kind", "trojan", "--out", str(tmp_path / "t.pt")], "needs labelled training data"),
        (["--kind", "bogus", "--out", str(tmp_path / "t.pt")], "unknown attack"),
        (["--kind", "prune", "--param", "ratio", "--out", str(tmp_path / "t.pt")], "expected key=value"),
        (["--kind", "prune", "--param", "ratio=x", "--out", str(tmp_path / "t.pt")], "must be a number"),
        (["--kind", "prune", "--param", "amount=0.3", "--out", str(tmp_path / "t.pt")], "unknown parameter"),
        (["--kind", "prune", "--out", str(tmp_path / "t.pt2")], "written back as TorchScript"),
    ]
    for args, message in cases:
        res = _cli("attack", src, *args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.stderr and "Traceback" not in res.output
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_cli_attack_help_lists_every_attack_with_its_description():
    res = _cli("attack", "--help")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for name in attack_names():
        assert name in text
    assert "Global L1 unstructured pruning" in text


def test_register_on_a_fresh_app(saved, tmp_path):
    import typer
    from typer.testing import CliRunner

    from tamperprobe.cli import lab as cli_lab

    app = typer.Typer()
    cli_lab.register(app)
    src = saved["mlp", ".pt"]
    runner = CliRunner()
    res = runner.invoke(app, ["attack", str(src), "--kind", "fp16", "--out", str(tmp_path / "h.pt")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "h.pt").exists()
    res = runner.invoke(app, ["attack", str(src), "--kind", "int8", "--out", str(tmp_path / "h.onnx")])
    assert res.exit_code == 2

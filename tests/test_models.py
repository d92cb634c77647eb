import numpy as np
import pytest
import torch

from tamperprobe.errors import ModelLoadError, UsageError
from tamperprobe.models import TorchModel, load_model, save_model


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_saved_formats_give_same_logits(tmp_path, trained_cnn, digits, suffix):
    x = digits[1].x[:33]
    ref = trained_cnn(torch.from_numpy(x)).detach().numpy()
    m = load_model(save_model(trained_cnn, tmp_path / f"m{suffix}", x))
    out = m.logits(x, batch_size=7)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert m.digest().startswith("sha256:")


def test_reference_with_weights_and_digest(tmp_path, trained_cnn, digits):
    save_model(trained_cnn, tmp_path / "w.safetensors", digits[1].x)
    torch.save(trained_cnn.state_dict(), tmp_path / "w.pth")
    a = load_model("tamperprobe.zoo:digits_cnn", tmp_path / "w.safetensors")
    b = load_model("tamperprobe.zoo:digits_cnn", tmp_path / "w.pth")
    assert a.digest() == b.digest()
    np.testing.assert_array_equal(a.logits(digits[1].x[:5]), b.logits(digits[1].x[:5]))
    c = load_model("tamperprobe.zoo:digits_cnn")
    assert c.digest() != a.digest()


def test_state_dict_as_model_is_explained(tmp_path, trained_cnn):
    torch.save(trained_cnn.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="--weights"):
        load_model(tmp_path / "sd.pt")


@pytest.mark.parametrize(
    "name, content, msg",
    [
        ("m.pt", b"garbage", "not a TorchScript"),
        ("m.pt2", b"garbage", "not a torch.export"),
        ("m.onnx", b"garbage", "cannot load ONNX"),
        ("m.xyz", b"", "unknown model format"),
    ],
)
def test_bad_model_files(tmp_path, name, content, msg):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelLoadError, match=msg):
        load_model(tmp_path / name)


def test_bad_references(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match="cannot import"):
        load_model("no_such_pkg_xyz:model")
    with pytest.raises(ModelLoadError, match="no attribute"):
        load_model("tamperprobe.zoo:nothing_here")
    with pytest.raises(ModelLoadError, match="do not fit"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "w.pth")
        load_model("tamperprobe.zoo:digits_cnn", tmp_path / "w.pth")


def test_pickled_weights_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model("tamperprobe.zoo:digits_cnn", tmp_path / "evil.pth")


def test_onnx_needs_torch_for_generation(tmp_path, trained_cnn, digits):
    m = load_model(save_model(trained_cnn, tmp_path / "m.onnx", digits[1].x))
    with pytest.raises(UsageError, match="PyTorch form"):
        m.require_torch("fingerprint generation")


# ----------------------------------------------------------------------------- models that just work (issue 12)


def test_a_class_without_weights_is_refused(tmp_path):
    with pytest.raises(UsageError, match="random weights.*--weights"):
        load_model("tamperprobe.zoo:CNN")
    from tamperprobe import zoo
    from tamperprobe.models import save_state_dict

    save_state_dict(zoo.CNN(), tmp_path / "w.safetensors")
    assert load_model("tamperprobe.zoo:CNN", tmp_path / "w.safetensors").format == "module"
    assert load_model("tamperprobe.zoo:digits_cnn").format == "module"  # a factory may load its own weights


def test_factory_arguments(tmp_path):
    from tamperprobe.models import parse_model_args

    args = parse_model_args(["side=8", "classes=3", "hidden=16"])
    assert args == {"side": 8, "classes": 3, "hidden": 16}
    from tamperprobe import zoo
    from tamperprobe.models import save_state_dict

    save_state_dict(zoo.CNN(side=8, classes=3, hidden=16), tmp_path / "w.safetensors")
    m = load_model("tamperprobe.zoo:CNN", tmp_path / "w.safetensors", model_args=args)
    assert m.logits(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 3)
    with pytest.raises(UsageError, match="--model-arg"):
        load_model("tamperprobe.zoo:digits_cnn", model_args={"nope": 1})
    with pytest.raises(UsageError, match="key=value"):
        parse_model_args(["novalue"])


def test_state_dict_mismatch_names_every_kind_of_key(tmp_path):
    from tamperprobe import zoo
    from tamperprobe.models import save_state_dict

    state_of = zoo.CNN(side=8, classes=3)  # another head: shapes differ
    save_state_dict(state_of, tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError) as err:
        load_model("tamperprobe.zoo:digits_cnn", tmp_path / "w.safetensors")
    msg = str(err.value)
    assert "of another shape" in msg and "head.3.weight (file (3, 64), model (10, 64))" in msg and "\n" not in msg
    import torch
    from safetensors.torch import save_file

    state = {k: v for k, v in zoo.digits_cnn().state_dict().items() if not k.startswith("head.3")}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "w2.safetensors"))
    with pytest.raises(ModelLoadError, match=r"2 missing: head\.3\.weight, head\.3\.bias; 1 unexpected: extra\.weight"):
        load_model("tamperprobe.zoo:digits_cnn", tmp_path / "w2.safetensors")


def test_weights_file_given_as_a_model_gets_a_hint(tmp_path):
    from tamperprobe import zoo
    from tamperprobe.models import save_state_dict

    save_state_dict(zoo.digits_cnn(), tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match="looks like a weights file.*--weights"):
        load_model(tmp_path / "w.safetensors")


def test_timm_and_hugging_face_style_factories(tmp_path, monkeypatch):
    """Models from timm (``timm.create_model(name, num_classes=...)``) and Hugging Face image classifiers
    (``from_pretrained(folder)``, outputs with ``.logits``) load with --model-arg, no wrapper module."""
    import sys
    import types

    import torch
    from torch import nn

    hub = types.ModuleType("fakehub")

    class TinyNet(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            return self.fc(x.flatten(1))

    def create_model(model_name, pretrained=False, num_classes=1000):  # timm's signature
        assert model_name == "tiny" and pretrained is False
        torch.manual_seed(0)
        return TinyNet(num_classes).eval()

    class Output(dict):
        """Like transformers' ImageClassifierOutput: a mapping whose first entry is the logits."""

    class TinyForImageClassification(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyNet(4)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path):
            m = cls()
            m.net.load_state_dict(torch.load(f"{pretrained_model_name_or_path}/weights.pt", weights_only=True))
            return m.eval()

        def forward(self, pixel_values):
            return Output(logits=self.net(pixel_values))

    hub.create_model = create_model
    hub.TinyForImageClassification = TinyForImageClassification
    monkeypatch.setitem(sys.modules, "fakehub", hub)
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    timm_like = load_model("fakehub:create_model", model_args={"model_name": "tiny", "num_classes": 5})
    assert timm_like.logits(x).shape == (3, 5)
    (tmp_path / "hf").mkdir()
    torch.save(TinyNet(4).state_dict(), tmp_path / "hf" / "weights.pt")
    hf_like = load_model("fakehub:TinyForImageClassification.from_pretrained", model_args={"pretrained_model_name_or_path": str(tmp_path / "hf")})
    assert hf_like.logits(x).shape == (3, 4)


# ----------------------------------------------------------------------------- no code from suspect files


class _MakeDir:
    """Unpickling this creates a folder: a harmless stand-in for attacker code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def _rewrite_zip(src, dst, change):
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = change(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item, data)
        extra = change(None, None)
        if extra:
            for name, data in extra.items():
                zout.writestr(name, data)


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory):
    """One plain .pt2 (an untrained MLP), exported once for every crafted file made from it (each in a folder of its own)."""
    from tamperprobe import zoo

    return save_model(zoo.build("mlp", (1, 8, 8)), tmp_path_factory.mktemp("good") / "good.pt2", np.zeros((2, 1, 8, 8), np.float32))


def _evil_pt2(good, tmp_path, how):
    """A .pt2 that makes torch.export.load unpickle attacker data (three different ways), rewritten from ``good``."""
    import io
    import json
    import pickle

    import torch

    marker = tmp_path / f"pwned-{how}"
    payload = pickle.dumps(_MakeDir(marker), protocol=2)

    def change(name, data):
        if name is None:
            return {f"{root}extra/notes.txt": b"hello"} if how == "extra" else None
        if how == "weights" and name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"]))
            cfg["config"][first]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if how == "weights" and name.endswith("/weight_0"):
            return payload
        if how == "sample_inputs" and "/data/sample_inputs/" in name:
            buf = io.BytesIO()
            torch.save(_MakeDir(marker), buf)
            return buf.getvalue()
        return data

    import zipfile

    with zipfile.ZipFile(good) as zf:
        root = zf.namelist()[0].split("/", 1)[0] + "/"
    evil = tmp_path / f"evil-{how}.pt2"
    _rewrite_zip(good, evil, change)
    return evil, marker


@pytest.mark.parametrize("how", ["weights", "sample_inputs"])
def test_crafted_pt2_would_run_code_in_torch(good_pt2, tmp_path, how):
    """The danger is real: torch.export.load itself runs the payload (so the refusal below means something)."""
    import torch

    evil, marker = _evil_pt2(good_pt2, tmp_path, how)
    try:
        torch.export.load(str(evil))
    except Exception:
        pass
    assert marker.exists()


@pytest.mark.parametrize("how", ["weights", "sample_inputs", "extra"])
def test_crafted_pt2_is_refused_before_anything_is_unpickled(good_pt2, tmp_path, how):
    evil, marker = _evil_pt2(good_pt2, tmp_path, how)
    with pytest.raises(ModelLoadError, match="could run code"):
        load_model(evil)
    assert not marker.exists()


def test_plain_pt2_still_loads(tmp_path):
    from tamperprobe import zoo

    m = zoo.build("mlp", (1, 8, 8)).eval()
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    p = save_model(m, tmp_path / "ok.pt2", x)
    np.testing.assert_allclose(load_model(p).logits(x), TorchModel(m).logits(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- models whose output is not a tensor (issue 17.7)


class _Output(dict):
    """Like Hugging Face's ModelOutput: a dict (here with a loss first) that also exposes fields as attributes."""

    def __getattr__(self, name):
        return self[name]


class _DictNet(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        z = self.fc(x.flatten(1))
        if self.kind == "tuple":
            return z, z.sum()
        return (_Output if self.kind == "model-output" else dict)(loss=z.sum(), logits=z)


@pytest.mark.parametrize("kind", ["dict", "model-output", "tuple"])
@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_models_returning_dicts_are_written_as_programs_of_their_logits(tmp_path, kind, suffix):
    m = _DictNet(kind).eval()
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    loaded = load_model(save_model(m, tmp_path / f"m{suffix}", x))
    np.testing.assert_allclose(loaded.logits(x), m(torch.from_numpy(x))[0 if kind == "tuple" else "logits"].detach().numpy(), atol=1e-5)
    if suffix != ".onnx":
        assert isinstance(loaded.module(torch.from_numpy(x)), torch.Tensor)  # one tensor out, for any runtime or server


def test_tensor_models_are_written_unwrapped(tmp_path, trained_cnn, digits):
    """Models that already return a tensor keep their parameter names (and weight digest)."""
    m = load_model(save_model(trained_cnn, tmp_path / "m.pt", digits[1].x))
    assert m.digest() == TorchModel(trained_cnn).digest()


def test_attack_on_a_dict_model_writes_torchscript(tmp_path):
    from tamperprobe.attacks.io import write_attacked
    from tamperprobe.data import Dataset

    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    m = _DictNet("model-output").eval()
    out = write_attacked(m, "int8", "module", tmp_path / "attacked.pt", Dataset(x, np.zeros(4, np.int64), "t", 0.0, 1.0))
    np.testing.assert_allclose(load_model(out).logits(x), m(torch.from_numpy(x)).logits.detach().numpy(), atol=1e-5)


VIT_FACTORY = """
import torch
from transformers import ViTConfig, ViTForImageClassification


def build():
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(cfg).eval()
"""


def test_hugging_face_vit_attack_writes_torchscript_pt2_and_onnx(tmp_path, monkeypatch):
    """The issue's case: a transformers ViT built by a factory, attacked with --out .pt (and .pt2, .onnx)."""
    pytest.importorskip("transformers")
    from typer.testing import CliRunner

    from tamperprobe.cli.app import app
    from tamperprobe.data import load_data

    (tmp_path / "hfvit.py").write_text(VIT_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    eager = load_model("hfvit:build")
    save_model(eager.module, tmp_path / "vit.safetensors", np.zeros((2, 1, 8, 8), np.float32))
    x = load_data("digits").x[:16]
    want = eager.logits(x)
    for suffix in (".pt", ".pt2", ".onnx"):
        r = CliRunner().invoke(
            app, ["attack", "hfvit:build", "--weights", "vit.safetensors", "--kind", "fp16", "--out", f"attacked{suffix}", "--data", "digits"]
        )
        assert r.exit_code == 0, (r.stdout, r.stderr)
        got = load_model(tmp_path / f"attacked{suffix}").logits(x)
        assert got.shape == want.shape and 0 < np.abs(got - want).max() < 0.05  # the fp16 copy: close, not equal

import numpy as np
import pytest
import torch

from tamperprobe.errors import ModelLoadError, UsageError
from tamperprobe.models import load_model, save_model


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

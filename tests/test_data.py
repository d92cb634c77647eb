import gzip
import struct

import numpy as np
import pytest

from tamperprobe.data import load_data
from tamperprobe.errors import DataError


def test_digits_builtin():
    d = load_data("digits")
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == np.float32
    assert d.y.shape == (1797,) and set(np.unique(d.y)) == set(range(10))
    assert (d.low, d.high) == (0.0, 1.0) and d.x.min() >= 0 and d.x.max() <= 1


def test_bundled_digits_are_scikit_learns():
    """The digits ship with tamperprobe (no scikit-learn needed); they are exactly scikit-learn's load_digits."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    ref = sklearn_datasets.load_digits()
    d = load_data("digits")
    assert np.array_equal(d.x, (ref.images.astype(np.float32) / 16.0)[:, None, :, :])
    assert np.array_equal(d.y, ref.target) and d.x.flags["C_CONTIGUOUS"]


def test_split_is_seeded_and_disjoint():
    d = load_data("digits")
    a1, b1 = d.split(0.3, seed=1)
    a2, b2 = d.split(0.3, seed=1)
    assert np.array_equal(a1.x, a2.x) and np.array_equal(b1.y, b2.y)
    assert len(a1) + len(b1) == len(d) and len(b1) == round(0.3 * len(d))


def test_npz_and_range_override(tmp_path):
    x = np.linspace(-1, 1, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    d = load_data(tmp_path / "d.npz")
    assert np.array_equal(d.x, x) and (d.low, d.high) == (-1.0, 1.0)
    d2 = load_data(tmp_path / "d.npz", low=-2, high=2)
    assert (d2.low, d2.high) == (-2.0, 2.0)
    with pytest.raises(DataError, match="outside the input range"):
        load_data(tmp_path / "d.npz", low=0.0)


@pytest.mark.parametrize(
    "arrays, msg",
    [
        ({"z": np.zeros((2, 2))}, "no array 'x'"),
        ({"x": np.zeros(3)}, "shape"),
        ({"x": np.array([[np.nan]])}, "NaN"),
        ({"x": np.zeros((2, 2)), "y": np.zeros(3, dtype=np.int64)}, "one per row"),
    ],
)
def test_npz_errors(tmp_path, arrays, msg):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=msg):
        load_data(tmp_path / "d.npz")


def test_npz_pickle_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.array([object()], dtype=object), allow_pickle=True)
    import zipfile

    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
        z.write(tmp_path / "x.npy", "x.npy")
    with pytest.raises(DataError, match="cannot read"):
        load_data(tmp_path / "d.npz")


def _idx(path, arr, gz):
    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    (gzip.open if gz else open)(path, "wb").write(head + arr.tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(4, 5, 5))
    sfx = ".gz" if gz else ""
    _idx(tmp_path / f"t-images-idx3-ubyte{sfx}", imgs, gz)
    _idx(tmp_path / f"t-labels-idx1-ubyte{sfx}", [1, 2, 3, 4], gz)
    d = load_data(tmp_path)
    assert d.x.shape == (4, 1, 5, 5)
    np.testing.assert_array_equal(d.x[:, 0] * 255, imgs.astype(np.float32))
    assert d.y.tolist() == [1, 2, 3, 4]


def test_idx_errors(tmp_path):
    (tmp_path / "bad-idx3-ubyte").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not an IDX"):
        load_data(tmp_path)
    (tmp_path / "bad-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 2, 2) + b"\x00" * 5)
    with pytest.raises(DataError, match="header says 8"):
        load_data(tmp_path)


def test_unknown_data():
    with pytest.raises(DataError, match="data not found"):
        load_data("nope")


class _ViewNet:
    """Built lazily (torch import): a LeNet-style model that flattens with ``.view``, like advertorch's LeNet5."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class ViewNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3, padding=1)
                self.fc = nn.Linear(4 * 6 * 6, 10)

            def forward(self, x):
                out = torch.relu(self.conv(x))
                return self.fc(out.view(out.size(0), -1))

        return ViewNet().eval()


def test_idx_batches_reach_the_model_in_standard_layout(tmp_path):
    """Issue 12: IDX images (N, H, W) gained their channel axis as a stride-0 view; a shuffled split then gave the
    (N, 1, H, W) batch a channel stride of 1, torch took it for channels-last and a model's ``.view`` failed."""
    from tamperprobe.models import TorchModel

    arr = (np.arange(30 * 36) % 256).astype(np.uint8).reshape(30, 6, 6)
    _idx(tmp_path / "train-images-idx3-ubyte", arr, gz=False)
    ds = load_data(tmp_path)
    train, test = ds.split(0.3, seed=1)
    model = TorchModel(_ViewNet.build())
    for part in (train, test):
        for batch in (1, 7, 64):
            z = model.logits(part.x, batch_size=batch)
            assert z.shape == (len(part), 10)
    # the layout torch sees is the standard one, even for an array whose channel axis has stride 1
    from tamperprobe._torch import to_tensor

    odd = np.lib.stride_tricks.as_strided(np.zeros(2 * 36, np.float32), (2, 1, 6, 6), (144, 4, 24, 4))
    assert to_tensor(odd).stride() == (36, 36, 6, 1)

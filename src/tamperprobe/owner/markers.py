"""Small helpers every marker method may use: natural seeds, the 8-bit domain, image metrics, margin checks.

* ``sample_indices`` draws natural seeds from a data set: without replacement while the data
  lasts, then with replacement for the rest, so every sample is used before any repeats.
* ``encode_uint8`` / ``decode_uint8``: markers sent as exact 8-bit images. The model sees
  ``InputSpec.decode`` of them (``UINT8_DECODE``, computed in float32); encoding rounds to the
  nearest 8-bit value.
* ``psnr_db`` / ``snr_db``: how far a marker lies from its natural seed, in decibels.
* ``checked_margins``: labels and the smallest top-1 margin over the batch sizes verification
  runs at, so a marker's guarantee holds whichever batch size the serving side uses.
"""

from __future__ import annotations

import numpy as np

from ..data import InputSpec
from ..errors import UsageError
from ..models import Model
from ..outputs import top_margin

CHECK_BATCHES = (1, 64, 256)  # 256: Model.logits' default; 64: LocalTarget's
UINT8_DECODE = "x = (u.astype(float32) / float32(255)) * float32(high - low) + float32(low)"


def sample_indices(n_available: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices into ``range(n_available)``: without replacement while possible, then with."""
    if n_available < 1:
        raise UsageError("the data set is empty")
    if n <= n_available:
        return rng.permutation(n_available)[:n].astype(np.int64)
    extra = rng.integers(0, n_available, size=n - n_available)
    return np.concatenate([rng.permutation(n_available), extra]).astype(np.int64)


def decode_uint8(u: np.ndarray, low: float, high: float) -> np.ndarray:
    """The model-domain float32 image of an 8-bit marker (``InputSpec.decode``)."""
    return InputSpec((), "uint8", low, high).decode(np.asarray(u, dtype=np.uint8))


def encode_uint8(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """The nearest 8-bit image of a model-domain input (inverse of ``decode_uint8`` up to rounding)."""
    u = np.rint((np.asarray(x, dtype=np.float64) - low) / (high - low) * 255.0)
    return np.clip(u, 0, 255).astype(np.uint8)


def psnr_db(marker: np.ndarray, seed: np.ndarray, low: float, high: float) -> np.ndarray:
    """Peak signal-to-noise ratio (dB) of each marker against its seed; ``inf`` when identical."""
    d = (np.asarray(marker, dtype=np.float64) - np.asarray(seed, dtype=np.float64)).reshape(len(marker), -1)
    mse = (d**2).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10.0 * np.log10((high - low) ** 2 / np.maximum(mse, 1e-300)), np.inf)


def snr_db(marker: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Signal (seed power) to noise (marker − seed power) ratio in dB; ``inf`` when identical."""
    s = np.asarray(seed, dtype=np.float64).reshape(len(seed), -1)
    d = np.asarray(marker, dtype=np.float64).reshape(len(marker), -1) - s
    noise = (d**2).mean(axis=1)
    power = (s**2).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(noise > 0, 10.0 * np.log10(np.maximum(power, 1e-300) / np.maximum(noise, 1e-300)), np.inf)


def checked_margins(model: Model, x: np.ndarray, batches: tuple[int, ...] = CHECK_BATCHES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, the smallest top-1 margin over ``batches``, and whether the label agrees in all of them.

    ``x`` is in the model's domain (decode 8-bit markers first).
    """
    if not batches:
        raise UsageError("checked_margins needs at least one batch size")
    labels, worst = top_margin(model.logits(x, batch_size=batches[0]))
    same = np.ones(len(x), dtype=bool)
    for b in batches[1:]:
        lab, m = top_margin(model.logits(x, batch_size=b))
        same &= lab == labels
        worst = np.minimum(worst, m)
    return labels, worst, same

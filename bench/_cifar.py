"""The pretrained CIFAR-10 ResNet-56 and its 1,017 test images, as the CIFAR benchmarks load them.

Both live outside the repository (``../shared`` next to it; nothing is downloaded): the model
definition is a plain-PyTorch file shipped with the weights, so it is imported from its path,
and the images are uint8, divided by 255 for the model (its normalisation is inside ``forward``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
from torch import nn

from tamperprobe.data import Dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TAMPERPROBE_SHARED", REPO.parent / "shared"))  # $TAMPERPROBE_SHARED: from a git worktree elsewhere
MODEL_DIR = SHARED / "models" / "cifar10_resnet56"
DATA_FILE = SHARED / "data" / "cifar10" / "test1017_uint8.npz"
SOURCE = "cifar10_resnet56"  # the model's name in reports


def available() -> str | None:
    """None when the model and the data are there, else what is missing."""
    missing = [str(p) for p in (MODEL_DIR / "model_def.py", MODEL_DIR / "resnet56_cifar10.pt", DATA_FILE) if not p.exists()]
    return ", ".join(missing) or None


def load_resnet56() -> nn.Module:
    """The pretrained ResNet-56 in eval mode (float inputs in [0, 1], 10 logits)."""
    spec = importlib.util.spec_from_file_location("cifar10_resnet56_def", MODEL_DIR / "model_def.py")
    assert spec is not None and spec.loader is not None
    definition = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(definition)
    module: nn.Module = definition.load(str(MODEL_DIR / "resnet56_cifar10.pt"))
    return module


def load_cifar10() -> Dataset:
    """The first 1,017 CIFAR-10 test images as float32 in [0, 1] (N×3×32×32) with their labels."""
    with np.load(DATA_FILE) as f:
        x, y = f["x"].astype(np.float32) / np.float32(255.0), f["y"].astype(np.int64)
    return Dataset(x, y, "cifar10-test1017", 0.0, 1.0)

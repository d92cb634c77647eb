"""Fixtures of the interoperability tests against real serving stacks (helpers in ``_interop.py``)."""

from __future__ import annotations

import pytest
from _interop import Assets


@pytest.fixture(scope="session")
def interop_assets(trained_cnn, digits, tmp_path_factory) -> Assets:
    from tamperprobe.attacks import run_attack
    from tamperprobe.fingerprint import load, save
    from tamperprobe.models import TorchModel, save_model
    from tamperprobe.owner.generate import create_fingerprint

    train, test = digits
    d = tmp_path_factory.mktemp("interop")
    fp = create_fingerprint(TorchModel(trained_cnn, "cnn"), train, method="boundary", size=8, bag=24, seed=0, output_spec="top1")
    fp_path = save(fp, d / "cnn.tpf")
    modules = {
        "intact": trained_cnn,
        "noise": run_attack("noise", trained_cnn, train, seed=0).model,
        "fp16": run_attack("fp16", trained_cnn, train, seed=0).model,
    }
    models = {variant: save_model(module, d / f"{variant}.pt", test.x[:4]) for variant, module in modules.items()}
    return Assets(d, load(fp_path), fp_path, models, [int(s) for s in train.x.shape[1:]])

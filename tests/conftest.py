"""Shared fixtures: a tiny trained model on scikit-learn's digits, seeded.

torch is imported inside the fixtures, not here: xdist's controller loads this file too and never runs a test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread for the whole session, module and session fixtures included: tiny models run
    many times faster on one thread than on two competing for a busy 2-core machine. Tests that
    measure thread counts set them explicitly."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _click_command_built_once():
    """typer builds the app's whole click command tree (``typing.get_type_hints`` of every option of every command) on
    each ``CliRunner.invoke`` and each in-process ``main()``: here once per app for the session. A click command is
    reusable (each invocation makes its own context), as in any process that runs its CLI twice."""
    import typer.main
    import typer.testing

    build = typer.main.get_command
    built: dict[int, tuple[object, object]] = {}

    def get_command(app):
        if id(app) not in built:
            built[id(app)] = (app, build(app))  # the app is kept, so its id is never reused
        return built[id(app)][1]

    typer.main.get_command = typer.testing._get_command = get_command
    yield
    typer.main.get_command = typer.testing._get_command = build


@pytest.fixture(scope="session", autouse=True)
def _private_config(tmp_path_factory):
    """A config folder of the session's own: the default signing key (created on first use by ``fingerprint.save``)
    and the trusted keys live there, never in the user's real config; subprocesses inherit it."""
    import os

    saved = {k: os.environ.get(k) for k in ("XDG_CONFIG_HOME", "TAMPERPROBE_TRUST_KEYS", "TAMPERPROBE_SIGNING_KEY", "TAMPERPROBE_FINGERPRINT_KEY")}
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config"))
    for k in saved:
        if k != "XDG_CONFIG_HOME":
            os.environ.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path_factory, monkeypatch):
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    monkeypatch.setenv("TAMPERPROBE_HISTORY", str(tmp_path_factory.mktemp("hist") / "history.sqlite"))
    monkeypatch.setenv("TAMPERPROBE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def digits():
    from tamperprobe.data import load_data

    return load_data("digits").split(0.3, seed=0)


def _trained(kind, digits, tmp_path_factory):
    """The zoo model ``kind`` fitted to the digits (seeded), trained once per test run: with several xdist workers the
    first one to get here trains it and saves its weights for the others (a lock file orders them)."""
    import fcntl
    import os

    import torch

    from tamperprobe import zoo
    from tamperprobe.train import fit

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, shared by its workers (each has a folder of its own inside)
    path = root / f"trained-{kind}.pt"
    with open(root / f"trained-{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        torch.manual_seed(0)  # the initial weights, when trained here
        m = zoo.build(kind, (1, 8, 8))
        if path.exists():
            m.load_state_dict(torch.load(path, weights_only=True))
            return m.eval()
        train, _ = digits
        m = fit(m, train.x, train.y, epochs=8, lr=3e-3, seed=0)
        torch.save(m.state_dict(), path)
        return m


@pytest.fixture(scope="session")
def trained_cnn(digits, tmp_path_factory):
    return _trained("cnn", digits, tmp_path_factory)


@pytest.fixture(scope="session")
def trained_mlp(digits, tmp_path_factory):
    return _trained("mlp", digits, tmp_path_factory)


# --- how the suite is spread over xdist workers ---------------------------------------------------------------------

MODULE_TIMES = Path(__file__).with_name("module-times.json")


def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n logical``: three halves of the logical CPUs (3 on 2 cores), at most the pyproject's
    ``--maxprocesses``. Many tests spend their time waiting on servers, timeouts and child processes; an extra worker
    uses a core while another waits (``bench/cpuprobe.py`` measures both)."""
    import os

    return max(1, (3 * (os.cpu_count() or 1) + 1) // 2)


def pytest_collection_modifyitems(config, items):
    """Longest modules first (their wall seconds in ``tests/module-times.json``, written by ``bench/cpuprobe.py
    --module-times``), so that none of them starts last and keeps one worker busy alone at the end. Unknown modules
    keep their place after the known ones; the order of tests within a module is never changed. Stale times only make
    the spread less even."""
    import json

    try:
        times = json.loads(MODULE_TIMES.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    items.sort(key=lambda item: -float(times.get(item.path.name, 0.0)))

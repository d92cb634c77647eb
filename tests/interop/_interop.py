"""Helpers of the interoperability tests against real serving stacks (MLServer, KServe).

* ``Assets``: what the ``interop_assets`` fixture (conftest.py) makes: a small CNN trained on the digits,
  its boundary-pair fingerprint (saved signed and loaded back), and TorchScript files of the intact
  model and two tampered copies (``noise``, ``fp16``);
* ``ServerProcess``: a server started as a subprocess on 127.0.0.1 in its own process group, a bounded
  wait until it answers, and always stopped (SIGTERM to the group, then SIGKILL);
* the output specs every server is tested under, the model names they are served as, and the ``json``
  client's templates for each response layout.

The tests run only where the server packages are installed (``scripts/interop-setup.sh``); elsewhere
each test module skips itself.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

RUNTIMES = Path(__file__).parent / "runtimes"

# every output spec; each server and protocol below can express all of them
SPECS = ("top1", "topk:3", "top1-prob:4", "probs:4", "logits")
# served variant -> the verdict verify must read
VARIANTS = {"intact": "INTACT", "noise": "TAMPERED", "fp16": "TAMPERED"}
STARTUP_TIMEOUT = 120.0  # seconds for a server to answer its readiness check
CLIENT = {"timeout": 10.0, "retries": 1, "backoff": 0.1, "seed": 0}


def model_name(variant: str, spec: str) -> str:
    """The name a (variant, spec) model is served under: ``intact-topk-3``."""
    return f"{variant}-{spec.replace(':', '-')}"


def cases() -> list:
    """(spec, variant) pairs, one pytest param each."""
    return [pytest.param(spec, variant, id=f"{spec}-{variant}") for spec in SPECS for variant in VARIANTS]


@dataclass(frozen=True)
class Assets:
    dir: Path
    fp: object  # tamperprobe.fingerprint.Fingerprint, as loaded back from fp_path
    fp_path: Path
    models: dict[str, Path]  # variant -> TorchScript file
    input_shape: list[int]  # one input, without the batch axis


def runtime_module(name: str):
    """A module of ``runtimes/`` (e.g. ``tp_outputs``), loaded from its file without touching sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_interop_{name}", RUNTIMES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runtime_env() -> dict[str, str]:
    """The environment of a server subprocess: ours, with the runtimes importable and one torch thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(RUNTIMES), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


_RUNNING: list[ServerProcess] = []  # stopped at exit too, should a fixture's teardown not run


def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


atexit.register(_stop_all)


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the test process dies, even by a signal that skips
    every teardown (e.g. the setup script's timeout)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """A server subprocess in its own process group; ``start`` waits (bounded) until ``ready_url`` answers 200.

    Stopped by ``stop`` (the fixtures call it in ``finally``), at interpreter exit, and, on Linux, killed
    by the kernel when the test process dies.
    """

    def __init__(self, cmd: list[str], *, cwd: Path, log: Path, ready_url: str, env: dict[str, str] | None = None) -> None:
        self.cmd, self.cwd, self.log, self.ready_url = cmd, cwd, log, ready_url
        self.env = env or runtime_env()
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
        t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        _RUNNING.append(self)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                if httpx.get(self.ready_url, timeout=2.0).status_code == 200:
                    self.startup_seconds = time.monotonic() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.cmd[0]} did not answer {self.ready_url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 15 s; safe to call twice."""
        proc = self.proc
        if self in _RUNNING:
            _RUNNING.remove(self)
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # the group start_new_session made: the server and its children
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start_with_retry(make: Callable[[], ServerProcess], attempts: int = 3) -> ServerProcess:
    """Start a server built by ``make`` (which picks fresh ports), again if a port was taken meanwhile."""
    for i in range(attempts):
        server = make()
        try:
            return server.start()
        except RuntimeError as exc:
            server.stop()
            text = str(exc).lower()
            if i + 1 == attempts or not ("address already in use" in text or "failed to bind" in text):
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- json client templates


def oip_template(path: str, spec: str, input_shape: list[int]) -> dict:
    """The ``json`` client's template for an Open Inference Protocol ``/infer`` endpoint (one marker a request)
    whose outputs come in ``tp_outputs.tensors`` order."""
    kind = spec.partition(":")[0]
    response: dict[str, str] = {
        "top1": {"labels": "outputs[0].data"},
        "topk": {"labels": "outputs[0].data"},
        "top1-prob": {"labels": "outputs[0].data", "probability": "outputs[1].data"},
        "probs": {"scores": "outputs[0].data", "scores_kind": "probs"},
        "logits": {"scores": "outputs[0].data", "scores_kind": "logits"},
    }[kind]
    request = {"inputs": [{"name": "input", "shape": [1, *input_shape], "datatype": "FP32", "data": "{{input_flat}}"}]}
    return {"path": path, "request": request, "response": response}


def named_paths(spec: str, prefix: str) -> dict[str, str]:
    """Response paths for ``tp_outputs.named`` objects under ``prefix`` ("$" for the object itself)."""
    at = (lambda k: k) if prefix == "$" else (lambda k: f"{prefix}.{k}")
    kind = spec.partition(":")[0]
    return {
        "top1": {"labels": at("label")},
        "topk": {"labels": at("labels")},
        "top1-prob": {"labels": at("label"), "probability": at("probability")},
        "probs": {"scores": at("probabilities"), "scores_kind": "probs"},
        "logits": {"scores": at("logits"), "scores_kind": "logits"},
    }[kind]


def expected(variant: str) -> str:
    return VARIANTS[variant]


def python_cli() -> list[str]:
    """The tamperprobe command line of this interpreter's environment."""
    return [sys.executable, "-m", "tamperprobe"]

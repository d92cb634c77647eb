"""A suspect's TorchScript cannot write a file, open a socket or signal another process: it runs in ``_sandbox``.

The malicious programs here write through ``torch.from_file(path, shared=True)`` in ``forward`` and in a
``__setstate__`` that runs while the file loads. Measured as root (CI runs as root, so file permissions
stop nothing): run directly they create and rewrite files; ``RLIMIT_FSIZE=0`` alone still lets them create
an empty file and rewrite an existing one; the sandbox (seccomp + limits) stops both, and its filter also
refuses sockets, exec, deleting/renaming, raising limits and signals to other processes.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from typing import Tuple  # noqa: UP035  (TorchScript reads these annotations)

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _procs import run_forked
from tamperprobe import zoo
from tamperprobe._sandbox import SandboxedModel, available
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.errors import ModelLoadError, UsageError
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.models import load_model, save_model

needs_sandbox = pytest.mark.skipif(available() is not None, reason=str(available()))

SHAPE = (1, 8, 8)
X = np.random.default_rng(5).random((6, *SHAPE), dtype=np.float32)
ORIGINAL = b"original content, 32 bytes long"


class WriteInForward(torch.nn.Module):
    """Maps ``new`` (input > 0.5) or ``existing`` shared and fills it with 'A'."""

    def __init__(self, new: str, existing: str):
        super().__init__()
        self.new = new
        self.existing = existing

    def forward(self, x):
        path = self.new if bool(x[0, 0, 0, 0] > 0.5) else self.existing
        t = torch.from_file(path, shared=True, size=8, dtype=torch.uint8).fill_(65)
        return x.flatten(1)[:, :10] + t[0].float() * 0


class WriteWhileLoading(torch.nn.Module):
    """Fills ``path`` with 'B' from ``__setstate__``, which torch.jit.load runs."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.t = torch.zeros(8)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:  # noqa: UP006
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:  # noqa: UP006
        self.path = state[0]
        self.training = state[1]
        self.t = torch.from_file(self.path, shared=True, size=8, dtype=torch.uint8).fill_(66).float()

    def forward(self, x):
        return x.flatten(1)[:, :10] + self.t[0] * 0


class Spin(torch.nn.Module):
    def forward(self, x):
        while bool(x.sum() > -1.0):
            x = x + 1.0
        return x.flatten(1)[:, :10]


@pytest.fixture()
def files(tmp_path):
    """The malicious programs, a file that exists (long enough to be mapped) and a path that does not."""
    existing, new = tmp_path / "existing.bin", tmp_path / "new.bin"
    existing.write_bytes(ORIGINAL)
    fwd, load = tmp_path / "forward.pt", tmp_path / "load.pt"
    torch.jit.save(torch.jit.script(WriteInForward(str(new), str(existing))), str(fwd))
    torch.jit.save(torch.jit.script(WriteWhileLoading(str(existing))), str(load))
    return {"existing": existing, "new": new, "forward": fwd, "load": load}


def _x(first: float) -> np.ndarray:
    x = X[:2].copy()
    x[0, 0, 0, 0] = first
    return x


def test_malicious_torchscript_writes_files_when_run_in_process(files):
    """The danger, measured: in this process the programs create one file and rewrite another."""
    torch.jit.load(str(files["forward"]))(torch.from_numpy(_x(0.9)))
    assert files["new"].read_bytes() == b"A" * 8
    torch.jit.load(str(files["forward"]))(torch.from_numpy(_x(0.1)))
    assert files["existing"].read_bytes() == b"A" * 8 + ORIGINAL[8:]
    torch.jit.load(str(files["load"]))
    assert files["existing"].read_bytes() == b"B" * 8 + ORIGINAL[8:]


def _run_with_rlimit_fsize_zero(program: str) -> None:
    """In a forked child: RLIMIT_FSIZE=0 (SIGXFSZ ignored, as the sandbox does), then ``program`` on two inputs."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    m = torch.jit.load(program)
    x = torch.zeros(2, 1, 8, 8)
    for v in (0.9, 0.1):
        x[0, 0, 0, 0] = v
        try:
            m(x)
        except Exception as e:  # noqa: BLE001 - the error's name is what the test reads
            print(type(e).__name__)


@pytest.mark.skipif(sys.platform != "linux", reason="measured on Linux")
def test_rlimit_fsize_alone_lets_it_create_and_rewrite(files):
    """RLIMIT_FSIZE=0 stops growth only: the new file appears (empty) and the existing one is rewritten.

    The limit is set in a child process of its own (forked: this process already holds torch), as the sandbox sets it."""
    r = run_forked(_run_with_rlimit_fsize_zero, str(files["forward"]), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["RuntimeError"]  # growing the new file failed ...
    assert files["new"].exists() and files["new"].stat().st_size == 0  # ... after it was created
    assert files["existing"].read_bytes() == b"A" * 8 + ORIGINAL[8:]  # and the mapped write went through


@needs_sandbox
def test_sandbox_stops_writes_in_forward_and_while_loading(files):
    model = SandboxedModel(files["forward"])
    try:
        for first in (0.9, 0.1):
            with pytest.raises(ModelLoadError, match="failed"):
                model.logits(_x(first))
        assert model._child.poll() is None  # a failed batch does not end the child
    finally:
        model.close()
    with pytest.raises(ModelLoadError, match="cannot load TorchScript"):
        SandboxedModel(files["load"])
    assert not files["new"].exists()
    assert files["existing"].read_bytes() == ORIGINAL


PROBES = {
    "write": "open(sys.argv[1] + '/w', 'w')",
    "append": "open(sys.argv[2], 'a')",
    "readwrite": "os.open(sys.argv[2], os.O_RDWR)",
    "truncate": "os.truncate(sys.argv[2], 0)",
    "unlink": "os.unlink(sys.argv[2])",
    "rename": "os.rename(sys.argv[2], sys.argv[2] + '.x')",
    "mkdir": "os.mkdir(sys.argv[1] + '/d')",
    "chmod": "os.chmod(sys.argv[2], 0o777)",
    "socket": "import socket; socket.socket()",
    "socket-unix": "import socket; socket.socket(socket.AF_UNIX)",
    "exec": "os.execv('/bin/true', ['true'])",
    "kill-parent": "os.kill(os.getppid(), 0)",
    "kill-all": "os.kill(-1, 0)",
    "raise-limit": "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))",
    "unshare": "check(libc.unshare(0x10000000))",  # CLONE_NEWUSER
    "posix-shm": "from multiprocessing import shared_memory; shared_memory.SharedMemory(create=True, size=8)",
    "sysv-shm": "check(libc.shmget(0, 4096, 0o1600))",
    "ioperm": "check(libc.ioperm(0x80, 1, 1))",
}


@needs_sandbox
def test_sandbox_filter_refuses_every_probe_and_still_reads(tmp_path):
    """The filter itself, probed from Python in a locked-down child: each probe fails, reading still works."""
    target = tmp_path / "t.bin"
    target.write_bytes(ORIGINAL)
    lines = [
        "import json, os, sys",
        "import ctypes",
        "from tamperprobe._sandbox import _lock_down",
        "libc = ctypes.CDLL(None, use_errno=True)",
        "def check(r):\n    if r == -1:\n        raise OSError(ctypes.get_errno(), 'refused')",
        "_lock_down()",
        "out = {}",
        *(
            f"try:\n    {code}\n    out[{name!r}] = 'allowed'\nexcept (OSError, ValueError) as e:\n    out[{name!r}] = getattr(e, 'errno', None) or type(e).__name__"
            for name, code in PROBES.items()
        ),
        "out['read'] = open(sys.argv[2], 'rb').read().decode()",
        "print(json.dumps(out))",
    ]
    r = subprocess.run(
        [sys.executable, "-c", "\n".join(lines), str(tmp_path), str(target)], capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out.pop("read") == ORIGINAL.decode()
    assert out.pop("raise-limit") == "ValueError"  # Python's word for EPERM from setrlimit
    assert out == dict.fromkeys(out, errno.EPERM), out  # the filter's answer, not a missing file or an unknown call
    assert target.read_bytes() == ORIGINAL and sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]


@needs_sandbox
def test_sandboxed_models_give_the_in_process_logits(tmp_path):
    m = zoo.build("mlp", SHAPE).eval()
    for suffix in (".pt", ".pt2"):
        path = save_model(m, tmp_path / f"m{suffix}", X)
        sandboxed = load_model(path, sandbox=True)
        try:
            assert sandboxed.format == "sandboxed" and sandboxed.module is None
            np.testing.assert_allclose(sandboxed.logits(X, batch_size=4), load_model(path).logits(X), rtol=1e-6, atol=1e-6)
            assert sandboxed.digest() == load_model(path).digest()
            with pytest.raises(UsageError, match="sandbox"):
                sandboxed.require_torch("generation")
        finally:
            sandboxed.close()


@needs_sandbox
def test_a_program_that_never_returns_is_stopped(tmp_path):
    path = tmp_path / "spin.pt"
    torch.jit.save(torch.jit.script(Spin()), str(path))
    model = SandboxedModel(path, timeout=0.5)  # the bound is the caller's; a program that never returns needs no long one
    with pytest.raises(ModelLoadError, match="took more than 0.5 s"):
        model.logits(X[:1])
    assert model._child.poll() is not None


@needs_sandbox
def test_verify_runs_a_local_torchscript_in_the_sandbox(files, tmp_path):
    """verify --model: the malicious file writes nothing (exit 2, one line); a plain one still verifies INTACT."""
    good = save_model(zoo.build("mlp", SHAPE).eval(), tmp_path / "good.pt", X)
    fp = save(
        make_fingerprint(X, load_model(good).logits(X), InputSpec(SHAPE), {"method": "natural"}, "t", output_spec="logits"), tmp_path / "fp.tpf"
    )
    ok = CliRunner().invoke(app, ["verify", str(fp), "--model", str(good), "--no-history", "--allow-repeat"])
    assert ok.exit_code == 0, (ok.stdout, ok.stderr)
    bad = CliRunner().invoke(app, ["verify", str(fp), "--model", str(files["forward"]), "--no-history", "--allow-repeat"])
    assert bad.exit_code == 2 and "Traceback" not in bad.stderr, (bad.stdout, bad.stderr)
    assert [line for line in bad.stderr.splitlines() if line.strip()] == [bad.stderr.strip()] and "Operation not permitted" in bad.stderr
    assert not files["new"].exists() and files["existing"].read_bytes() == ORIGINAL


def test_without_a_usable_sandbox_a_suspect_program_is_refused(tmp_path, monkeypatch):
    """Where the filter cannot be installed (not Linux on x86-64), the file is refused in one line, never run unsandboxed."""
    import platform

    path = save_model(zoo.build("mlp", SHAPE).eval(), tmp_path / "m.pt", X)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(ModelLoadError, match="runs only in a sandbox, and the sandbox's seccomp filter is written for x86-64; this is aarch64"):
        load_model(path, sandbox=True)

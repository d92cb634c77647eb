"""The sandbox's starter (``_zygote``): one clean interpreter per verifier process forks every sandboxed child.

What must hold: the children come from one zygote, which holds nothing of the verifier's environment; a child
holds no descriptor of the zygote's or of another child's; a child's end (a signal, a kill by the verifier) is
reported as it happened; a zygote that dies is replaced; a process forked from the verifier gets a zygote of its
own instead of speaking over its parent's socket; concurrent starts from several threads each get their child.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from _procs import run_forked
from tamperprobe import _sandbox, _zygote, zoo
from tamperprobe._sandbox import SandboxedModel, available
from tamperprobe.errors import ModelLoadError
from tamperprobe.models import load_model, save_model

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

SHAPE = (1, 8, 8)
X = np.random.default_rng(3).random((5, *SHAPE), dtype=np.float32)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    m = zoo.build("mlp", SHAPE).eval()
    return save_model(m, tmp_path_factory.mktemp("zygote") / "m.pt", X)


@pytest.fixture(scope="module")
def expected(model_file) -> np.ndarray:
    return load_model(model_file).logits(X)


@pytest.fixture()
def fresh_zygote():
    """No zygote in this process yet: the next sandboxed model starts one (the later tests use it)."""
    _zygote.stop()


def _stat(pid: int) -> tuple[str, int] | None:
    """The state letter and parent pid of process ``pid``, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def _parent(pid: int) -> int:
    stat = _stat(pid)
    assert stat is not None, f"process {pid} is gone"
    return stat[1]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _descriptors(pid: int) -> list[str]:
    folder = Path(f"/proc/{pid}/fd")
    out = []
    for fd in folder.iterdir():
        try:
            out.append(os.readlink(fd))
        except FileNotFoundError:  # closed while listed
            pass
    return out


def _pipe(fd: int) -> str:
    return f"pipe:[{os.fstat(fd).st_ino}]"


def test_children_share_one_zygote_that_holds_none_of_the_verifiers_environment(fresh_zygote, model_file, expected, monkeypatch):
    monkeypatch.setenv("TAMPERPROBE_CANARY", "a secret of the verifier's")
    a, b = SandboxedModel(model_file), SandboxedModel(model_file)
    try:
        zygote = _zygote._zygote
        assert zygote is not None
        assert _parent(a._child.pid) == _parent(b._child.pid) == zygote.process.pid != os.getpid()
        for pid in (zygote.process.pid, a._child.pid, b._child.pid):
            env = _environ(pid)
            assert "TAMPERPROBE_CANARY" not in env and set(env) <= {"PATH", "HOME", "TMPDIR", "OMP_NUM_THREADS"}, env
        np.testing.assert_allclose(a.logits(X), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b.logits(X), expected, rtol=1e-6, atol=1e-6)
        assert os.getsid(a._child.pid) == a._child.pid != os.getsid(0)  # a session of its own
        assert os.readlink(f"/proc/{a._child.pid}/cwd") == a._dir.name != b._dir.name
    finally:
        a.close()
        b.close()


def test_a_child_holds_no_descriptor_of_the_zygote_or_of_another_child(model_file):
    a, b = SandboxedModel(model_file), SandboxedModel(model_file)
    try:
        zygote = _zygote._zygote
        assert zygote is not None
        held = _descriptors(b._child.pid)
        pipes = {fd for fd in held if fd.startswith("pipe:")}
        assert pipes == {_pipe(b._child.stdin), _pipe(b._child.stdout)}, held  # none of a's, no status pipe
        assert not [fd for fd in held if fd.startswith("socket:") or "pidfd" in fd], held
        assert any(fd.startswith("socket:") for fd in _descriptors(zygote.process.pid))  # (the zygote's socket is one)
    finally:
        a.close()
        b.close()


def test_a_childs_end_is_reported_as_it_happened_and_the_zygote_goes_on(model_file, expected):
    model = SandboxedModel(model_file)
    zygote = _zygote._zygote
    assert zygote is not None
    pid = model._child.pid
    os.kill(pid, signal.SIGKILL)
    assert model._child.wait(30) == -signal.SIGKILL
    with pytest.raises(ModelLoadError, match=r"stopped while waiting \(killed by signal 9\)"):
        model.logits(X)
    stat = _stat(pid)
    assert stat is None or stat[1] != zygote.process.pid  # reaped, not a zombie of the zygote
    again = SandboxedModel(model_file)
    try:
        assert _zygote._zygote is zygote and _parent(again._child.pid) == zygote.process.pid
        np.testing.assert_allclose(again.logits(X), expected, rtol=1e-6, atol=1e-6)
    finally:
        again.close()
    assert again._child.returncode == -signal.SIGKILL  # closed by the verifier: killed through its pidfd


def test_a_zygote_that_died_is_replaced_and_its_orphan_still_stops(model_file, expected):
    orphan = SandboxedModel(model_file)
    old = _zygote._zygote
    assert old is not None
    old.process.kill()
    old.process.wait()
    np.testing.assert_allclose(orphan.logits(X), expected, rtol=1e-6, atol=1e-6)  # it runs on without its starter
    replacement = SandboxedModel(model_file)
    try:
        assert _zygote._zygote is not old and _parent(replacement._child.pid) == _zygote._zygote.process.pid
        np.testing.assert_allclose(replacement.logits(X), expected, rtol=1e-6, atol=1e-6)
    finally:
        replacement.close()
    pid = orphan._child.pid
    orphan.close()
    assert orphan._child.returncode == _zygote.Child.UNKNOWN  # nobody was left to tell its status
    deadline = time.monotonic() + 10
    while (stat := _stat(pid)) is not None and stat[0] != "Z":  # gone, or a zombie waiting for whoever adopted it
        assert time.monotonic() < deadline, "the orphan was not killed"
        time.sleep(0.02)


def _in_a_forked_copy(path: str) -> int:
    model = SandboxedModel(path)
    try:
        print(_parent(model._child.pid), float(model.logits(X).sum()))
    finally:
        model.close()
        _zygote.stop()  # this copy ends with os._exit, which runs no atexit handler
    return 0


def test_a_forked_copy_of_the_verifier_starts_its_own_zygote(model_file, expected):
    model = SandboxedModel(model_file)
    try:
        zygote = _zygote._zygote
        assert zygote is not None
        r = run_forked(_in_a_forked_copy, str(model_file), timeout=120)
        assert r.returncode == 0, r.stderr
        parent, total = r.stdout.split()
        assert int(parent) != zygote.process.pid and float(total) == pytest.approx(float(expected.sum()), rel=1e-5)
        np.testing.assert_allclose(model.logits(X), expected, rtol=1e-6, atol=1e-6)  # the parent's socket is undisturbed
        assert _zygote._zygote is zygote and zygote.alive()
    finally:
        model.close()


def test_threads_starting_children_at_once_each_get_their_own(model_file, expected):
    results: dict[int, object] = {}

    def start(i: int) -> None:
        try:
            model = SandboxedModel(model_file)
            try:
                results[i] = (model._child.pid, model.logits(X))
            finally:
                model.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4 and all(isinstance(r, tuple) for r in results.values()), results
    assert len({r[0] for r in results.values()}) == 4  # type: ignore[index]
    for r in results.values():
        np.testing.assert_allclose(r[1], expected, rtol=1e-6, atol=1e-6)  # type: ignore[index]


def test_without_pidfds_a_suspect_program_is_refused_in_one_line(model_file, monkeypatch):
    """A kernel before Linux 5.3 has no pidfd_open: the sandbox says so and the file is refused, never run unsandboxed."""

    def enosys(pid):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", enosys)
    assert _sandbox.available().startswith("the sandbox needs pidfds (Linux 5.3 or later); this is Linux ")
    with pytest.raises(ModelLoadError) as info:
        load_model(model_file, sandbox=True)
    assert "\n" not in str(info.value) and "pidfds" in str(info.value)

"""The sandbox's seccomp filter (built by libseccomp) compares what the kernel reads, and it needs libseccomp.

``tests/test_sandbox.py`` probes the filter with ordinary calls; these probe it with raw system calls whose
arguments carry bits above those the kernel reads, and with another ABI. The probes run in a locked-down child
that prints its findings to a pipe (a file would fail: the child's file-size limit is 0).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tamperprobe import _sandbox
from tamperprobe.errors import ModelLoadError

needs_sandbox = pytest.mark.skipif(_sandbox.available() is not None, reason=str(_sandbox.available()))

PROBE = r"""
import ctypes, json, os, sys
from tamperprobe._sandbox import _lock_down
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall.argtypes = [ctypes.c_long] * 4
def call(*args):
    ctypes.set_errno(0)
    return [libc.syscall(*args), ctypes.get_errno()]
path = ctypes.cast(ctypes.c_char_p(sys.argv[1].encode()), ctypes.c_void_p).value
_lock_down()
out = {
    "ioctl TIOCSTI with high bits": call(16, 0, 0x1_0000_5412, 0),
    "kill itself with high bits": call(62, (1 << 32) | os.getpid(), 0, 0),
    "kill itself": call(62, os.getpid(), 0, 0),
    "openat to write with high flag bits": call(257, -100, path, os.O_WRONLY | os.O_CREAT | (1 << 40)),
    "openat to read": call(257, -100, path, os.O_RDONLY),
}
print(json.dumps(out), flush=True)
if sys.argv[2] == "x32":
    libc.syscall(0x40000000 | 39, 0, 0, 0)  # getpid through the x32 ABI
    print("the x32 call returned", flush=True)
"""


def _probe(tmp_path, then: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "new"), then], capture_output=True, text=True, timeout=120)


@needs_sandbox
def test_arguments_are_compared_as_the_kernel_reads_them_and_another_abi_is_killed(tmp_path):
    r = _probe(tmp_path, "x32")
    out = json.loads(r.stdout.splitlines()[0])
    eperm, enoent = 1, 2
    assert out["ioctl TIOCSTI with high bits"] == [-1, eperm]  # the tty layer reads 32 bits of the request
    assert out["kill itself with high bits"] == [-1, eperm]  # anything but exactly its own pid is refused
    assert out["kill itself"] == [0, 0]
    assert out["openat to write with high flag bits"] == [-1, eperm]
    assert out["openat to read"] == [-1, enoent]  # allowed: the file just does not exist
    assert r.returncode == -signal.SIGSYS and "returned" not in r.stdout  # an x32 system call kills the process
    assert not (tmp_path / "new").exists()


@needs_sandbox
def test_libseccomp_names_every_call_the_filter_refuses():
    sc = _sandbox._seccomp()
    names = [*_sandbox._DENIED, *_sandbox._NOT_IMPLEMENTED, "open", "openat", "ioctl", "kill", "tgkill"]
    numbers = {name: sc.resolve_syscall(sc.Arch.NATIVE, name) for name in names}
    assert min(numbers.values()) >= 0 and len(set(numbers.values())) == len(names), numbers
    assert (numbers["openat"], numbers["execve"], numbers["socket"], numbers["fchmodat2"]) == (257, 59, 41, 452)  # x86-64's numbers


def test_without_libseccomp_a_suspect_program_is_refused_in_one_line(tmp_path, monkeypatch):
    import torch

    from tamperprobe.models import load_model

    def missing():
        raise ImportError("Unable to find libseccomp")

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    monkeypatch.setattr(_sandbox, "_seccomp", missing)
    if sys.platform == "linux" and _sandbox.platform.machine() in ("x86_64", "AMD64"):
        expected = "the sandbox needs libseccomp, which could not be loaded (Unable to find libseccomp): install it (Debian and Ubuntu: libseccomp2)"
        assert _sandbox.available() == expected
    with pytest.raises(ModelLoadError) as info:
        load_model(path, sandbox=True)
    assert "\n" not in str(info.value) and "libseccomp" in str(info.value)


@needs_sandbox
def test_a_libseccomp_that_cannot_name_a_refused_call_builds_no_filter(monkeypatch):
    """An older libseccomp that does not know a call (it would stay allowed) makes the lock-down fail, not pass."""
    real = _sandbox._seccomp()

    class Old:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def resolve_syscall(arch, name):
            if name == "fchmodat2":
                raise ValueError("unknown system call")  # the official binding's answer; pyseccomp's is negative
            return real.resolve_syscall(arch, name)

    monkeypatch.setattr(_sandbox, "_seccomp", Old)
    with pytest.raises(OSError, match="does not know the system calls fchmodat2: update it"):
        _sandbox._filter(1)

"""Running a suspect party's model file in a child process that cannot write, connect or signal.

A TorchScript program is code: its ``forward`` (and a ``__setstate__`` that runs while it loads)
can call ``torch.from_file(path, shared=True)``, which opens a file read-write, grows it and maps
it shared, so that filling the tensor rewrites the file. What stops that, measured on Linux as
root (``tests/test_sandbox.py``):

* ``RLIMIT_FSIZE=0`` stops a file from *growing* (the ``ftruncate`` fails with EFBIG once SIGXFSZ
  is ignored) but not its creation (an empty file appears) nor writes through a shared mapping of
  a file that is already large enough. File permissions stop nothing for root.
* A seccomp filter does: every ``open``/``openat`` asking for write access, creation, truncation or
  append fails with EPERM, so no writable descriptor to any file exists and no shared writable
  mapping of one can be made; ``openat2`` (whose flags seccomp cannot read) answers ENOSYS, so the
  C library falls back to ``openat``.

So the child (``python -m tamperprobe._sandbox``, started by ``SandboxedModel``) opens what it
needs, then, before it reads the model file: moves the answer channel off stdout (TorchScript's
``print`` writes there), starts a session of its own (no controlling terminal), sets resource
limits (file size 0, no core files, a CPU-time and an address-space bound, few descriptors), sets
``no_new_privs`` and installs a seccomp filter that refuses, besides writable opens: every
namespace, mount, module, reboot, key, BPF, ptrace and io_uring call; creating sockets (no
network); ``execve``; renaming, linking, deleting, truncating and re-owning files by path;
raising resource limits; signals to any process but itself, or reading and writing another's
memory; System V and POSIX IPC objects (which outlive the process); setting the clock, I/O ports;
and terminal injection (TIOCSTI).
The filter is x86-64 only: elsewhere ``available()`` says why not and the caller refuses to run
the file. The parent sends batches as raw float32 over a pipe and reads raw float32 logits back,
checks their shape, and kills the child when an answer takes longer than its timeout.

What it does not stop: reading any file the user can read (the program can only return what it
reads as logits, to the verifier itself), using CPU and memory up to the limits, and bugs in the
kernel or in this filter.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, ClassVar

import numpy as np

from ._util import one_line
from .errors import ModelLoadError, UsageError

#: Wall-clock bounds (seconds) on starting and loading, and on one batch; the child's resource limits.
LOAD_TIMEOUT = 600.0
TIMEOUT = 600.0
CPU_SECONDS = 3600
ADDRESS_SPACE = 32 << 30
MAX_OPEN_FILES = 64

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_AUDIT_ARCH_X86_64 = 0xC000003E
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
# x86-64 system call numbers the filter refuses outright (EPERM)
_DENIED = {
    "creat": 85, "truncate": 76, "rename": 82, "renameat": 264, "renameat2": 316, "mkdir": 83, "mkdirat": 258, "rmdir": 84,
    "link": 86, "linkat": 265, "unlink": 87, "unlinkat": 263, "symlink": 88, "symlinkat": 266, "chmod": 90, "fchmod": 91,
    "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "utime": 132, "utimes": 235,
    "utimensat": 280, "futimesat": 261, "mknod": 133, "mknodat": 259, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
    "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "init_module": 175,
    "delete_module": 176, "finit_module": 313, "kexec_load": 246, "kexec_file_load": 320, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "socket": 41, "socketpair": 53,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "setns": 308, "unshare": 272, "keyctl": 250,
    "add_key": 248, "request_key": 249, "fanotify_init": 300, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442, "execve": 59, "execveat": 322, "acct": 163, "quotactl": 179,
    "setrlimit": 160, "prlimit64": 302, "open_by_handle_at": 304, "name_to_handle_at": 303, "pidfd_getfd": 438,
    "pidfd_send_signal": 424, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "copy_file_range": 326,
    "shmget": 29, "shmat": 30, "shmctl": 31, "semget": 64, "semop": 65, "semctl": 66, "semtimedop": 220, "msgget": 68,
    "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_notify": 244,
    "process_madvise": 440, "process_mrelease": 448, "move_pages": 279, "migrate_pages": 256, "vhangup": 153, "syslog": 103,
    "settimeofday": 164, "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305, "iopl": 172, "ioperm": 173,
    "quotactl_fd": 443, "uselib": 134,
}  # fmt: skip
_OPEN, _OPENAT, _OPENAT2, _CLONE3, _IOCTL, _KILL, _TKILL, _TGKILL = 2, 257, 437, 435, 16, 62, 200, 234


def available() -> str | None:
    """None when this system can run the sandbox; otherwise why not (one line)."""
    if sys.platform != "linux":
        return f"the sandbox needs Linux (seccomp); this is {sys.platform}"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the sandbox's seccomp filter is written for x86-64; this is {platform.machine()}"
    return None


def _filter(pid: int) -> bytes:
    """The seccomp BPF program (see the module doc), as bytes of ``struct sock_filter``."""
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000

    def error(code: int) -> int:
        return 0x00050000 | code

    def arg(i: int) -> int:
        return 16 + 8 * i  # low 32 bits of seccomp_data.args[i] (little endian)

    prog = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH_X86_64), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, error(errno.EPERM))]  # the x32 ABI
    for nr in sorted(_DENIED.values()):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, error(errno.EPERM))]
    for nr in (_OPENAT2, _CLONE3):  # arguments in a struct seccomp cannot read: make libc use the plain call
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, error(errno.ENOSYS))]
    for nr, i in ((_OPEN, 1), (_OPENAT, 2)):
        prog += [(jeq, 0, 4, nr), (ld, 0, 0, arg(i)), (jset, 0, 1, _WRITE_FLAGS), (ret, 0, 0, error(errno.EPERM)), (ret, 0, 0, allow)]
    for req in (_TIOCSTI, _TIOCLINUX):
        prog += [(jeq, 0, 4, _IOCTL), (ld, 0, 0, arg(1)), (jeq, 0, 1, req), (ret, 0, 0, error(errno.EPERM)), (ld, 0, 0, 0)]
    for nr in (_KILL, _TKILL, _TGKILL):  # signals only to itself (tkill: one of its own threads, checked by the kernel's thread group)
        if nr == _TKILL:
            prog += [(jeq, 0, 1, nr), (ret, 0, 0, error(errno.EPERM))]
            continue
        prog += [(jeq, 0, 4, nr), (ld, 0, 0, arg(0)), (jeq, 1, 0, pid), (ret, 0, 0, error(errno.EPERM)), (ret, 0, 0, allow)]
    prog.append((ret, 0, 0, allow))
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


def _lock_down() -> None:
    """Resource limits, no_new_privs and the seccomp filter, in this process (the child), for good."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG instead of killing
    for limit, value in (
        (resource.RLIMIT_FSIZE, 0),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, CPU_SECONDS),
        (resource.RLIMIT_AS, ADDRESS_SPACE),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
    ):
        resource.setrlimit(limit, (value, value))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    prog = _filter(os.getpid())
    buf = ctypes.create_string_buffer(prog, len(prog))

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Prog(len(prog) // 8, ctypes.addressof(buf))
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "installing the seccomp filter failed")


# --------------------------------------------------------------------------- the wire: raw frames over pipes

_HEAD = struct.Struct("<4sII")  # tag, two numbers (rows/cols, or length/0)


def _read_exact(fd: int, n: int, deadline: float | None = None) -> bytes:
    out = bytearray()
    while len(out) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - len(out), 1 << 20))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _send_text(fd: int, tag: bytes, text: str) -> None:
    body = text.encode("utf-8", "replace")[:4000]
    _write_all(fd, _HEAD.pack(tag, len(body), 0) + body)


def _child_main(path: str) -> int:
    """The child: open the answer channel, lock down, load ``path``, then answer batches until stdin closes."""
    out = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # anything the program prints goes nowhere
    os.dup2(null, 2)
    os.close(null)
    import torch

    from .models import load_model

    torch.set_num_threads(max(1, int(os.environ.get("TAMPERPROBE_THREADS") or 1)))
    try:
        tempfile.gettempdir()  # torch asks for it while loading; found (and cached) while it can still be probed by writing
        if path.lower().endswith(".pt2"):
            # torch.export.load imports torch._dynamo, which on import makes sure its cache folder exists: made here, in the
            # private folder, while folders can still be made; so a file refused by the archive check costs no dynamo import
            cache = os.path.join(tempfile.gettempdir(), "torchinductor")
            os.makedirs(cache, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        _lock_down()
        model = load_model(path)
        if model.module is None:
            raise ModelLoadError(f"{path} is not a torch model")
        _send_text(out, b"REDY", json.dumps({"format": model.format, "digest": model.digest()}))
    except Exception as exc:
        _send_text(out, b"FAIL", one_line(exc))
        return 1
    while True:
        try:
            tag, ndim, _ = _HEAD.unpack(_read_exact(0, _HEAD.size))
            shape = struct.unpack(f"<{ndim}Q", _read_exact(0, 8 * ndim))
            x = np.frombuffer(_read_exact(0, 4 * int(np.prod(shape))), dtype=np.float32).reshape(shape)
        except EOFError:
            return 0
        try:
            z = np.ascontiguousarray(model.logits(x, batch_size=max(1, len(x))), dtype=np.float32)
            if z.ndim != 2:
                raise ModelLoadError(f"the model answered a shape {z.shape}, not (batch, classes)")
        except Exception as exc:
            _send_text(out, b"FAIL", one_line(exc))
            continue
        _write_all(out, _HEAD.pack(b"LOGS", z.shape[0], z.shape[1]) + z.tobytes())


class SandboxedModel:
    """A suspect party's model file (TorchScript or ``torch.export``) run in a locked-down child: logits only, no weights here."""

    format: ClassVar[str] = "sandboxed"
    hookable: ClassVar[bool] = False

    def __init__(self, path: str | os.PathLike, *, timeout: float = TIMEOUT, threads: int | None = None) -> None:
        why = available()
        if why:
            raise ModelLoadError(
                f"{path}: a model file from the party under suspicion runs only in a sandbox, and {why}; verify an ONNX file instead"
            )
        self.source = str(path)
        self.timeout = timeout
        self._dir = tempfile.TemporaryDirectory(prefix="tamperprobe-sandbox-")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self._dir.name, "TMPDIR": self._dir.name, "OMP_NUM_THREADS": "1"}
        env["TAMPERPROBE_THREADS"] = str(threads or 1)
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-c",
                f"import sys; sys.path[:0] = {sys.path!r}; from tamperprobe._sandbox import _child_main; sys.exit(_child_main(sys.argv[1]))",
                os.path.abspath(path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=self._dir.name,
            env=env,
            start_new_session=True,  # no controlling terminal
        )
        try:
            info = json.loads(self._answer(b"REDY", "loading", LOAD_TIMEOUT))
            self._digest = str(info["digest"])
        except (ValueError, KeyError, TypeError):
            self.close()
            raise ModelLoadError(f"the sandboxed model {self.source} broke the answer protocol while loading") from None
        except ModelLoadError:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SandboxedModel({self.source!r})"

    def _stopped(self, what: str) -> ModelLoadError:
        self.close()
        code = self._proc.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return ModelLoadError(f"the sandboxed model {self.source} stopped while {what} ({how})")

    def _answer(self, want: bytes, what: str, timeout: float | None = None) -> bytes:
        """The body of the next frame, which must be ``want``; the child's FAIL text becomes a ModelLoadError."""
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        try:
            tag, a, b = _HEAD.unpack(_read_exact(fd, _HEAD.size, deadline))
            if tag == b"LOGS" and want == b"LOGS":
                if b == 0 or b > 1_000_000 or a * b > (1 << 30):
                    raise ModelLoadError(f"the sandboxed model {self.source} answered logits of shape ({a}, {b})")
                return _HEAD.pack(tag, a, b) + _read_exact(fd, 4 * a * b, deadline)
            if tag not in (want, b"FAIL") or a > 4000:
                raise ModelLoadError(f"the sandboxed model {self.source} broke the answer protocol while {what}")
            text = _read_exact(fd, a, deadline).decode("utf-8", "replace")
        except TimeoutError:
            self.close()
            raise ModelLoadError(f"the sandboxed model {self.source} took more than {limit:g} s while {what}") from None
        except EOFError:
            raise self._stopped(what) from None
        if tag == b"FAIL":
            from .served.untrusted import clean

            raise ModelLoadError(clean(text, 400))  # the suspect's program wrote part of it
        return text.encode()

    def close(self) -> None:
        """Stop the child and remove its private folder (idempotent)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        self._dir.cleanup()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            try:
                self.close()
            except Exception:
                pass

    @property
    def module(self) -> None:
        return None

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cpu")

    def require_torch(self, what: str) -> Any:
        raise UsageError(f"{what} needs the model's weights in this process; {self.source} is the suspect's file and runs only in a sandbox")

    def forward(self, chunk: Any) -> Any:
        """Not available: a sandboxed model runs only through ``logits``."""
        return self.require_torch("running the model with autograd")

    def digest(self) -> str:
        """The weights' digest, as the child computed it after loading."""
        return self._digest

    def logits(self, x: np.ndarray, batch_size: int = 256, threads: int | None = None) -> np.ndarray:
        """float32 logits (N, C), computed in the child batch by batch."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._proc.poll() is not None:
            raise self._stopped("waiting")
        outs = []
        assert self._proc.stdin is not None
        fd = self._proc.stdin.fileno()
        for i in range(0, len(x), max(1, batch_size)):
            chunk = x[i : i + batch_size]
            try:
                _write_all(fd, _HEAD.pack(b"XBAT", chunk.ndim, 0) + struct.pack(f"<{chunk.ndim}Q", *chunk.shape) + chunk.tobytes())
            except OSError:
                raise self._stopped("receiving a batch") from None
            frame = self._answer(b"LOGS", f"running a batch of shape {chunk.shape}")
            rows, cols = _HEAD.unpack_from(frame)[1:]
            if rows != len(chunk):
                raise ModelLoadError(f"the sandboxed model {self.source} answered {rows} rows for {len(chunk)} inputs")
            outs.append(np.frombuffer(frame, dtype=np.float32, offset=_HEAD.size).reshape(rows, cols))
        if not outs:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(outs)

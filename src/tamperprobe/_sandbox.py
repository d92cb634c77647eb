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

So the child (forked for ``SandboxedModel`` by ``_zygote``: a clean interpreter, started once per
verifier process, that has imported torch and holds nothing of the verifier's) opens what it
needs, then, before it reads the model file: moves the answer channel off stdout (TorchScript's
``print`` writes there), starts a session of its own (no controlling terminal), sets resource
limits (file size 0, no core files, a CPU-time and an address-space bound, few descriptors), sets
``no_new_privs`` and installs a seccomp filter, built by libseccomp (its Python binding, or ``pyseccomp``
over the system's ``libseccomp.so``), that refuses, besides writable opens: every
namespace, mount, module, reboot, key, BPF, ptrace and io_uring call; creating sockets (no
network); ``execve``; renaming, linking, deleting, truncating and re-owning files by path;
raising resource limits; signals to any process but itself, or reading and writing another's
memory; System V and POSIX IPC objects (which outlive the process); setting the clock, I/O ports;
and terminal injection (TIOCSTI). A system call through another ABI (i386, x32) kills the child.
The filter is written for x86-64 and needs libseccomp: elsewhere ``available()`` says why not and
the caller refuses to run the file. The parent sends batches as raw float32 over a pipe and reads raw float32 logits back,
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
import sys
import tempfile
import time
from typing import Any, ClassVar

import numpy as np

from ._util import one_line
from ._zygote import fork_child
from .errors import ModelLoadError, UsageError

#: Wall-clock bounds (seconds) on starting and loading, and on one batch; the child's resource limits.
LOAD_TIMEOUT = 600.0
TIMEOUT = 600.0
CPU_SECONDS = 3600
ADDRESS_SPACE = 32 << 30
MAX_OPEN_FILES = 64

_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
# system calls the filter refuses outright (EPERM)
_DENIED = (
    "creat truncate rename renameat renameat2 mkdir mkdirat rmdir link linkat unlink unlinkat symlink symlinkat chmod fchmod "
    "fchmodat fchmodat2 chown fchown lchown fchownat utime utimes utimensat futimesat mknod mknodat setxattr lsetxattr fsetxattr "
    "removexattr lremovexattr fremovexattr mount umount2 pivot_root chroot swapon swapoff reboot sethostname setdomainname "
    "init_module delete_module finit_module kexec_load kexec_file_load bpf perf_event_open userfaultfd ptrace process_vm_readv "
    "process_vm_writev socket socketpair io_uring_setup io_uring_enter io_uring_register setns unshare keyctl add_key "
    "request_key fanotify_init open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr execve execveat acct quotactl "
    "setrlimit prlimit64 open_by_handle_at name_to_handle_at pidfd_getfd pidfd_send_signal rt_sigqueueinfo rt_tgsigqueueinfo "
    "copy_file_range shmget shmat shmctl semget semop semctl semtimedop msgget msgsnd msgrcv msgctl mq_open mq_unlink "
    "mq_timedsend mq_notify process_madvise process_mrelease move_pages migrate_pages vhangup syslog settimeofday clock_settime "
    "adjtimex clock_adjtime iopl ioperm quotactl_fd uselib tkill"
).split()
# system calls whose arguments sit in a struct a seccomp filter cannot read: ENOSYS makes the C library use the plain call
_NOT_IMPLEMENTED = ("openat2", "clone3")


def _seccomp() -> Any:
    """libseccomp's Python interface (the official ``seccomp`` binding, else ``pyseccomp``); ImportError without libseccomp."""
    try:
        import seccomp
    except ImportError:
        try:
            import pyseccomp as seccomp
        except (ImportError, RuntimeError, OSError) as exc:  # pyseccomp raises RuntimeError when libseccomp is missing
            raise ImportError(one_line(str(exc)) or type(exc).__name__) from None
    return seccomp


def available() -> str | None:
    """None when this system can run the sandbox; otherwise why not (one line)."""
    if sys.platform != "linux":
        return f"the sandbox needs Linux (seccomp); this is {sys.platform}"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the sandbox's seccomp filter is written for x86-64; this is {platform.machine()}"
    try:
        _seccomp()
    except ImportError as exc:
        return f"the sandbox needs libseccomp, which could not be loaded ({exc}): install it (Debian and Ubuntu: libseccomp2)"
    try:  # the zygote hands out pidfds of the children (Linux 5.3)
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return f"the sandbox needs pidfds (Linux 5.3 or later); this is Linux {platform.release()}"
    return None


def _filter(pid: int) -> Any:
    """The seccomp filter of the module doc, built with libseccomp (not loaded): anything not named here is allowed;
    another architecture or ABI (i386, x32) kills the process."""
    sc = _seccomp()
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    refuse, absent = sc.ERRNO(errno.EPERM), sc.ERRNO(errno.ENOSYS)
    unknown = [name for name in (*_DENIED, *_NOT_IMPLEMENTED) if _number(sc, name) < 0]
    if unknown:  # a call this libseccomp cannot name would stay allowed: refuse to run at all
        raise OSError(errno.ENOSYS, f"this libseccomp does not know the system calls {', '.join(unknown)}: update it")
    for name in _DENIED:
        f.add_rule(refuse, name)
    for name in _NOT_IMPLEMENTED:
        f.add_rule(absent, name)
    for name, flags_arg in (("open", 1), ("openat", 2)):  # any write, create, truncate or append flag (rules are OR-ed)
        for flag in _WRITE_FLAGS:
            f.add_rule(refuse, name, sc.Arg(flags_arg, sc.MASKED_EQ, flag, flag))
    for request in (_TIOCSTI, _TIOCLINUX):  # the kernel reads the request as 32 bits: compare those only
        f.add_rule(refuse, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    for name in ("kill", "tgkill"):  # signals only to itself: any other 64-bit value of the pid argument is refused
        f.add_rule(refuse, name, sc.Arg(0, sc.NE, pid))
    return f


def _number(sc: Any, name: str) -> int:
    """The native number of system call ``name``, negative when this libseccomp cannot name it (a binding may raise)."""
    try:
        return int(sc.resolve_syscall(sc.Arch.NATIVE, name))
    except (ValueError, OSError, TypeError):
        return -1


def _lock_down() -> None:
    """Resource limits, no_new_privs and the seccomp filter, in this process (the child), for good."""
    import resource

    seccomp_filter = _filter(os.getpid())  # built before the limits: libseccomp may open files while building it
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
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS (libseccomp sets it too; here it does not depend on that)
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    seccomp_filter.load()


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
        try:
            self._child = fork_child(os.path.abspath(path), self._dir.name, threads or 1, LOAD_TIMEOUT)
        except BaseException:
            self._dir.cleanup()
            raise
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
        code = self._child.returncode
        how = f"killed by signal {-code}" if isinstance(code, int) and code < 0 else f"exit code {code}"
        return ModelLoadError(f"the sandboxed model {self.source} stopped while {what} ({how})")

    def _answer(self, want: bytes, what: str, timeout: float | None = None) -> bytes:
        """The body of the next frame, which must be ``want``; the child's FAIL text becomes a ModelLoadError."""
        fd = self._child.stdout
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
        self._child.close()
        self._dir.cleanup()

    def __del__(self) -> None:
        if getattr(self, "_child", None) is not None:
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
        if self._child.poll() is not None:
            raise self._stopped("waiting")
        outs = []
        fd = self._child.stdin
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

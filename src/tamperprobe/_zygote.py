"""The sandbox's starter: one clean interpreter per verifier process that forks a child per suspect model file.

Every sandboxed child needs ``import torch`` before it locks itself down, and that import costs more CPU
than most verifications. So the first ``SandboxedModel`` of a process starts a *zygote*: a fresh
interpreter (``python -I``, the sandbox's scrubbed environment, a private empty folder of its own, a
session of its own, its standard streams on ``/dev/null``) that imports what a child needs and then only
forks, one child per request. It never opens a model file and never receives anything of the verifier's
but a file path, a private folder's name, a thread count and three pipe ends, so a child forked from it
holds nothing a child started the old way would not.

The verifier speaks to it over a ``SOCK_SEQPACKET`` socket pair inherited at start (no path another
process could connect to). A request is one JSON message carrying three descriptors (``SCM_RIGHTS``):
the read end of the child's input pipe, the write end of its answer pipe, and the write end of a status
pipe. The zygote forks; the child closes everything of the zygote's (the socket, every other child's
status pipe and pidfd), moves the pipes to descriptors 0 and 1, starts a session of its own, enters its
private folder and runs ``_sandbox._child_main``, which locks it down before it reads the file. The zygote
answers with the child's pid and a pidfd of it (so the verifier can kill exactly that process, never a
recycled pid), reaps the child when its pidfd turns readable and writes its wait status into the status
pipe. The zygote ends when the verifier's end of the socket closes, i.e. with the verifier.

A process forked from the verifier (a test's forked child, say) does not share its parent's zygote: it
starts its own on first use (``os.register_at_fork``).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Any

from .errors import ModelLoadError

_STATUS = struct.Struct("<i")
_MAX_MESSAGE = 1 << 16


class Child:
    """A sandboxed child forked by the zygote: its pipes, a pidfd to kill it, and its status once it ended.

    ``stdin``/``stdout`` are this side's ends of the child's input and answer pipes (raw descriptors).
    ``returncode`` is None while it runs, then as ``subprocess`` gives it (minus a signal's number), or
    ``UNKNOWN`` when the zygote ended before it could say.
    """

    UNKNOWN = "unknown"

    def __init__(self, pid: int, pidfd: int, stdin: int, stdout: int, status: int) -> None:
        self.pid, self._pidfd, self.stdin, self.stdout, self._status = pid, pidfd, stdin, stdout, status
        self.returncode: int | str | None = None

    def poll(self) -> int | str | None:
        """The child's exit code once it has ended, without waiting."""
        return self.wait(0)

    def wait(self, timeout: float = 30.0) -> int | str | None:
        """The child's exit code, waiting up to ``timeout`` seconds for it (None: still running).

        The zygote writes the wait status when it has reaped the child. Should the zygote end first (the
        status pipe closes empty), the child's pidfd says whether it still runs, and its code is ``UNKNOWN``.
        """
        if self.returncode is not None:
            return self.returncode
        if self._status >= 0:
            if not select.select([self._status], [], [], timeout)[0]:
                return None
            data = os.read(self._status, _STATUS.size)  # written whole by one write(2): a pipe never splits 4 bytes
            if len(data) == _STATUS.size:
                self.returncode = os.waitstatus_to_exitcode(_STATUS.unpack(data)[0])
                return self.returncode
            os.close(self._status)  # the zygote ended before it reaped the child
            self._status = -1
        if select.select([self._pidfd], [], [], timeout)[0]:  # a pidfd turns readable when its process ends
            self.returncode = Child.UNKNOWN
        return self.returncode

    def kill(self) -> None:
        """SIGKILL to exactly this child (through its pidfd: a pid the system gave to another process is never hit)."""
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:  # it has ended already
                pass

    def close(self) -> None:
        """Kill the child if it still runs, wait for its status, and close this side's descriptors (idempotent)."""
        if self._pidfd < 0:
            return
        if self.poll() is None:
            self.kill()
        self.wait()
        for fd in (self.stdin, self.stdout, self._status, self._pidfd):
            if fd >= 0:
                os.close(fd)
        self._pidfd = -1


class Zygote:
    """The verifier's side of one zygote: its process and the socket the requests go over (thread-safe)."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="tamperprobe-zygote-")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self._folder.name, "TMPDIR": self._folder.name, "OMP_NUM_THREADS": "1"}
        code = f"import sys; sys.path[:0] = {sys.path!r}; from tamperprobe._zygote import serve; sys.exit(serve({theirs.fileno()}))"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", code],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                cwd=self._folder.name,
                env=env,
                start_new_session=True,  # no controlling terminal, out of the verifier's process group
            )
        finally:
            theirs.close()
        self._socket = ours
        self._lock = threading.Lock()

    def alive(self) -> bool:
        return self.process.poll() is None and self._socket.fileno() >= 0

    def fork(self, path: str, folder: str, threads: int, timeout: float) -> Child:
        """A new child running ``path`` in ``folder``; ModelLoadError when the zygote does not answer within ``timeout``."""
        (in_r, in_w), (out_r, out_w), (status_r, status_w) = os.pipe(), os.pipe(), os.pipe()
        request = json.dumps({"path": path, "folder": folder, "threads": threads}).encode()
        try:
            with self._lock:
                socket.send_fds(self._socket, [request], [in_r, out_w, status_w])
                if not select.select([self._socket], [], [], timeout)[0]:
                    raise ModelLoadError(f"the sandbox's starter process did not answer within {timeout:g} s")
                message, fds, _, _ = socket.recv_fds(self._socket, _MAX_MESSAGE, 1)
        except BaseException as exc:  # a zygote that failed to answer is ended: the next model gets a new one
            for fd in (in_w, out_r, status_r):
                os.close(fd)
            self.close()
            if isinstance(exc, OSError):
                raise ModelLoadError(f"the sandbox's starter process is gone ({exc.strerror or exc})") from None
            raise
        finally:
            for fd in (in_r, out_w, status_w):
                os.close(fd)
        if not message or len(fds) != 1:
            for fd in (in_w, out_r, status_r, *fds):
                os.close(fd)
            self.close()
            raise ModelLoadError("the sandbox's starter process ended before it started the model's process")
        return Child(int(json.loads(message)["pid"]), fds[0], in_w, out_r, status_r)

    def close(self) -> None:
        """End the zygote (its children run on until their input closes) and remove its folder (idempotent)."""
        self._socket.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._folder.cleanup()


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def fork_child(path: str, folder: str, threads: int, timeout: float) -> Child:
    """A sandboxed child for ``path`` from this process's zygote, started (again) when there is none alive."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            if _zygote is not None:
                _zygote.close()
            _zygote = Zygote()
        zygote = _zygote
    return zygote.fork(path, folder, threads, timeout)


def _forget_in_child() -> None:
    """After a fork of the verifier: the parent's zygote stays the parent's (its socket copy is closed here)."""
    global _zygote, _zygote_lock
    if _zygote is not None:
        _zygote._socket.close()
    _zygote, _zygote_lock = None, threading.Lock()


def stop() -> None:
    """End this process's zygote, if any (the next sandboxed model starts a new one); run at exit."""
    global _zygote
    with _zygote_lock:
        if _zygote is not None:
            _zygote.close()
        _zygote = None


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(stop)


# --------------------------------------------------------------------------- the zygote itself


def serve(fd: int) -> int:
    """The zygote's loop (see the module doc): fork a child per request, report each child's end; return at EOF."""
    import torch  # noqa: F401 - what every child needs before its lock-down, imported once here

    from . import _sandbox, models  # noqa: F401

    sock = socket.socket(fileno=fd)
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, write end of its status pipe)
    while True:
        for pidfd in select.select([sock.fileno(), *children], [], [])[0]:
            if pidfd in children:
                pid, status_w = children.pop(pidfd)
                _, status = os.waitpid(pid, 0)
                try:
                    os.write(status_w, _STATUS.pack(status))
                except OSError:  # the verifier closed its end: nobody to tell
                    pass
                os.close(status_w)
                os.close(pidfd)
                continue
            message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 3)
            if not message:
                return 0
            if len(fds) != 3:
                for received in fds:
                    os.close(received)
                continue
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:  # the child: nothing of the zygote's stays open
                code = 1
                try:
                    sock.close()
                    for other, (_, status_w) in children.items():
                        os.close(other)
                        os.close(status_w)
                    code = _become_child(request, fds)
                finally:
                    os._exit(code)
            os.close(fds[0])
            os.close(fds[1])
            pidfd_of_child = os.pidfd_open(pid)
            children[pidfd_of_child] = (pid, fds[2])
            socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd_of_child])


def _become_child(request: dict[str, Any], fds: list[int]) -> int:
    """In the forked child: the pipes on 0 and 1, a session and a private folder of its own, then the sandbox's child."""
    from ._sandbox import _child_main

    stdin, stdout, status_w = fds
    os.close(status_w)
    os.dup2(stdin, 0)
    os.dup2(stdout, 1)
    os.close(stdin)
    os.close(stdout)
    os.setsid()
    folder = str(request["folder"])
    os.chdir(folder)
    os.environ.update(HOME=folder, TMPDIR=folder, TAMPERPROBE_THREADS=str(int(request["threads"])))
    tempfile.tempdir = None  # found again from TMPDIR: the private folder, not the zygote's
    return _child_main(str(request["path"]))

"""The parent's handle on one :mod:`racto_nb.kits.llama_child` process.

:class:`LlamaProcess` starts the child, sends it one JSON-lines request at a
time and reads the reply. When the child dies instead of answering, the call
raises :class:`~racto_nb.errors.LocalModelCrashed` with a one-line message
naming the signal (or exit status) and the fix; the handle is then dead and
the owner starts a new one. Nothing here imports ``llama_cpp``.

Not thread-safe: the owner (``LocalKit``) holds a lock around every call.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import IO, Any

from racto_nb.errors import LocalModelCrashed
from racto_nb.kits import llama_child
from racto_nb.kits.llama_child import ChatRequest, LoadReply, LoadRequest

log = logging.getLogger("racto_nb.kits.local")

#: The fix for a native crash, as the one-line error gives it.
PORTABLE_REBUILD = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python'
)
#: Signals by which a process dies of its own native code.
_NATIVE_CRASHES = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGFPE}
#: Lines of the child's stderr kept for the error.
_TAIL_LINES = 40
#: A line of llama.cpp's own saying what went wrong (an assertion, an error), worth quoting in the message.
_HINT = re.compile(r"GGML_ASSERT|\berror\b|\bfailed\b", re.IGNORECASE)
#: faulthandler's report of the signal, which the message already names.
_FAULTHANDLER = re.compile(r"^(Fatal Python error|Current thread|Thread 0x|Extension modules|  File )")


class LlamaProcess:
    """One running child; :meth:`start` it, then :meth:`chat` through it until it dies or is closed."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._owner_pid = os.getpid()
        self._dead = False
        self._drainer: threading.Thread | None = None
        #: Seconds from spawning the process until the model was ready.
        self.start_s: float | None = None
        self.load_reply: LoadReply | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """Started, not closed, not dead, and owned by this process (a fork inherits a stale copy)."""
        return (
            self._proc is not None
            and not self._dead
            and self._owner_pid == os.getpid()
            and self._proc.poll() is None
        )

    @property
    def stderr_tail(self) -> str:
        return "".join(self._tail)

    def start(self, request: LoadRequest) -> LoadReply:
        """Spawn the child and load the model in it."""
        started = time.perf_counter()
        self._proc = subprocess.Popen(
            [sys.executable, llama_child.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            # Unbuffered (FileIO): no Python lock is held while a thread waits on a pipe, so a fork
            # of this process (Celery's prefork pool) can close its copies without deadlocking.
            bufsize=0,
        )
        assert self._proc.stderr is not None
        self._drainer = threading.Thread(
            target=_drain, args=(self._proc.stderr, self._tail), name=f"racto-llama-{self._proc.pid}", daemon=True
        )
        self._drainer.start()
        weakref.finalize(self, _shut_down, self._proc, self._owner_pid)
        _LIVE.add(self)
        reply: LoadReply = self._request(request, "while loading the model")
        self.start_s = time.perf_counter() - started
        self.load_reply = reply
        return reply

    def chat(self, request: ChatRequest) -> dict[str, Any]:
        """The completion dict ``create_chat_completion`` returned in the child."""
        reply = self._request(request, "while generating")
        completion: dict[str, Any] = reply["completion"]
        return completion

    def close(self) -> None:
        """Ask the child to exit (stdin closed), then make sure it did."""
        self._dead = True
        if self._proc is not None:
            _shut_down(self._proc, self._owner_pid)

    def _request(self, request: LoadRequest | ChatRequest, during: str) -> Any:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            _write_all(proc.stdin.fileno(), json.dumps(request).encode() + b"\n")
            line = _read_line(proc.stdout.fileno())
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        if not line.endswith(b"\n"):
            raise self._died(during)
        reply = json.loads(line)
        if not reply["ok"]:
            raise _rebuild(reply["error_type"], reply["error"])
        return reply

    def _died(self, during: str) -> LocalModelCrashed:
        proc = self._proc
        assert proc is not None
        self._dead = True
        try:
            returncode = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stdout closed but still running: not usable either way
            proc.kill()
            returncode = proc.wait()
        if self._drainer is not None:
            self._drainer.join(timeout=2)  # the last lines of stderr (it ends at EOF)
        tail = self.stderr_tail
        message = crash_message(returncode, proc.pid, during, tail)
        log.info("%s", message)  # the caller gets it as an exception: no second copy on stderr
        return LocalModelCrashed(message, returncode=returncode, stderr_tail=tail)


def crash_message(returncode: int, pid: int, during: str, stderr_tail: str = "") -> str:
    """One line: what ended the process, that the caller is fine, and the fix."""
    who = f"the local model process (pid {pid})"
    fresh = "the next call starts a fresh one"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
            name = sig.name
        except ValueError:
            sig, name = None, f"signal {-returncode}"
        if sig in _NATIVE_CRASHES:
            hints = [
                line.strip()
                for line in stderr_tail.splitlines()
                if _HINT.search(line) and not _FAULTHANDLER.match(line)
            ]
            said = f" ({hints[-1][:160]})" if hints else ""
            return (
                f"{who} crashed with {name} {during}, in llama-cpp-python's native code{said}; {fresh}. "
                f"Fix: rebuild llama-cpp-python portably: {PORTABLE_REBUILD}"
            )
        if sig is signal.SIGKILL:
            return (
                f"{who} was killed by SIGKILL {during} (out of memory, or kill -9); {fresh}. "
                "If memory is short, use a smaller n_ctx or fewer worker processes"
            )
        return f"{who} was stopped by {name} {during}; {fresh}"
    lines = [line.strip() for line in stderr_tail.splitlines() if line.strip()]
    said = f": {lines[-1][:160]}" if lines else ""
    return f"{who} exited with status {returncode} {during}{said}; {fresh}"


def _rebuild(error_type: str, message: str) -> Exception:
    """The child's Python exception as the builtin it was (``ValueError`` for a prompt over n_ctx, ...)."""
    cls = getattr(builtins, error_type, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # a builtin whose constructor wants more (UnicodeDecodeError, ...)
            pass
    return RuntimeError(f"{error_type}: {message}")


#: Handles with a running child, for :func:`_after_fork_in_child`.
_LIVE: weakref.WeakSet[LlamaProcess] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked process (Celery's prefork pool) lets go of the parent's pipes to its model processes.

    Otherwise the fork would hold the write end of a child's stdin open, and
    that child would not see EOF when the parent closes it or dies. The pipes
    are unbuffered file objects, so closing these copies takes no lock a
    parent thread could have held at the fork. The handle counts as dead
    here; the fork's kit starts a model process of its own.
    """
    for handle in list(_LIVE):
        handle._dead = True
        proc = handle._proc
        for stream in (proc.stdin, proc.stdout, proc.stderr) if proc is not None else ():
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    _LIVE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_line(fd: int) -> bytes:
    """One reply: bytes up to and including the newline, or what came before EOF.

    The child writes exactly one line per request and nothing unasked, so no
    bytes past the newline are ever read (and none need keeping).
    """
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        chunks.append(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return b"".join(chunks)


def _drain(stream: IO[bytes], tail: collections.deque[str]) -> None:
    """Keep the last lines of the child's stderr (and log them at debug level) until it closes."""
    fd, pending = stream.fileno(), b""
    while chunk := _read_or_eof(fd):
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace") + "\n"
            tail.append(line)
            log.debug("llama child: %s", line.rstrip())
    if pending:
        tail.append(pending.decode(errors="replace"))
    # Closed here, by the only thread that reads it: closing it from another could race a read
    # against the fd number being reused.
    with contextlib.suppress(OSError):
        stream.close()


def _read_or_eof(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except OSError:  # closed under us (close(), or a fork letting go of it)
        return b""


def _shut_down(proc: subprocess.Popen[bytes], owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked copy of the handle: the process is the parent's
        return
    if proc.poll() is None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the child's loop ends at EOF
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()

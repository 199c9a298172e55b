"""Start and stop real ``celery worker`` processes from Python.

``%racto_workers start N`` is :func:`start_workers`, ``%racto_workers stop``
is :func:`stop_workers`: ``celery -A racto_nb.app worker`` processes that
inherit this kernel's environment, plus the broker this kernel is connected
to, so their configuration (kit, retry policy, worker name) matches the
notebook's. :class:`WorkerProcess` and :class:`WorkerPool` serve them and the
tests, which need real workers because the properties that matter (a task
survives a worker killed mid-flight, warm shutdown finishes what it started)
only exist across a process boundary.

Design choices worth knowing:

* Each worker runs in its own session (process group), so :meth:`WorkerProcess.kill`
  takes pool children down with it and a Ctrl-C in the notebook does not reach it.
* Readiness is read from the worker's own log: Celery logs ``NODENAME ready.``
  at INFO once its consumer is attached to the broker. That is the only signal
  that needs no code inside the worker, and it means "can take tasks now",
  unlike "the process exists". The price: the log level must be DEBUG or INFO.
* Workers started here are stopped when this interpreter exits, so a restarted
  kernel does not leave stale workers consuming tasks with yesterday's code.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict
from uuid import uuid4

from typing_extensions import Unpack

from racto_nb.config import DEFAULT_WORKER_CONCURRENCY, env_name, is_embedded_url, load_config
from racto_nb.engine.worker import FOLLOW_PID_ENV, STARTED_BY_ENV
from racto_nb.errors import EmbeddedBrokerError, InvalidArgument, WorkerStartError
from racto_nb.fleet.connection import connected_worker
from racto_nb.fleet.status import worker_heartbeats
from racto_nb.lifecycle import StartStop

__all__ = [
    "DEFAULT_APP",
    "READY_PATTERN",
    "WorkerPool",
    "WorkerProcess",
    "orphan_workers",
    "running_workers",
    "start_workers",
    "stop_workers",
]

#: The generic worker app (its kit comes from configuration).
DEFAULT_APP = "racto_nb.app"

#: Celery's readiness line, e.g. ``[...: INFO/MainProcess] racto-1a2b3c4d@box ready.``
READY_PATTERN = re.compile(r"(?P<nodename>\S+@\S+) ready\.\s*$")
_READY_LEVELS = frozenset({"DEBUG", "INFO"})
_TAIL_LINES = 40
_POLL_S = 0.05

# Strong references, so a worker whose handle was dropped is still stopped at exit.
_RUNNING: set[WorkerProcess] = set()
# What start_workers() started, in order, for stop_workers() and running_workers().
_started: list[WorkerProcess] = []


def _stop_running_at_exit() -> None:
    workers = list(_RUNNING)
    for worker in workers:
        worker._send_term()
    deadline = time.monotonic() + 3.0
    for worker in workers:
        worker._finish_stop(deadline)


atexit.register(_stop_running_at_exit)


def _default_hostname() -> str:
    return f"racto-{uuid4().hex[:8]}@%h"


class WorkerOptions(TypedDict, total=False):
    """What every worker of a :class:`WorkerPool` shares (see :class:`WorkerProcess`)."""

    concurrency: int
    pool: str
    env: Mapping[str, str] | None
    queues: Sequence[str] | None
    loglevel: str
    cwd: Path | None
    extra_args: Sequence[str]


class WorkerProcess(StartStop):
    """One ``celery -A APP worker`` subprocess.

    ``app`` is the ``-A`` argument (``"racto_nb.app"``,
    ``"tests.worker_apps.ping_app:app"``). ``cwd`` is where the worker runs and
    is put first on its ``PYTHONPATH``, so an app module next to the notebook
    imports. ``env`` is layered over this process's environment, which is how
    a worker gets its broker URL or API key without them entering a task.
    ``hostname`` may use Celery's ``%h``; the expanded name is
    :attr:`nodename` once the worker is ready.
    """

    def __init__(
        self,
        app: str,
        *,
        concurrency: int = DEFAULT_WORKER_CONCURRENCY,
        pool: str = "threads",
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        queues: Sequence[str] | None = None,
        loglevel: str = "INFO",
        log_path: Path | None = None,
        cwd: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if not app:
            raise InvalidArgument("app must name a Celery app for -A, e.g. 'racto_nb.app'")
        if concurrency < 1:
            raise InvalidArgument(f"concurrency must be >= 1, not {concurrency}")
        if loglevel.upper() not in _READY_LEVELS:
            raise InvalidArgument(
                f"loglevel must be DEBUG or INFO, not {loglevel!r}: readiness is detected from the "
                "INFO line Celery logs when the worker is ready"
            )
        if queues is not None and not queues:
            raise InvalidArgument("queues must name at least one queue (or be None for Celery's default)")
        self.app = app
        self.concurrency = concurrency
        self.pool = pool
        self._hostname = hostname or _default_hostname()
        self.env = dict(env or {})
        self.queues = list(queues) if queues is not None else None
        self.loglevel = loglevel.upper()
        self._log_path = log_path
        self.cwd = cwd
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._nodename: str | None = None

    def __repr__(self) -> str:
        if self._proc is None:
            state = "not started"
        elif self._proc.poll() is None:
            state = f"pid {self._proc.pid}"
        else:
            state = f"exited {self._proc.returncode}"
        return f"WorkerProcess({self.app!r}, {self.nodename or self.hostname!r}, {state})"

    # -- properties -----------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        """The command line the worker is started with."""
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "--pool",
            self.pool,
            "-c",
            str(self.concurrency),
            "-n",
            self._hostname,
            "--loglevel",
            self.loglevel,
            # Gossip, mingle and heartbeats are chatter between workers that a
            # notebook fleet never uses; mingle alone adds ~1 s to every start.
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        if self.queues:
            argv += ["-Q", ",".join(self.queues)]
        return argv + self.extra_args

    @property
    def hostname(self) -> str:
        """The ``-n`` argument as given (may contain ``%h``)."""
        return self._hostname

    @property
    def nodename(self) -> str | None:
        """The worker's expanded node name (``racto-1a2b3c4d@box``) once it is ready."""
        return self._nodename

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """None while running (or never started); negative for death by signal."""
        return None if self._proc is None else self._proc.poll()

    @property
    def log_path(self) -> Path:
        """Where stdout and stderr go; kept after the worker stops, for post-mortems."""
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="racto-worker-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        return self._log_path

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self!r} has not been started")
        return self._proc

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> WorkerProcess:
        """Launch the worker and return once it consumes tasks.

        Raises RuntimeError with the log's tail if it exits first or is not
        ready within ``timeout_s`` (in which case it is killed: a worker that
        is half up would otherwise take tasks the caller thinks are unserved).
        """
        self._launch()
        self._wait_ready(time.monotonic() + timeout_s)
        return self

    def _launch(self) -> None:
        if self.is_alive():
            raise RuntimeError(f"{self!r} is already running")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if self.cwd is not None:
            paths = [str(self.cwd), *env.get("PYTHONPATH", "").split(os.pathsep)]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self._nodename = None
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
        _RUNNING.add(self)

    def _wait_ready(self, deadline: float) -> None:
        proc = self._started()
        offset = 0
        pending = b""
        while True:
            # Read before checking for exit, so a line written just before a
            # crash (or just before readiness) is never missed.
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                chunk = log.read()
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                match = READY_PATTERN.search(line.decode(errors="replace"))
                if match:
                    self._nodename = match.group("nodename")
                    return
            if proc.poll() is not None:
                self._forget()
                raise WorkerStartError(
                    f"celery worker {self._hostname} exited with code {proc.returncode} before it was "
                    f"ready; last {_TAIL_LINES} lines of {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerStartError(
                    f"celery worker {self._hostname} was not ready in time (no 'ready.' line); killed it. "
                    f"Last {_TAIL_LINES} lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Warm shutdown: SIGTERM lets running tasks finish, SIGKILL after ``timeout_s``.

        Returns the exit code (None if never started). Safe to call twice.
        """
        if self._proc is None:
            return None
        self._send_term()
        return self._finish_stop(time.monotonic() + timeout_s)

    def kill(self) -> int | None:
        """SIGKILL the worker and its children now, as a crash or an OOM kill would."""
        if self._proc is None:
            return None
        self._killpg()
        self._proc.wait()
        self._forget()
        return self._proc.returncode

    def _send_term(self) -> None:
        # To the main process only: it owns the warm shutdown and tells its
        # pool children what to do; signalling them directly races with that.
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    def _finish_stop(self, deadline: float) -> int | None:
        if self._proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # Also sweeps pool children orphaned by a main process that died. The
        # group id cannot be reused while any member lives, so this only ever
        # hits the worker's own leftovers.
        self._killpg()
        self._proc.wait()
        self._forget()
        return self._proc.returncode

    def _killpg(self) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def _forget(self) -> None:
        _RUNNING.discard(self)

    def __enter__(self) -> WorkerProcess:
        return self if self.is_alive() else self.start()


class WorkerPool(StartStop):
    """Several :class:`WorkerProcess` started and stopped together.

    Starting launches every process before waiting for any, and stopping
    signals all before waiting, so N workers cost about as long as one.
    """

    def __init__(self, workers: Iterable[WorkerProcess]) -> None:
        self.workers = list(workers)

    @classmethod
    def of(cls, app: str, n: int, *, log_dir: Path | None = None, **options: Unpack[WorkerOptions]) -> WorkerPool:
        """``n`` identically configured workers with unique node names (not started yet).

        ``options`` are :class:`WorkerProcess`'s; each worker logs to ``log_dir/<name>.log`` when given.
        """
        if n < 1:
            raise InvalidArgument(f"a pool needs at least one worker, not {n}")
        workers = []
        for _ in range(n):
            hostname = _default_hostname()
            log_path = None if log_dir is None else log_dir / f"{hostname.split('@')[0]}.log"
            workers.append(WorkerProcess(app, hostname=hostname, log_path=log_path, **options))
        return cls(workers)

    def __repr__(self) -> str:
        return f"WorkerPool({len(self.alive())}/{len(self.workers)} alive)"

    def __len__(self) -> int:
        return len(self.workers)

    def __iter__(self) -> Iterator[WorkerProcess]:
        return iter(self.workers)

    def __getitem__(self, index: int) -> WorkerProcess:
        return self.workers[index]

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.is_alive()]

    def start(self, timeout_s: float = 30.0) -> WorkerPool:
        """Start all; if any fails, kill the rest too and raise its error."""
        deadline = time.monotonic() + timeout_s
        try:
            for worker in self.workers:
                worker._launch()
            for worker in self.workers:
                worker._wait_ready(deadline)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout_s: float = 10.0) -> list[int | None]:
        """Warm-shut-down all within one shared ``timeout_s``; return their exit codes."""
        for worker in self.workers:
            worker._send_term()
        deadline = time.monotonic() + timeout_s
        return [worker._finish_stop(deadline) for worker in self.workers]

    def kill(self) -> None:
        for worker in self.workers:
            worker.kill()


# --------------------------------------------------------------------------- from a notebook


def start_workers(
    n: int = 1,
    *,
    concurrency: int = DEFAULT_WORKER_CONCURRENCY,
    app: str = DEFAULT_APP,
    timeout_s: float = 60.0,
    cwd: Path | None = None,
) -> list[WorkerProcess]:
    """Start ``n`` worker processes (thread pool of ``concurrency``) and wait until they take tasks.

    They inherit this process's environment (so ``RACTO_*`` settings and API
    keys match) and run in ``cwd`` (default: the notebook's directory, so a
    ``racto_nb.toml`` or an app module next to the notebook is found). With
    the default app they also get the broker and result backend this kernel
    is connected to. Stop them with :func:`stop_workers`; they are also
    stopped when the kernel exits.

    Raises:
        EmbeddedBrokerError: the current connection is embedded (in-process),
            which other processes cannot reach.
        WorkerStartError: a worker failed to start (with its log's tail).
    """
    if n < 1:
        raise InvalidArgument(f"n must be >= 1 (got {n})")
    env = _broker_env() if app == DEFAULT_APP else {}
    # They follow this kernel: a kernel killed (hard restart) takes them down instead of orphaning them.
    env.update({FOLLOW_PID_ENV: str(os.getpid()), STARTED_BY_ENV: _this_kernel()})
    pool = WorkerPool.of(app, n, concurrency=concurrency, env=env, cwd=cwd or Path.cwd())
    pool.start(timeout_s=timeout_s)
    _started.extend(pool.workers)
    return list(pool.workers)


def stop_workers(workers: Sequence[WorkerProcess] | None = None, *, timeout_s: float = 10.0) -> int:
    """Warm-stop ``workers``; return how many.

    By default: every worker :func:`start_workers` started in this kernel, and
    every :func:`orphan_workers` one (started here by a kernel that is gone),
    which is asked to stop through the broker (Celery's ``shutdown`` control).
    """
    chosen = list(_started if workers is None else workers)
    stopped = [w for w in chosen if w.is_alive()]
    WorkerPool(chosen).stop(timeout_s=timeout_s)
    _started[:] = [w for w in _started if w not in chosen]
    orphans = orphan_workers() if workers is None else []
    current = connected_worker()
    if orphans and current is not None:
        current.app.control.shutdown(destination=[str(o["hostname"]) for o in orphans])
    return len(stopped) + len(orphans)


def orphan_workers() -> list[dict[str, Any]]:
    """Heartbeats of workers that ``start_workers`` started on this machine from a kernel no longer running.

    Normally there are none (they follow their kernel); this finds the ones
    that could not, e.g. a worker busy in a call that outlived the kernel.
    """
    current = connected_worker()
    online = worker_heartbeats(current) if current is not None else None
    host = socket.gethostname()
    found = []
    for record in online or []:
        where, _, pid = str(record.get("started_by") or "").rpartition(":")
        if where == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            found.append(record)
    return found


def _this_kernel() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_workers() -> list[WorkerProcess]:
    """Workers started by :func:`start_workers` that are still alive."""
    return [w for w in _started if w.is_alive()]


def _broker_env() -> dict[str, str]:
    current = connected_worker()
    if current is not None:
        broker = str(current.app.conf.broker_url or "")
        backend = current.app.conf.result_backend
    else:
        cfg = load_config()
        broker, backend = cfg.broker_url or "", cfg.result_backend
    if is_embedded_url(broker or None):
        raise EmbeddedBrokerError(
            "worker processes need a broker they can reach, and this kernel runs embedded (in-process). "
            "Start Redis (`redis-server --daemonize yes`) and call "
            "racto_nb.connect('redis://127.0.0.1:6379/0') first, or set "
            f"{env_name('broker_url')} before starting the kernel"
        )
    env = {env_name("broker_url"): broker}
    if isinstance(backend, str) and "://" in backend:
        env[env_name("result_backend")] = backend
    return env

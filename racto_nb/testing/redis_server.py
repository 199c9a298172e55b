"""A throwaway ``redis-server`` for a test session.

Celery's broker and result backend behave differently enough from in-memory
fakes (visibility timeouts, acks on a real socket, a worker killed mid-task)
that the tests which matter need a real Redis. This one lives on a free port,
keeps nothing on disk, and disappears with its temporary directory.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from racto_nb.lifecycle import StartStop
from racto_nb.testing._net import free_port

__all__ = ["RedisServer"]

_PORT_ATTEMPTS = 3


class RedisServer(StartStop):
    """``redis-server`` as a subprocess: ``with RedisServer() as rs: rs.url``.

    ``port=None`` picks a free port, and retries with another if someone else
    takes it between the pick and redis binding it.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str = "redis-server",
        startup_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self._requested_port = port
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None

    def __repr__(self) -> str:
        return f"RedisServer({self.url if self._proc else 'not started'})"

    @property
    def port(self) -> int:
        if self._port is None or self._proc is None:
            raise RuntimeError("RedisServer is not started; call start() or use it as a context manager")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, usable as Celery broker and backend."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path | None:
        return self._tmpdir / "redis.log" if self._tmpdir else None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for this server; kwargs go to ``Redis.from_url``."""
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self) -> RedisServer:
        if self._proc is not None:
            raise RuntimeError("RedisServer is already started")
        binary = shutil.which(self.executable)
        if binary is None:
            raise RuntimeError(
                f"{self.executable!r} was not found on PATH; install it: apt-get install redis-server"
            )
        self._tmpdir = Path(tempfile.mkdtemp(prefix="racto-redis-"))
        attempts = 1 if self._requested_port is not None else _PORT_ATTEMPTS
        try:
            for _ in range(attempts):
                if self._launch(binary, self._requested_port or free_port()):
                    return self
        except BaseException:
            self.stop()
            raise
        self.stop()
        if self._requested_port is not None:
            raise RuntimeError(f"redis-server could not bind port {self._requested_port}: address in use")
        raise RuntimeError(f"redis-server found every port it tried in use ({attempts} attempts)")

    def _launch(self, binary: str, port: int) -> bool:
        """Start on ``port``; False if the port turned out to be taken."""
        assert self._tmpdir is not None
        log_path = self._tmpdir / "redis.log"
        with open(log_path, "wb") as log:
            # redis logs to stdout when no logfile is set; keep it for errors.
            proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(self._tmpdir),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._proc, self._port = proc, port
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while True:
                if proc.poll() is not None:
                    log_text = log_path.read_text(errors="replace")
                    self._proc = None
                    if "Address already in use" in log_text:
                        return False
                    raise RuntimeError(
                        f"redis-server exited with code {proc.returncode} while starting on port {port}:\n"
                        + "\n".join(log_text.splitlines()[-20:])
                    )
                try:
                    # Whoever answers must be *our* process: on a taken port
                    # the old owner would answer PING while ours is dying.
                    if client.info("server").get("process_id") == proc.pid:
                        return True
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server on port {port} did not answer PING within {self.startup_timeout_s} s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Terminate the server and delete its directory; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

"""A real JupyterLab server and a headless Chromium for ``test_browser.py``.

Everything is private to one test: the server's config, data, runtime and
settings directories, its kernelspec (this very interpreter), the browser's
profile. Every process either starts carries ``MARKER_ENV`` in its
environment, so the test can prove afterwards that none of them (server,
kernel, browser, its helpers) outlived it, even one that was re-parented.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from racto_nb.testing import free_port

#: Debian's ``chromium`` package; Playwright's own browser download cannot reach its host here.
CHROMIUM = Path("/usr/bin/chromium")
#: Flags that keep Chromium off the network and out of the user's profile.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Environment variable set on every process the test starts (value: a random token).
MARKER_ENV = "RACTO_BROWSER_TEST_MARKER"
KERNEL_NAME = "racto-browser-test"
REPO_ROOT = Path(__file__).resolve().parent.parent


def processes_with_marker(marker: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose environment carries ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def reap_marked(marker: str, timeout_s: float = 10.0) -> list[int]:
    """Wait for marked processes to exit; SIGKILL (by pid) what is left. Returns the pids that had to be killed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not processes_with_marker(marker):
            return []
        time.sleep(0.2)
    leftovers = processes_with_marker(marker)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def write_notebook(path: Path, cells: list[str]) -> None:
    """An nbformat 4 notebook of code cells, bound to this test's kernelspec."""
    notebook = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": KERNEL_NAME, "display_name": "racto browser test", "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": [
            {
                "cell_type": "code",
                "id": f"cell-{i}",
                "metadata": {},
                "execution_count": None,
                "outputs": [],
                "source": source,
            }
            for i, source in enumerate(cells)
        ],
    }
    path.write_text(json.dumps(notebook, indent=1))


class JupyterLab:
    """``jupyter lab`` in a subprocess, isolated under ``home``; a context manager.

    Stopped through its own REST API (kernels first, then the server), so the
    kernel gets a clean shutdown; the process group is killed only as a fallback.
    """

    def __init__(self, home: Path, marker: str, *, start_timeout_s: float = 45.0) -> None:
        self.home = home
        self.root = home / "root"
        self.token = secrets.token_hex(16)
        self.marker = marker
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.log_path = home / "jupyter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}?token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------ setup

    def _environment(self) -> dict[str, str]:
        config, data, runtime = self.home / "config", self.home / "data", self.home / "runtime"
        # The kernel is this interpreter, so it imports the racto_nb under test.
        spec_dir = data / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True, exist_ok=True)
        (spec_dir / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "racto browser test",
                    "language": "python",
                }
            )
        )
        # No news or update pop-ups: they would ask the network and cover the page.
        settings = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        runtime.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RACTO_", "JUPYTER", "JPY_"))}
        env.update(
            {
                "JUPYTER_CONFIG_DIR": str(config),
                "JUPYTER_DATA_DIR": str(data),
                "JUPYTER_RUNTIME_DIR": str(runtime),
                "JUPYTERLAB_SETTINGS_DIR": str(config / "lab" / "user-settings"),
                "JUPYTERLAB_WORKSPACES_DIR": str(config / "lab" / "workspaces"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
                MARKER_ENV: self.marker,
            }
        )
        return env

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={self.root}",
            f"--IdentityProvider.token={self.token}",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands, read kernel state
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.news_url=None",
            "--LabApp.extension_manager=readonly",  # the default one lists extensions from PyPI
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ]

    def __enter__(self) -> JupyterLab:
        self.root.mkdir(parents=True, exist_ok=True)
        env = self._environment()
        for _ in range(3):  # free_port can race with another process; a bind failure just tries another
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self._command(),
                    cwd=self.root,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_until_up():
                return self
            if self.proc.poll() is None or "already in use" not in self.log():
                break  # a port clash is the only failure worth another try
        self.stop()
        raise RuntimeError(f"jupyter lab did not answer within {self.start_timeout_s:g} s; log:\n{self.log()}")

    def _wait_until_up(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if self.request("GET", "api/status", timeout_s=2.0) is not None:
                    return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        return False

    def request(self, method: str, path: str, *, timeout_s: float = 5.0) -> Any:
        req = urllib.request.Request(
            f"{self.base_url}/{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            body = response.read()
        return json.loads(body) if body else {}

    # ------------------------------------------------------------------ teardown

    def stop(self, timeout_s: float = 15.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            for kernel in self.request("GET", "api/kernels"):
                self.request("DELETE", f"api/kernels/{kernel['id']}", timeout_s=timeout_s)
            self.request("POST", "api/shutdown")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

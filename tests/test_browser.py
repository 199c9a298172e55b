"""The one real-browser test: a batch's progress widget renders in JupyterLab in headless Chromium.

Everything else about widgets is asserted on widget values without a browser
(``test_progress.py``); this proves the page itself: a real ``jupyter lab``
server, a real ipykernel running ``run_batch`` on the embedded worker, the
``@jupyter-widgets/jupyterlab-manager`` extension drawing the widget in
Chromium, and a click on "Retry failed" travelling back to the kernel and
resubmitting the failed rows.

Needs ``jupyterlab`` and ``playwright`` (Python packages; Playwright's own
browser download is never used) and Debian's ``chromium`` at /usr/bin/chromium.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import playwright.sync_api as sync_api
import pytest

from tests.browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    MARKER_ENV,
    JupyterLab,
    reap_marked,
    write_notebook,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: Two rows fail on their first attempt only, so the batch ends 8 ok / 2 failed and a retry fixes both.
SETUP = '''\
import racto_nb
from racto_nb.api import run_batch
from racto_nb.models import ChatResponse


class FlakyOnceKit:
    """Echoes the prompt; a prompt containing 'flaky' fails its first attempt (not retryable)."""

    def __init__(self):
        self.failed_once = set()

    def chat(self, config):
        prompt = config.user_message
        if "flaky" in prompt and prompt not in self.failed_once:
            self.failed_once.add(prompt)
            raise ValueError(f"first attempt at {prompt!r} fails")
        return ChatResponse(content=f"echo: {prompt}")


_ = racto_nb.connect(kit=FlakyOnceKit(), concurrency=2)
'''
BATCH = """\
rows = [f"row {i}" for i in range(8)] + ["flaky a", "flaky b"]
run = run_batch(rows, progress="widget", wait=False, title="browser test", interval_s=0.2)
assert run.done.wait(30), "the batch did not end in 30 s"
print(f"BATCH_ID={run.batch_id}")
"""

#: The notebook's kernel is connected and idle: cells sent now are executed, and widget comms are wired.
KERNEL_IDLE_JS = """() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  const ctx = panel && panel.sessionContext;
  const kernel = ctx && ctx.session && ctx.session.kernel;
  return !!kernel && ctx.isReady && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
}"""


@pytest.fixture(scope="module", autouse=True)
def chromium_installed() -> None:
    """No skip: scripts/test.sh installs it, and a missing browser must not pass for a rendered page."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does)"


@pytest.fixture
def marker() -> Iterator[str]:
    """Tags every process this test starts; afterwards none may be left (killed by pid if one is)."""
    value = secrets.token_hex(8)
    yield value
    leftovers = reap_marked(value)
    assert not leftovers, f"processes outlived the test and were killed: {leftovers}"


@pytest.fixture
def lab(tmp_path: Path, marker: str) -> Iterator[JupyterLab]:
    with JupyterLab(tmp_path / "lab", marker) as server:
        write_notebook(server.root / "progress.ipynb", [SETUP, BATCH])
        yield server


@pytest.fixture
def page(tmp_path: Path, marker: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv(MARKER_ENV, marker)  # Playwright's driver inherits it, and Chromium from the driver
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile, never the user's
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            context.set_default_timeout(30_000)
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def test_batch_progress_widget_renders_and_retries_in_jupyterlab(lab: JupyterLab, page: Any, tmp_path: Path) -> None:
    shot = tmp_path / "jupyterlab-progress.png"
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    started = time.monotonic()
    try:
        drive_and_check(page, lab)
    except (AssertionError, sync_api.Error) as exc:
        page.screenshot(path=str(shot))
        log_tail = "\n".join(lab.log().splitlines()[-30:])
        raise AssertionError(f"{exc}\n\nscreenshot: {shot}\njupyter lab log (last lines):\n{log_tail}") from exc
    elapsed = time.monotonic() - started
    page.screenshot(path=str(shot))
    assert not errors, f"JavaScript errors on the page: {errors} (screenshot: {shot})"
    assert elapsed < 60, f"the browser part took {elapsed:.1f} s (screenshot: {shot})"


def drive_and_check(page: Any, lab: JupyterLab) -> None:
    """Open the notebook, run all cells, check the finished batch's widget, click Retry failed."""
    expect = sync_api.expect
    page.goto(lab.url("lab/tree/progress.ipynb"))
    page.wait_for_function(KERNEL_IDLE_JS, timeout=45_000)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")  # no await

    # The kernel's own word on which batch ran, printed once the batch ended.
    printed = page.locator(".jp-OutputArea-output", has_text="BATCH_ID=")
    expect(printed).to_be_visible(timeout=45_000)
    match = re.search(r"BATCH_ID=(\S+)", printed.inner_text())
    assert match, printed.inner_text()
    batch_id = match.group(1)

    panel = page.locator(".jp-OutputArea-output .racto-progress")
    expect(panel).to_have_count(1)
    expect(panel).to_be_visible()
    expect(panel).to_contain_text(f"%racto_batch --attach {batch_id}")
    expect(panel).to_contain_text("browser test")
    state = panel.locator(".racto-state")
    bar = panel.locator(".racto-bar")
    expect(state).to_have_text("Finished — 2 failed")
    expect(bar).to_contain_text("10/10")

    def segment(title: str) -> Any:
        return bar.locator(f"div[title='{title}']")

    # One segment per state, sized by its share: two failures are a fifth of the bar, not a red bar.
    expect(segment("success: 8")).to_have_attribute("style", re.compile(r"width:\s*80(\.0+)?%"))
    expect(segment("failure: 2")).to_have_attribute("style", re.compile(r"width:\s*20(\.0+)?%"))

    def count(state: str) -> Any:
        return panel.locator(".widget-html-content", has_text=re.compile(rf"^{state}: "))

    expect(count("success")).to_have_text("success: 8")
    expect(count("failure")).to_have_text("failure: 2")
    expect(count("pending")).to_have_text("pending: 0")
    expect(panel.get_by_role("button", name="Cancel")).to_be_disabled()
    retry = panel.get_by_role("button", name="Retry failed")
    expect(retry).to_be_enabled()
    panel.screenshot(path=str(lab.home.parent / "widget-before-retry.png"))

    # Browser -> comm -> kernel -> resubmit -> embedded worker -> widget state -> browser.
    retry.click()
    expect(count("success")).to_have_text("success: 10", timeout=20_000)
    expect(count("failure")).to_have_text("failure: 0")
    expect(state).to_have_text("Finished")
    expect(segment("success: 10")).to_have_attribute("style", re.compile(r"width:\s*100(\.0+)?%"))
    expect(segment("failure: 2")).to_have_count(0)
    expect(panel.get_by_role("button", name="Retry submitted")).to_be_disabled()
    expect(page.get_by_text("Error displaying widget")).to_have_count(0)

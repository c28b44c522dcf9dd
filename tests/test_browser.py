"""JupyterLab in headless Chromium: run notebook 03, move the weight viewer's slider, see it redraw.

Chromium comes from Debian's `chromium` package (`make test` installs it where it can); Playwright
drives it through `executable_path`, no browser download. Without Chromium the test is skipped
with the reason, except under CI=true, where it must run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from scalebio_core.core.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _smoke_copy(src: Path, dst: Path) -> None:
    """The notebook with PRESET = "smoke" in its parameters cell (as papermill would inject);
    its other parameters (SEED, OVERRIDES) stay."""
    nb = json.loads(src.read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            text = "".join(cell["source"])
            cell["source"] = text.replace('PRESET = "quick"', 'PRESET = "smoke"', 1)
            assert 'PRESET = "smoke"' in cell["source"], text
    dst.write_text(json.dumps(nb))


@pytest.fixture
def lab(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing under CI=true: make test should have installed it")
        pytest.skip("Chromium is not installed (apt-get install chromium); browser test skipped")
    pytest.importorskip("playwright.sync_api")
    work = tmp_path / "lab"
    work.mkdir()
    _smoke_copy(ROOT / "notebooks" / "03_noisy_data.ipynb", work / "03_smoke.ipynb")
    port, token = free_port(), "scalebio-test-token"
    env = {
        **os.environ,
        "SCALEBIO_RUNS": str(tmp_path / "runs"),
        "SCALEBIO_FIGURES": str(tmp_path / "figures"),
        "SCALEBIO_RESULTS": str(tmp_path / "results"),
        "JUPYTER_CONFIG_DIR": str(tmp_path),
    }
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={work}",
            "--ServerApp.disable_check_xsrf=True",
            "--allow-root",
            "--LabApp.news_url=",
            "--ServerApp.open_browser=False",
        ],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
        yield url, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # stop the server (and its kernels) by process id
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _run_all_when_kernel_ready(page) -> None:
    """Wait for an idle kernel (and no dialog), then Run → Run All Cells."""
    page.wait_for_function(
        "document.querySelector('.jp-StatusBar-Widget') !== null && "
        "document.body.innerText.includes('| Idle')",
        timeout=180_000,
    )
    page.wait_for_timeout(3000)  # let JupyterLab settle on one kernel session
    dialog = page.locator(".jp-Dialog .jp-mod-accept")
    if dialog.count():
        dialog.first.click()
        page.wait_for_timeout(2000)
    page.click("li.lm-MenuBar-item:has-text('Run')", timeout=30_000)
    page.click("text=Run All Cells", timeout=30_000)


@pytest.mark.browser
def test_weight_viewer_slider_redraws(lab):
    from playwright.sync_api import sync_playwright

    url, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/03_smoke.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook", timeout=120_000)
        _run_all_when_kernel_ready(page)
        label = page.locator(".scalebio-step-label").first
        try:
            label.wait_for(timeout=240_000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "run_all_failed.png"), full_page=True)
            _run_all_when_kernel_ready(page)  # once more: the kernel may have been swapped
            label.wait_for(timeout=240_000)
        page.wait_for_function(
            "[...document.querySelectorAll('.jp-InputArea-prompt')].every("
            "e => !e.textContent.includes('*'))",
            timeout=300_000,
        )
        chart = page.locator("img.scalebio-weight-chart").first
        chart.scroll_into_view_if_needed()
        before_text, before_src = label.inner_text(), chart.get_attribute("src")
        before_png = chart.screenshot()
        page.screenshot(path=str(ARTIFACTS / "weight_viewer_before.png"), full_page=False)
        handle = page.locator(".widget-slider .noUi-handle").first
        handle.focus()
        handle.press("Home")  # step index 0
        page.wait_for_function(
            "([el, old]) => el.innerText !== old",
            arg=[label.element_handle(), before_text],
            timeout=60_000,
        )
        page.wait_for_timeout(1500)
        after_text, after_src = label.inner_text(), chart.get_attribute("src")
        after_png = chart.screenshot()
        chart.screenshot(path=str(ARTIFACTS / "weight_viewer.png"))
        browser.close()
    assert before_text.startswith("step ") and after_text.startswith("step 0 "), (
        before_text,
        after_text,
    )
    assert before_text != after_text
    assert before_src != after_src and before_png != after_png, "the chart did not redraw"

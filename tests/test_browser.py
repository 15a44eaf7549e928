"""A real browser (Debian's Chromium, driven by Playwright with executable_path) through the whole journey:
the link opened while the Slurm job is queued, the status page following it, JupyterLab arriving by itself,
a cell running. Screenshots of each stage go to tests/artifacts/."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from playwright import sync_api as playwright      # a missing test dependency fails the run, not skips it

from conftest import ROOT, Client, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed (tests/setup-system.sh)")


@pytest.fixture
def browser():
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--host-resolver-rules=MAP *.sat.test 127.0.0.1"])
        yield chromium
        chromium.close()


def current_step(page):
    return page.locator("li.now").inner_text(timeout=5000)


def test_browser_follows_a_queued_job_into_jupyterlab_and_runs_a_cell(browser, job_satellite, slurm, tmp_path):
    client = Client(tmp_path / "home", job_satellite, {"SLURM_CONF": str(slurm.conf)})
    blocker = subprocess.run(["sbatch", "--parsable", "--cpus-per-task", str(slurm.cpus), "--output", "/dev/null",
                              "--wrap", "sleep 300"], env=slurm.env(), capture_output=True, text=True, check=True)
    blocker_id = blocker.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: slurm.job_state(blocker_id) == "RUNNING", what="the blocker to run")
        result = client.launch_json("--jupyter", "lab", "--venv", str(ROOT / ".venv"), "--time-limit", "10",
                                    "--workdir", str(tmp_path))
        link = result["url"]
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.goto(link)
        # 1. queued: the status page, and it says so
        assert page.title() == "Starting your session"
        assert current_step(page) == "Job waiting in the queue"
        assert slurm.job_state(result["jobid"]) == "PENDING"
        page.screenshot(path=str(ARTIFACTS / "1-queued.png"))
        # 2. the job starts: the page follows without a reload by us
        subprocess.run(["scancel", blocker_id], env=slurm.env(), check=True)
        page.wait_for_function("() => !document.querySelector('li.now') || "
                               "document.querySelector('li.now').textContent !== 'Job waiting in the queue'",
                               timeout=60000)
        page.screenshot(path=str(ARTIFACTS / "2-starting.png"))
        # 3. JupyterLab replaces the status page by itself
        page.wait_for_selector(".jp-LauncherCard", timeout=90000)   # on the page we opened; we never reloaded it
        page.screenshot(path=str(ARTIFACTS / "3-jupyterlab.png"))
        # 4. a notebook, a cell, its output
        page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
        cell = page.locator(".jp-Notebook .jp-Cell .cm-content").first
        cell.wait_for(timeout=60000)
        # the kernel is connected (over the proxied WebSocket) once the status bar says Idle
        page.wait_for_function("() => document.querySelector('.jp-StatusBar-Widget') && "
                               "document.body.innerText.includes('| Idle')", timeout=60000)
        cell.click()
        page.keyboard.type("6*7")
        page.keyboard.press("Shift+Enter")
        output = page.locator(".jp-OutputArea-output").first
        try:
            output.wait_for(timeout=60000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failed-cell.png"))
            raise
        wait_for(lambda: output.inner_text().strip() == "42", timeout=60, what="the cell's output")
        page.screenshot(path=str(ARTIFACTS / "4-cell.png"))
        # 5. another browser, no token: 403, and nothing of the session shows
        stranger = browser.new_context(ignore_https_errors=True).new_page()
        response = stranger.goto(link.split("?")[0] + "lab")
        assert response.status == 403 and "needs its token" in stranger.content()
        stranger.screenshot(path=str(ARTIFACTS / "5-no-token.png"))
        context.close()
    finally:
        subprocess.run(["scancel", blocker_id], env=slurm.env())

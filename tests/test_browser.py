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


# Wraps the real Notification API (permission granted by the context): a notification is recorded
# only once the real constructor accepted it.
NOTIFICATION_SPY = """
window.__notes = [];
window.__polls = 0;
(function(){
  var realFetch = window.fetch;
  window.fetch = function(){ window.__polls++; return realFetch.apply(this, arguments); };
  var Real = window.Notification;
  if (!Real) return;
  function Spy(title, options){
    var n = new Real(title, options);
    window.__notes.push((options && options.body) || title);
    return n;
  }
  Object.defineProperty(Spy, 'permission', {get: function(){ return Real.permission; }});
  Spy.requestPermission = function(){ return Real.requestPermission(); };
  window.Notification = Spy;
})();
"""


def text_of(page, selector):
    return page.locator(selector).inner_text(timeout=5000)


def wait_for_text(page, selector, text, timeout=30000):
    page.wait_for_function("([s, t]) => { var e = document.querySelector(s); return e && e.innerText.includes(t); }",
                           arg=[selector, text], timeout=timeout)


def test_satellites_pages_in_every_state_with_notifications_the_notice_and_the_end(browser, satellite, new_app):
    """Queued, pending reason, starting, ready, ending soon (the notice before the app, the banner, a
    notification) and ended with its reason, each checked on what the page shows and saved as a PNG."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1000, "height": 700},
                                  permissions=["notifications"])
    context.add_init_script(NOTIFICATION_SPY)
    app = new_app()
    # A: queued -> a pending reason that never clears -> starting -> ready (the status page turns into the app)
    link = satellite.getlink()
    host = satellite.host(link["alias"])
    assert satellite.api("state", key=link["key"], state="queued", jobid="4242")[0] == 200
    page = context.new_page()
    page.goto(satellite.url(host, "/?token=" + link["token"]))
    assert page.title() == "Starting your session" and current_step(page) == "Job waiting in the queue"
    page.screenshot(path=str(ARTIFACTS / "status-1-queued.png"))
    assert satellite.api("jobstates", method="POST", jobstates="4242 PENDING PartitionTimeLimit")[0] == 200
    wait_for_text(page, "#msg", "will not start by itself")
    assert "PartitionTimeLimit" in text_of(page, "#msg") and "less time" in text_of(page, "#msg")
    page.screenshot(path=str(ARTIFACTS / "status-2-pending-reason.png"))
    watch = context.new_page()                                   # satellite's own session page, kept open
    watch.goto(satellite.url(host, "/__satellite/"))
    assert watch.title() == "Your session"
    assert satellite.api("state", key=link["key"], state="running")[0] == 200
    wait_for_text(page, "li.now", "Job running, starting the app")
    page.screenshot(path=str(ARTIFACTS / "status-3-starting.png"))
    assert satellite.api("redeem", source=app.host, key=link["key"], port=app.port)[0] == 200
    wait_for_text(page, "body", "Hello from the compute node")   # reloaded into the app by itself
    wait_for_text(watch, "#app", "Open your app")
    assert text_of(watch, "#left") == "Your session ends in 11 hours."      # the default 12 h
    watch.wait_for_function("() => window.__notes.includes('Your session is ready.')", timeout=30000)
    watch.screenshot(path=str(ARTIFACTS / "status-4-ready.png"))
    watch.close()

    # B: ten minutes left: the notice before the app (once), the banner, a notification, then the end
    link = satellite.getlink(lifetime="10m")
    host = satellite.host(link["alias"])
    assert satellite.api("redeem", source=app.host, key=link["key"], port=app.port)[0] == 200
    page.goto(satellite.url(host, "/?token=" + link["token"]))
    assert page.title() == "Your session ends soon"
    assert "ends in 9 minutes. Save your work now" in text_of(page, "body")
    page.screenshot(path=str(ARTIFACTS / "status-5-ending-notice.png"))
    page.click("#continue")
    wait_for_text(page, "body", "Hello from the compute node")
    page.goto(satellite.url(host, "/"))                          # shown once: now the app at once
    assert "Hello from the compute node" in text_of(page, "body")
    watch = context.new_page()
    watch.goto(satellite.url(host, "/__satellite/"))
    wait_for_text(watch, "#left.soon", "save your work now")
    watch.wait_for_function("() => window.__notes.some(n => n.startsWith('Your session ends in 9 minutes'))",
                            timeout=30000)
    watch.screenshot(path=str(ARTIFACTS / "status-6-ending-soon.png"))
    assert satellite.api("release", key=link["key"])[0] == 200
    watch.wait_for_function("() => document.title === 'Your session has ended'", timeout=30000)
    assert "gave the link back" in text_of(watch, "#msg") and not watch.locator("#left").is_visible()

    # C: the job ends while the status page waits for it (the bug: it polled on forever, still "starting")
    link = satellite.getlink()
    host = satellite.host(link["alias"])
    assert satellite.api("state", key=link["key"], state="running")[0] == 200
    page.goto(satellite.url(host, "/?token=" + link["token"]))
    assert current_step(page) == "Job running, starting the app"
    assert satellite.api("release", key=link["key"])[0] == 200
    page.wait_for_function("() => document.title === 'Your session has ended'", timeout=30000)
    assert text_of(page, "h1") == "Your session has ended" and "gave the link back" in text_of(page, "#msg")
    assert "starting" not in text_of(page, "body")
    page.screenshot(path=str(ARTIFACTS / "status-7-ended.png"))
    polls = page.evaluate("window.__polls")
    page.wait_for_timeout(3000)                                  # it polled every second; now it has stopped
    assert page.evaluate("window.__polls") == polls
    context.close()


def test_a_slurm_job_that_can_never_start_shows_its_reason_and_what_to_do(browser, satellite, slurm):
    """Real Slurm: a job asking for more time than its partition allows pends for ever (PartitionTimeLimit);
    squeue's own 'JOBID STATE REASON' lines, fed to satellite, put the reason and the advice on the page."""
    env = slurm.env()
    subprocess.run(["scontrol", "create", "PartitionName=short", "Nodes=localhost", "MaxTime=1"],
                   env=env, check=True)
    try:
        job = subprocess.run(["sbatch", "--parsable", "-p", "short", "--time", "10", "--output", "/dev/null",
                              "--wrap", "sleep 1"], env=env, capture_output=True, text=True, check=True)
        jobid = job.stdout.strip().split(";")[0]

        def feed():
            out = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], env=env, capture_output=True, text=True).stdout
            return out if f"{jobid} PENDING PartitionTimeLimit" in out else None
        lines = wait_for(feed, timeout=60, interval=0.5, what="Slurm to give the job's pending reason")
        link = satellite.getlink()
        assert satellite.api("state", key=link["key"], state="queued", jobid=jobid)[0] == 200
        assert satellite.api("jobstates", method="POST", jobstates=lines.replace("\n", "%0A"))[0] == 200
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1000, "height": 700})
        page = context.new_page()
        page.goto(satellite.url(satellite.host(link["alias"]), "/?token=" + link["token"]))
        assert current_step(page) == "Job waiting in the queue"
        assert text_of(page, "#msg") == (f"Job {jobid} will not start by itself (PartitionTimeLimit): the time "
                                         f"asked for is longer than the partition allows: cancel the job and ask "
                                         f"for less time, or another partition.")
        page.screenshot(path=str(ARTIFACTS / "status-2-slurm-partition-time-limit.png"))
        status = page.evaluate("fetch('/__satellite/status').then(r => r.json())")
        assert (status["jobstate"], status["pending_reason"]) == ("PENDING", "PartitionTimeLimit")
        context.close()
    finally:
        subprocess.run(["scancel", "-p", "short"], env=env)
        slurm.wait_until_empty()
        subprocess.run(["scontrol", "delete", "PartitionName=short"], env=env, check=True)

"""The scheduler's word ends a session, whichever client started it and however the word arrives:
a terminal job state in the /api/jobstates feed, SDSC's update-jobs.cgi, or refresh's jobstate-command;
a job a full snapshot no longer lists, after a grace period. The link then shows the ended page (410)
saying how the job ended, not a 502 for dead-after."""
import re
import subprocess
import time

import pytest

import satellite as sat
from conftest import LOGIN, NODE, ROOT, wait_for
from test_legacy import curl
from test_operations import admin, audit_lines


def proxied(satellite, app, jobid):
    link = satellite.mapped_session(app)
    assert satellite.api("state", key=link["key"], state="running", jobid=jobid)[0] == 200
    assert satellite.request(satellite.host(link["alias"]), "/?token=" + link["token"])[0] == 200
    return link


def ended_page(satellite, link):
    status, _, body = satellite.request(satellite.host(link["alias"]), "/?token=" + link["token"])
    return status, body.decode()


def feed(satellite, how, lines):
    if how == "api":
        status, fields = satellite.api("jobstates", method="POST", jobstates=lines.replace("\n", "%0A"))
        assert status == 200, fields
    elif how == "update-jobs.cgi":
        result = subprocess.run(["curl", "-s", "--cacert", str(satellite.certs / "ca.pem"), "--data-urlencode",
                                 f"jobstates={lines}", satellite.url(LOGIN, "/update-jobs.cgi")],
                                capture_output=True, text=True)
        assert result.stdout == "Success!\n"
    else:
        out = admin(satellite, "refresh", "--jobstate-command", f"printf '{lines}\\n'")
        assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("how", ["api", "update-jobs.cgi", "jobstate-command"])
def test_a_terminal_job_state_ends_the_session_at_once(fresh_satellite, new_app, how):
    satellite = fresh_satellite("--legacy-api", "--jobstates-from", "127.0.0.1/32", "--audit-log", "audit.log")
    app = new_app()
    link, other = proxied(satellite, app, "3"), proxied(satellite, app, "4")
    feed(satellite, how, "3 CANCELLED\n4 RUNNING")
    before = len(app.seen())                    # whoever listens on the freed port now gets nothing more
    status, body = ended_page(satellite, link)
    assert status == 410 and "your job cancelled" in body and len(app.seen()) == before
    assert satellite.api("status", key=link["key"])[1]["ended_because"] == "job cancelled"
    assert ended_page(satellite, other)[0] == 200                       # its job still runs
    assert [(e["event"], e["reason"]) for e in audit_lines(satellite) if e["event"] == "job_ended"] \
        == [("job_ended", "job cancelled")]


def test_galyleo_sees_D_as_soon_as_the_scheduler_says_the_job_is_gone(fresh_satellite, new_app):
    """SDSC's galyleo: getlink.cgi, linktoken.cgi with the job id, redeemtoken.cgi from the node; scancel
    (no trap, no destroytoken.cgi); the feed says CANCELLED: tokenjobstate.cgi answers the bare D."""
    satellite = fresh_satellite("--legacy-api", "--jobstates-from", "127.0.0.1/32")
    app = new_app(APP_TOKEN="jupyter-own-token")
    alias = curl(satellite, "/getlink.cgi")[1].splitlines()[1]
    assert curl(satellite, f"/linktoken.cgi?token={alias}&jobid=3") == (200, "Success!\n")
    assert curl(satellite, f"/redeemtoken.cgi?token={alias}&port={app.port}", source=NODE) == (200, "Success!\n")
    host = satellite.host(alias)
    assert satellite.request(host, "/?token=jupyter-own-token")[0] == 200
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "PR")
    feed(satellite, "update-jobs.cgi", "3 CANCELLED")
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "D")
    status, _, body = satellite.request(host, "/?token=jupyter-own-token")
    assert status == 410 and b"your job cancelled" in body


@pytest.mark.parametrize("state, phrase", [
    ("TIMEOUT", "job hit its time limit"), ("FAILED", "job failed"), ("COMPLETED", "job completed"),
    ("NODE_FAIL", "job's node failed"), ("PREEMPTED", "job preempted"), ("OUT_OF_MEMORY", "job ran out of memory"),
    ("BOOT_FAIL", "job failed"), ("DEADLINE", "job hit its deadline"), ("CA", "job cancelled"),
    ("TO", "job hit its time limit"), ("DONE", "job completed"), ("EXIT", "job failed"), ("C", "job completed"),
    ("REMOVED", "job cancelled"), ("dr", "job cancelled")])
def test_each_terminal_word_says_how_the_job_ended(state, phrase):
    session = sat.Session(alias="a", token_hash="", key_hash="", state="proxied", created=0, expires=1e12,
                          lifetime=1, issued_to="", jobid="7", target_host=None, target_port=None, redeemed=None,
                          ended=None, end_reason=None)
    states = sat.read_jobstates(f"7 {state}")
    assert sat.jobs_over([session], states, False, 60, 0) == [("a", phrase, state.upper())]


@pytest.mark.parametrize("state", ["RUNNING", "PENDING", "UNKNOWN", "COMPLETING", "SUSPENDED", "R", "qw", "E"])
def test_states_of_a_live_or_unknown_job_end_nothing(state):
    session = sat.Session(alias="a", token_hash="", key_hash="", state="proxied", created=0, expires=1e12,
                          lifetime=1, issued_to="", jobid="7", target_host=None, target_port=None, redeemed=None,
                          ended=None, end_reason=None, job_seen=0)
    assert sat.jobs_over([session], sat.read_jobstates(f"7 {state}"), True, 60, 1000) == []


def test_a_job_a_full_snapshot_no_longer_lists_ends_after_the_grace_period(fresh_satellite, new_app):
    satellite = fresh_satellite("--jobstates-from", "127.0.0.1/32", "--job-gone-after", "1s")
    app = new_app()
    seen, never_listed = proxied(satellite, app, "11"), proxied(satellite, app, "12")
    refresh = ["refresh", "--job-gone-after", "1s", "--jobstate-command"]
    assert admin(satellite, *refresh, "printf '11 RUNNING\\n'").returncode == 0
    # within the grace period, a snapshot without job 11 ends nothing
    assert admin(satellite, "refresh", "--job-gone-after", "1h", "--jobstate-command", "true").returncode == 0
    assert ended_page(satellite, seen)[0] == 200
    time.sleep(1.1)                                                     # the grace period, 1 s, passes
    # a partial feed (no snapshot=1) and a failed command (the controller is unreachable) end nothing
    assert satellite.api("jobstates", method="POST", jobstates="99 RUNNING")[1]["ended"] == "0"
    failed = admin(satellite, *refresh, "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; "
                                        "exit 1")
    assert failed.returncode == 0 and "0 sessions ended with their job" in failed.stdout
    assert ended_page(satellite, seen)[0] == 200
    # a full snapshot that does not list it: it has ended; a job never listed is left alone
    status, fields = satellite.api("jobstates", method="POST", jobstates="99 RUNNING", snapshot="1")
    assert status == 200 and fields["ended"] == "1"
    status, body = ended_page(satellite, seen)
    assert status == 410 and "no longer listed by the scheduler" in body
    assert ended_page(satellite, never_listed)[0] == 200
    assert satellite.api("jobstates", method="POST", jobstates="1 R", snapshot="maybe")[0] == 400


def test_an_app_that_stops_while_its_job_runs_says_so(fresh_satellite, new_app):
    satellite = fresh_satellite("--jobstates-from", "127.0.0.1/32")
    app = new_app()
    link = proxied(satellite, app, "21")
    satellite.api("jobstates", method="POST", jobstates="21 RUNNING")
    app.stop()
    status, body = ended_page(satellite, link)
    assert status == 502 and "stopped or is restarting" in body and "job 21 is still running" in body
    feed(satellite, "api", "21 TIMEOUT")
    status, body = ended_page(satellite, link)
    assert status == 410 and "your job hit its time limit" in body
    assert satellite.api("status", key=link["key"])[1]["ended_because"] == "job hit its time limit"


# with the real Slurm ---------------------------------------------------------------------------------

GALYLEO_STYLE_JOB = """#!/usr/bin/env bash
#SBATCH --job-name=galyleo-style
#SBATCH --time=00:10:00
#SBATCH --output={out}
# As SDSC's galyleo writes it: no trap, so scancel kills it before any destroytoken.cgi.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 {app} --host 127.0.0.1 --port "$port" &
until curl -s -o /dev/null "http://127.0.0.1:$port/"; do sleep 0.2; done
curl -s --cacert {ca} "{satellite}/redeemtoken.cgi?token={alias}&port=$port"
wait
curl -s --cacert {ca} "{satellite}/destroytoken.cgi?token={alias}"
"""


def test_a_galyleo_style_job_cancelled_with_scancel_shows_the_ended_page(fresh_satellite, slurm, tmp_path):
    """The real Slurm and the legacy API, as galyleo drives them; after scancel the next feed (refresh with
    jobstate-command, as contrib/satellite.cron runs it) ends the session: 410 saying so, tokenjobstate.cgi D."""
    satellite = fresh_satellite("--legacy-api", "--redeem-from", "127.0.0.0/8")
    alias = curl(satellite, "/getlink.cgi")[1].splitlines()[1]
    script = tmp_path / "galyleo.sh"
    script.write_text(GALYLEO_STYLE_JOB.format(out=tmp_path / "job.out", app=ROOT / "tests/apps/echo_app.py",
                                               ca=satellite.certs / "ca.pem", alias=alias,
                                               satellite=f"https://127.0.0.1:{satellite.port}"))
    jobid = subprocess.run(["sbatch", "--parsable", str(script)], env=slurm.env(), capture_output=True, text=True,
                           check=True).stdout.strip()
    try:
        assert curl(satellite, f"/linktoken.cgi?token={alias}&jobid={jobid}") == (200, "Success!\n")
        wait_for(lambda: curl(satellite, f"/tokenjobstate.cgi?token={alias}")[1] == "M", timeout=60,
                 what="the job to redeem its link")
        host = satellite.host(alias)
        assert satellite.request(host, "/")[0] == 200
    finally:
        subprocess.run(["scancel", jobid], env=slurm.env(), check=True)
    wait_for(lambda: slurm.job_state(jobid) == "CANCELLED", timeout=30, what="the job to be cancelled")
    assert satellite.request(host, "/")[0] == 502                       # before the feed: the app is gone
    example = re.search(r"^# jobstate-command = (.*)$", (ROOT / "contrib/satellite.ini").read_text(), re.M)[1]
    refresh = admin(satellite, "refresh", "--jobstate-command", f"SLURM_CONF={slurm.conf} {example}")
    assert "1 sessions ended with their job" in refresh.stdout, refresh.stdout + refresh.stderr
    status, _, body = satellite.request(host, "/")
    assert status == 410 and b"your job cancelled" in body
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "D")


def test_the_readmes_feed_line_posts_a_controllers_list(fresh_satellite, new_app):
    """Deployment step 7's curl line, fed a list on stdin as a controller's cron would."""
    satellite = fresh_satellite("--jobstates-from", "127.0.0.1/32")
    link = proxied(satellite, new_app(), "31")
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"\| (curl -sS --data-urlencode jobstates@-)\s+https://manage\.sat\.example\.edu(/api/jobstates)`",
                     readme)
    command = f"printf '31 CANCELLED\\n' | {line[1]} --cacert {satellite.certs}/ca.pem {satellite.url(LOGIN, line[2])}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert result.stdout == "jobs=1\nsessions=1\nended=1\n", result.stderr
    assert ended_page(satellite, link)[0] == 410


def test_a_local_user_on_the_proxy_node_cannot_feed_job_states_by_default(fresh_satellite, app):
    """The feed ends sessions, so by default no one may feed it: before, `admin-from` (loopback by default) let
    any local account (here the real user nobody, with curl) end another user's session by its public job id."""
    satellite = fresh_satellite()
    link = proxied(satellite, app, "987654")
    feed = subprocess.run(["runuser", "-u", "nobody", "--", "curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                           "--data-urlencode", "jobstates=987654 CANCELLED",
                           f"https://127.0.0.1:{satellite.port}/api/jobstates"],
                          capture_output=True, text=True, timeout=30)
    assert feed.stdout == "403", feed
    assert ended_page(satellite, link)[0] == 200


def test_a_job_state_pipeline_whose_scheduler_fails_ends_no_session(fresh_satellite, new_app):
    """`qstat ... | awk ...` with qstat failing exits 0 with nothing: not a snapshot (pipefail), nothing ends."""
    satellite = fresh_satellite("--job-gone-after", "1s")
    link = proxied(satellite, new_app(), "11")
    refresh = ["refresh", "--job-gone-after", "1s", "--jobstate-command"]
    assert admin(satellite, *refresh, "printf '11 r\\n'").returncode == 0
    time.sleep(1.1)
    qstat_down = ("{ echo 'error: commlib error: got select error (Connection refused)' >&2; exit 1; } "
                  "| awk 'NR > 2 {print $1, $5}'")
    admin(satellite, *refresh, qstat_down)
    assert ended_page(satellite, link)[0] == 200
    admin(satellite, *refresh, "echo 'warning: partial answer' >&2")          # a complaint: not a snapshot either
    assert ended_page(satellite, link)[0] == 200

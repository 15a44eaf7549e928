"""satellite-client against a real single-node Slurm and a real satellite."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websocket

from conftest import ECHO_APP, ROOT, Client, build_zipapps, json_body, wait_for
from test_jupyter import execute


@pytest.fixture
def client(tmp_path, job_satellite, slurm):
    return Client(tmp_path / "home", job_satellite, env={"SLURM_CONF": str(slurm.conf)})


def link_status(satellite, url):
    host = url.split("/")[2].split(":")[0]
    status, _, body = satellite.request(host, "/" + url.split("/", 3)[3])
    return status, body


def test_launch_wait_list_status_cancel(client, job_satellite, slurm):
    client.env["JUPYTER_TOKEN"] = "outer-token-of-the-jupyter-terminal-this-was-launched-from"
    result = client.launch_json("--command", ECHO_APP, "--time-limit", "10", "--wait")
    assert result["scheduler"] == "slurm" and result["state"] == "proxied" and result["jobid"].isdigit()
    assert set(result) >= {"alias", "url", "state", "scheduler", "jobid"} and "key" not in result
    status, body = link_status(job_satellite, result["url"])
    assert status == 200 and b"Hello from the compute node" in body
    assert slurm.job_state(result["jobid"]) == "RUNNING"

    # secrets: not in the script, not in what Slurm recorded of the job, not in logs
    session = client.session_dir(result["alias"])
    secrets = json.loads((session / "secrets").read_text())
    script = (session / "job.sh").read_text()
    assert "#SBATCH --time=00:10:00" in script and "#SBATCH --no-requeue" in script
    recorded = subprocess.run(["scontrol", "show", "job", result["jobid"]], env=slurm.env(),
                              capture_output=True, text=True).stdout
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for secret in (secrets["token"], secrets["key"]):
        for text in (script, recorded, ps, (session / "job.log").read_text(), job_satellite.log_text()):
            assert secret not in text
    assert (session / "secrets").stat().st_mode & 0o777 == 0o600
    assert session.stat().st_mode & 0o777 == 0o700
    # the job was submitted with a minimal environment: the launching shell's secrets are not in it
    agent = subprocess.run(["pgrep", "-f", f"agent {session} "], capture_output=True, text=True).stdout.split()
    assert agent and b"outer-token-of-the-jupyter" not in Path(f"/proc/{agent[0]}/environ").read_bytes()

    listed = json.loads(client.run("list", "--json", check=True).stdout)
    row = next(r for r in listed if r["alias"] == result["alias"])
    # the job's own time left (squeue %L), not the link's (which outlives the job by ten minutes)
    assert row["state"] == "proxied" and row["job"] == "running" and 500 < row["time_left"] <= 600
    text = client.run("list", check=True).stdout
    assert result["alias"] in text and result["url"] in text
    status_out = client.run("status", result["alias"], check=True).stdout
    assert "state=proxied" in status_out and f"jobid={result['jobid']}" in status_out

    assert client.run("cancel", result["alias"]).returncode == 0
    wait_for(lambda: slurm.job_state(result["jobid"]) in ("CANCELLED", None), timeout=30, what="job cancelled")
    assert link_status(job_satellite, result["url"])[0] == 410
    assert client.run("cancel", result["alias"]).returncode == 0            # again: nothing to do, no error
    assert "state=ended" in client.run("status", result["alias"]).stdout


@pytest.mark.parametrize("how, connect", [("installed", "direct"), ("symlink", "tunnel"), ("other name", "tunnel")])
def test_the_client_installed_as_the_readme_says_runs_its_jobs(tmp_path, job_satellite, slurm, how, connect):
    """The README's login-node install (install -m 0755 dist/satellite-client.pyz .../satellite-client),
    a symlink to it, and the archive under another name: each, run as a command, launches a Slurm job
    whose agent runs that same archive (tunnel: with the protocol from the satellite.py inside it)."""
    pyz = build_zipapps(tmp_path / "dist") / "satellite-client.pyz"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    installed = bin_dir / "satellite-client"
    subprocess.run(["install", "-m", "0755", str(pyz), str(installed)], check=True)
    command = installed
    if how == "symlink":
        command = tmp_path / "links" / "sat"
        command.parent.mkdir()
        command.symlink_to(installed)
    elif how == "other name":
        command = bin_dir / "satellite-client-0.1.0"
        installed.rename(command)
    client = Client(tmp_path / "home", job_satellite, command=[str(command)],
                    env={"SLURM_CONF": str(slurm.conf), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    result = client.launch_json("--command", ECHO_APP, "--connect", connect, "--time-limit", "10", "--wait")
    assert result["scheduler"] == "slurm" and result["state"] == "proxied"
    status, body = link_status(job_satellite, result["url"])
    assert status == 200 and b"Hello from the compute node" in body
    session = client.session_dir(result["alias"])
    script = (session / "job.sh").read_text()
    assert f" {command.resolve()} agent " in script                 # the archive itself, not a path inside it
    log = (session / "job.log").read_text()
    assert "satellite-agent: link ready" in log and "can't find '__main__'" not in log
    if connect == "tunnel":
        assert "tunnel to satellite connected" in log
        token = result["url"].split("token=")[1]
        assert job_satellite.api("status", token=token)[1]["target"].startswith("tunnel from ")
    assert client.run("cancel", result["alias"]).returncode == 0
    wait_for(lambda: link_status(job_satellite, result["url"])[0] == 410, timeout=30, what="the link to end")


def test_time_limit_releases_the_link(client, job_satellite, slurm):
    result = client.launch_json("--command", ECHO_APP, "--time-limit", "1", "--wait")
    assert link_status(job_satellite, result["url"])[0] == 200
    # Slurm signals the job at its limit; the agent releases the link on SIGTERM
    wait_for(lambda: link_status(job_satellite, result["url"])[0] == 410, timeout=180, interval=2,
             what="the link to end with the job's time limit")
    log = (client.session_dir(result["alias"]) / "job.log").read_text()
    assert re.search(r"got SIG(TERM|USR1)", log) and "link released" in log     # the limit, or its warning
    row = json.loads(client.run("status", result["alias"], "--json").stdout)
    assert row["job"] == "timeout" and "time limit" in row["end_reason"]        # not "done"


def test_failed_sbatch_releases_the_link_and_leaves_nothing(client, job_satellite):
    before = {row[0] for row in job_satellite.rows()}
    result = client.run("launch", "--command", ECHO_APP, "--partition", "no-such-partition")
    assert result.returncode == 1
    assert "sbatch failed" in result.stderr and "partition" in result.stderr.lower()
    assert client.sessions() == []
    new = [row for row in job_satellite.rows() if row[0] not in before]
    assert len(new) == 1 and new[0][3] == "ended"                     # issued, then released


def test_jupyterlab_through_slurm_runs_code_via_the_link(client, job_satellite, slurm):
    result = client.launch_json("--jupyter", "lab", "--venv", str(ROOT / ".venv"), "--time-limit", "10",
                                "--wait", timeout=300)
    token = result["url"].split("token=")[1]
    host = result["url"].split("/")[2].split(":")[0]
    status, _, body = job_satellite.request(host, "/lab?token=" + token)
    assert status == 200 and b"JupyterLab" in body
    auth = {"Authorization": "token " + token}
    status, _, body = job_satellite.request(host, "/api/kernels", "POST", headers=auth, body=b"{}")
    assert status == 201, body
    kernel = json_body(body)["id"]
    ws = websocket.create_connection(f"wss://{host}:{job_satellite.port}/api/kernels/{kernel}/channels",
                                     socket=job_satellite.tls_socket(host), timeout=60,
                                     header=[f"Authorization: token {token}"])
    assert execute(ws, "sum(range(10))") == "45"
    ws.close()
    assert client.run("cancel", result["alias"]).returncode == 0


def test_wait_shows_progress_while_the_job_queues(client, job_satellite, slurm):
    slurm.wait_until_empty()                   # jobs of earlier tests may still be completing
    blocker = subprocess.run(["sbatch", "--parsable", "--cpus-per-task", str(slurm.cpus), "--output", "/dev/null",
                              "--wrap", "sleep 300"], env=slurm.env(), capture_output=True, text=True, check=True)
    blocker_id = blocker.stdout.strip().split(";")[0]
    wait_for(lambda: slurm.job_state(blocker_id) == "RUNNING", timeout=60, what="the blocker to run")
    proc = subprocess.Popen([sys.executable, str(ROOT / "satellite_client.py"), "launch", "--command", ECHO_APP,
                             "--time-limit", "10", "--wait"], env=client.env, cwd=client.home,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("queued: waiting for the scheduler" in l for l in lines):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        jobid = re.search(r"Submitted slurm job (\d+)", "".join(lines)).group(1)
        time.sleep(3)
        assert slurm.job_state(jobid) == "PENDING"            # really queued behind the blocker
        # queued: the time it asked for (not the link's), and why it waits
        row = json.loads(client.run("list", "--json", check=True).stdout)[0]
        assert row["job"] == "pending" and row["time_left"] == 600, row
        wait_for(lambda: "(Resources)" in client.run("list").stdout, timeout=30, what="the pending reason")
        assert proc.poll() is None
        subprocess.run(["scancel", blocker_id], env=slurm.env(), check=True)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert re.search(r"\[\s*\d+s\] ready", out)
    finally:
        subprocess.run(["scancel", blocker_id], env=slurm.env())
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_link_is_released_before_slurm_kills_an_app_that_ignores_sigterm(client, job_satellite, slurm):
    """An app that ignores SIGTERM (a kernel busy in C code, a wedged server): the agent used to stop it
    first, for up to 10 s, and only then release; Slurm SIGKILLs KillWait (here 5 s) after its SIGTERM, so the
    release never went out and the link outlived the job. Now the job asks for a warning signal before its
    limit (--signal=B:USR1@30), and the agent releases first."""
    command = f"sh -c 'trap \"\" TERM; exec {ECHO_APP}'"
    result = client.launch_json("--command", command, "--time-limit", "2", "--wait")
    wait_for(lambda: link_status(job_satellite, result["url"])[0] == 410, timeout=150, interval=1,
             what="the link to be released as the job's time runs out")
    wait_for(lambda: slurm.job_state(result["jobid"]) not in ("RUNNING", "COMPLETING"), timeout=150, interval=1,
             what="the job to end")
    assert slurm.job_state(result["jobid"]) != "TIMEOUT", "the job ran into its limit: no warning before it"
    log = (client.session_dir(result["alias"]) / "job.log").read_text()
    assert "got SIGUSR1" in log and log.index("got SIGUSR1") < log.index("link released"), log   # the warning
    assert "#SBATCH --signal=B:USR1@30" in (client.session_dir(result["alias"]) / "job.sh").read_text()


def test_list_reports_a_failed_job_as_failed_with_the_agents_reason(client, job_satellite, slurm):
    """A job whose app dies: Slurm says FAILED (the agent exits 1), and `list` says failed, not done, and
    keeps the agent's reason (squeue -j alone prints nothing for a finished job)."""
    result = client.run("launch", "--command", "sh -c 'exit 3' {port}", "--time-limit", "5", "--wait")
    assert result.returncode == 1
    alias = client.sessions()[0]
    jobid = json.loads((client.session_dir(alias) / "session.json").read_text())["jobid"]
    wait_for(lambda: slurm.job_state(jobid) == "FAILED", timeout=60, what="the job to fail")
    assert client.run("list").stdout.count(alias) == 0                  # ended: not a live session
    row = next(r for r in json.loads(client.run("list", "--all", "--json", check=True).stdout) if r["alias"] == alias)
    assert row["job"] == "failed" and "could not be started" in row["end_reason"]
    token = json.loads((client.session_dir(alias) / "secrets").read_text())["token"]
    assert job_satellite.api("status", token=token)[1]["ended_because"] == \
        "released: the app could not be started; see the lines above"        # the agent's release carried it
    assert "failed" in client.run("list", "--all").stdout


def test_a_missing_app_is_explained_and_not_retried(client, job_satellite, slurm):
    client.env["PATH"] = "/usr/bin:/bin"                                # no jupyter there
    result = client.run("launch", "--jupyter", "lab", "--time-limit", "5", "--wait")
    assert result.returncode == 1
    assert "jupyter is not on PATH on the compute node" in result.stderr and "--venv" in result.stderr, result.stderr
    log = (client.session_dir(client.sessions()[0]) / "job.log").read_text()
    assert log.count("starting the app") == 1, log


def test_a_job_that_can_never_start_fails_fast_and_is_cancelled(client, job_satellite, slurm):
    """A partition whose MaxTime is shorter than the job's limit: Slurm keeps the job pending with reason
    PartitionTimeLimit for ever. --wait says so, cancels the job and releases the link."""
    subprocess.run(["scontrol", "create", "PartitionName=short", "Nodes=ALL", "MaxTime=1", "State=UP"],
                   env=slurm.env(), check=True)
    try:
        result = client.run("launch", "--partition", "short", "--command", ECHO_APP, "--time-limit", "5",
                            "--wait", timeout=90)
        assert result.returncode == 1
        assert "PartitionTimeLimit" in result.stderr and "--time-limit" in result.stderr, result.stderr
        info = json.loads((client.session_dir(client.sessions()[0]) / "session.json").read_text())
        assert f"cancelled job {info['jobid']}" in result.stderr
        wait_for(lambda: slurm.job_state(info["jobid"]) in ("CANCELLED", None), timeout=30, what="job cancelled")
        assert link_status(job_satellite, info["link"] + "/")[0] == 410
    finally:
        subprocess.run(["scontrol", "delete", "PartitionName=short"], env=slurm.env())

"""Real parts where they can be had on Debian: Lmod's `module load` inside a real Slurm job, and a real
Grid Engine (gridengine-master/-exec/-client) for launch -> link -> cancel -> ended page."""
import json
import re
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import ECHO_APP, ROOT, Client, wait_for
from test_client_slurm import link_status
from test_operations import admin

LMOD_INIT = "/usr/share/lmod/lmod/init/bash"


def lmod_environment(tree):
    """The environment of a login shell on a cluster with Lmod (its profile.d line) and a module tree in use."""
    out = subprocess.run(["bash", "-c", f"source {LMOD_INIT} && module use {tree} && env -0"],
                         capture_output=True, check=True).stdout.decode()
    return dict(entry.split("=", 1) for entry in out.split("\0") if "=" in entry)


def test_module_load_runs_under_real_lmod_in_a_slurm_job_and_the_app_sees_it(tmp_path, job_satellite, slurm):
    tree = tmp_path / "modules"
    (tree / "hello").mkdir(parents=True)
    (tree / "hello/1.0.lua").write_text('setenv("HELLO_MOD", "set by the hello/1.0 module")\n')
    shell = lmod_environment(tree)
    assert "BASH_FUNC_module%%" in shell and shell["MODULEPATH"] == str(tree)
    lmod = {k: v for k, v in shell.items() if k.startswith(("LMOD", "MODULE", "BASH_FUNC_module", "BASH_FUNC_ml"))}
    client = Client(tmp_path / "home", job_satellite, env={"SLURM_CONF": str(slurm.conf), **lmod})
    result = client.launch_json("--command", ECHO_APP, "--env-modules", "hello/1.0", "--time-limit", "5", "--wait")
    script = (client.session_dir(result["alias"]) / "job.sh").read_text()
    assert "module load hello/1.0" in script
    token = result["url"].split("token=", 1)[1]
    status, body = link_status(job_satellite, result["url"].split("?")[0] + f"env?name=HELLO_MOD&token={token}")
    assert (status, body) == (200, b"set by the hello/1.0 module")
    # a module Lmod does not know fails the job before the app starts: --wait says so
    failed = client.run("launch", "--command", ECHO_APP, "--env-modules", "no-such/9", "--time-limit", "5", "--wait")
    assert failed.returncode != 0 and "no-such/9" in failed.stdout + failed.stderr


# Grid Engine ------------------------------------------------------------------------------------------

SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
SGE_USER = "sgetest"            # Grid Engine refuses jobs from root (uid < min_uid): a test user submits


class GridEngine:
    """A real single-host Grid Engine 8.1.9 (Debian's gridengine-master/-exec/-client), with a 1 s scheduler
    tick instead of 15 s. Daemons and the user this fixture starts it also stops and removes."""

    def __init__(self):
        self.env = dict(os.environ, **SGE_ENV)
        self.started, self.made_user = [], False

    @staticmethod
    def available():
        return os.geteuid() == 0 and all(shutil.which(t) for t in ("qconf", "qsub", "qstat", "qdel")) \
            and Path("/usr/sbin/sge_qmaster").exists() and Path("/usr/sbin/sge_execd").exists()

    def qconf(self, *args, check=False):
        return subprocess.run(["qconf", *args], env=self.env, capture_output=True, text=True, check=check)

    def start(self, tmp):
        common = Path(SGE_ENV["SGE_ROOT"]) / SGE_ENV["SGE_CELL"] / "common"
        (common / "host_aliases").write_text(f"localhost {socket.gethostname()}\n")
        (common / "act_qmaster").write_text("localhost\n")
        if self.qconf("-sh").returncode != 0:
            subprocess.run(["/usr/sbin/sge_qmaster"], env=self.env, check=True)
            self.started.append("qmaster")
            wait_for(lambda: self.qconf("-sh").returncode == 0, timeout=30, what="sge_qmaster")
        self.qconf("-as", "localhost")                                   # a submit host (already one: fine)
        if subprocess.run(["pgrep", "-x", "sge_execd"], capture_output=True).returncode != 0:
            subprocess.run(["/usr/sbin/sge_execd"], env=self.env, check=True)
            self.started.append("execd")
        wait_for(lambda: "localhost" in self.qconf("-sel").stdout.split(), timeout=30, what="sge_execd")
        if self.qconf("-shgrp", "@allhosts").returncode != 0:
            (tmp / "hgrp").write_text("group_name @allhosts\nhostlist localhost\n")
            self.qconf("-Ahgrp", str(tmp / "hgrp"), check=True)
        if self.qconf("-sq", "all.q").returncode != 0:
            edits = {"qname": "all.q", "hostlist": "@allhosts", "slots": "2", "pe_list": "NONE",
                     "load_thresholds": "NONE", "notify": "00:00:05", "shell": "/bin/bash"}
            template = self.qconf("-sq", check=True).stdout.splitlines()
            (tmp / "queue").write_text("\n".join(f"{line.split()[0]} {edits[line.split()[0]]}"
                                                 if line.split() and line.split()[0] in edits else line
                                                 for line in template) + "\n")
            self.qconf("-Aq", str(tmp / "queue"), check=True)
        quick = {"schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1"}
        conf = self.qconf("-ssconf", check=True).stdout.splitlines()
        (tmp / "sconf").write_text("\n".join(f"{line.split()[0]} {quick[line.split()[0]]}"
                                             if line.split() and line.split()[0] in quick else line
                                             for line in conf) + "\n")
        self.qconf("-Msconf", str(tmp / "sconf"), check=True)
        if subprocess.run(["id", SGE_USER], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", SGE_USER], check=True)
            self.made_user = True

        def queue_up():
            out = subprocess.run(["qstat", "-f"], env=self.env, capture_output=True, text=True).stdout
            line = next((l for l in out.splitlines() if l.startswith("all.q@")), "")
            return line and len(line.split()) == 5                      # no state flags (u, a, d, E)
        wait_for(queue_up, timeout=60, interval=0.5, what="all.q@localhost to take jobs")
        return self

    def jobs(self):
        """'JOBID STATE' lines of every user's jobs: a full snapshot, as jobstate-command wants it."""
        out = subprocess.run(["qstat", "-u", "*"], env=self.env, capture_output=True, text=True, check=True).stdout
        return [(f[0], f[4]) for f in (line.split() for line in out.splitlines()[2:]) if len(f) > 4]

    def stop(self):
        if self.qconf("-sh").returncode == 0:
            subprocess.run(["qdel", "-u", SGE_USER], env=self.env, capture_output=True)
            wait_for(lambda: not self.jobs(), timeout=60, interval=0.5, what="Grid Engine jobs to leave")
        if "execd" in self.started:
            self.qconf("-ke", "localhost")
        if "qmaster" in self.started:
            self.qconf("-km")
        wait_for(lambda: all(subprocess.run(["pgrep", "-x", f"sge_{d}"], capture_output=True).returncode != 0
                             for d in self.started), timeout=30, what="Grid Engine daemons to stop")
        if self.made_user:
            subprocess.run(["userdel", "-r", SGE_USER], capture_output=True)


@pytest.fixture(scope="module")
def grid_engine(tmp_path_factory):
    if not GridEngine.available():
        if os.environ.get("CI"):
            raise AssertionError("CI must run the real Grid Engine: gridengine-* missing or not root")
        pytest.skip("real Grid Engine needs root and gridengine-master/-exec/-client (tests/setup-system.sh)")
    engine = GridEngine()
    try:
        engine.start(tmp_path_factory.mktemp("sge"))
        yield engine
    finally:
        engine.stop()


def as_sge_user(tmp_path, satellite):
    """satellite-client and what its job needs, where the test user can read them; a Client that runs as that
    user (runuser keeps the environment the Client gives it)."""
    shared = Path(f"/home/{SGE_USER}") / f"{tmp_path.name}-shared"          # removed with the user
    shared.mkdir()
    shared.chmod(0o755)
    for source in (ROOT / "satellite_client.py", ROOT / "satellite.py", ROOT / "tests/apps/echo_app.py",
                   satellite.certs / "ca.pem"):
        shutil.copy(source, shared / source.name)
        (shared / source.name).chmod(0o644)
    home = Path(f"/home/{SGE_USER}") / tmp_path.name
    home.mkdir()
    shutil.chown(home, SGE_USER, SGE_USER)
    client = Client(home, satellite, env={**SGE_ENV, "SATELLITE_CACERT": str(shared / "ca.pem")},
                    command=["runuser", "-p", "-u", SGE_USER, "--", "/usr/bin/python3",
                             str(shared / "satellite_client.py")])
    return client, f"/usr/bin/python3 {shared}/echo_app.py --host {{host}} --port {{port}}"


def test_grid_engine_launch_link_cancel_for_real(tmp_path, job_satellite, grid_engine):
    client, app = as_sge_user(tmp_path, job_satellite)
    result = client.launch_json("--scheduler", "sge", "--command", app, "--time-limit", "10", "--memory", "1",
                                "--wait")
    assert result["scheduler"] == "sge" and result["state"] == "proxied" and result["jobid"].isdigit()
    script = (client.session_dir(result["alias"]) / "job.sh").read_text()
    for directive in ("#$ -l h_rt=00:10:00", "#$ -l s_rt=00:09:00", "#$ -notify", "#$ -l h_vmem=1G", "#$ -r n"):
        assert directive in script                                      # what the real qsub took
    status, body = link_status(job_satellite, result["url"])
    assert status == 200 and b"Hello from the compute node" in body
    assert dict(grid_engine.jobs())[result["jobid"]] in ("r", "t")     # 't': transferring, for a moment
    listed = json.loads(client.run("list", "--json", check=True).stdout)
    assert next(r for r in listed if r["alias"] == result["alias"])["job"] == "running"
    assert client.run("cancel", result["alias"]).returncode == 0
    wait_for(lambda: result["jobid"] not in dict(grid_engine.jobs()), timeout=60, what="qdel to end the job")
    assert link_status(job_satellite, result["url"])[0] == 410


SGE_JOBSTATES = "qstat -u '*' | awk 'NR > 2 {print $1, $5}'"      # README: jobstate-command for Grid Engine


def test_grid_engine_qdel_of_a_job_with_no_trap_ends_its_session_at_the_next_refresh(tmp_path, fresh_satellite,
                                                                                     grid_engine):
    """A galyleo-style job (no trap, the legacy CGIs) under the real Grid Engine, deleted with qdel: Grid
    Engine's finished jobs leave qstat at once, so the full snapshot not listing it ends the session."""
    from test_jobs import GALYLEO_STYLE_JOB
    from test_legacy import curl
    satellite = fresh_satellite("--legacy-api", "--redeem-from", "127.0.0.0/8")
    client, _ = as_sge_user(tmp_path, satellite)
    shared = Path(client.env["SATELLITE_CACERT"]).parent
    alias = curl(satellite, "/getlink.cgi")[1].splitlines()[1]
    script = client.home / "galyleo.sh"
    script.write_text(GALYLEO_STYLE_JOB.format(out=client.home / "job.out", app=shared / "echo_app.py",
                                               ca=shared / "ca.pem", alias=alias,
                                               satellite=f"https://127.0.0.1:{satellite.port}"))
    submitted = subprocess.run(["runuser", "-p", "-u", SGE_USER, "--", "qsub", "-cwd", "-j", "y", "-o",
                                str(client.home / "job.out"), str(script)], env=grid_engine.env, cwd=client.home,
                               capture_output=True, text=True, check=True)
    jobid = submitted.stdout.split()[2]
    assert curl(satellite, f"/linktoken.cgi?token={alias}&jobid={jobid}") == (200, "Success!\n")
    wait_for(lambda: curl(satellite, f"/tokenjobstate.cgi?token={alias}")[1] == "M", timeout=60,
             what="the Grid Engine job to redeem its link")
    host = satellite.host(alias)
    assert satellite.request(host, "/")[0] == 200
    command = f"SGE_ROOT={SGE_ENV['SGE_ROOT']} SGE_CELL={SGE_ENV['SGE_CELL']} {SGE_JOBSTATES}"
    seen = admin(satellite, "refresh", "--jobstate-command", command)
    # listed: 'r', or still 't' (transferring) for a moment after the job has started
    assert "1 job states" in seen.stdout and re.search(r"^jobstate=[RT]$", admin(satellite, "show", alias).stdout,
                                                       re.M)
    subprocess.run(["qdel", jobid], env=grid_engine.env, check=True, capture_output=True)
    wait_for(lambda: jobid not in dict(grid_engine.jobs()), timeout=60, what="qdel to end the job")
    gone = admin(satellite, "refresh", "--job-gone-after", "0s", "--jobstate-command", command)
    assert "1 sessions ended with their job" in gone.stdout, gone.stdout + gone.stderr
    status, _, body = satellite.request(host, "/")
    assert status == 410 and b"no longer listed by the scheduler" in body
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "D")

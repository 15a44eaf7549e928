"""Real parts where they can be had on Debian: Lmod's `module load` inside a real Slurm job, and a real
Grid Engine (gridengine-master/-exec/-client) for launch -> link -> cancel -> ended page."""
import subprocess

from conftest import ECHO_APP, Client, wait_for
from test_client_slurm import link_status

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

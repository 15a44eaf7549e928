"""No process outlives the run (issue 21): the end-of-run check (conftest's leftover_processes) finds what a
run left, however it got there, and fails the run; stop_group and the agent's stop_process_group reach the
processes a wrapper or a relay started, and those that ignore SIGTERM."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid

import satellite_client
from conftest import (RUN_MARKER, ROOT, group_members, leftover_processes, read_process, start_group, stop_group,
                      wait_for)

NOBODY = ["runuser", "-u", "nobody", "--"]
IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
IGNORING_SIGTERM = ["sh", "-c", 'trap "" TERM; exec sleep 300']       # ignored from the start: exec keeps it


def orphan(command, env, cwd=None):
    """Start `command` (argv) through a shell that ends at once: the command is reparented, as a job's
    processes are once its parent ended, so it is no descendant of this process. Returns its pid."""
    shell = subprocess.run(["sh", "-c", '"$@" >/dev/null 2>&1 & echo $!', "sh", *command], env=env, cwd=cwd,
                           capture_output=True, text=True, check=True, timeout=10)
    return int(shell.stdout)


def running(pid):
    process = read_process(pid)
    return process is not None and process["state"] != "Z"


def ignores_sigterm(pid):
    with open(f"/proc/{pid}/status") as f:
        mask = next(line.split()[1] for line in f if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def kill(pid):
    """SIGKILL `pid` if it is still running, and wait until it is over."""
    if running(pid):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not running(pid), timeout=10, what=f"process {pid} to end")


def test_the_check_finds_an_orphan_that_ignores_sigterm_by_the_marker_it_inherited():
    marker = uuid.uuid4().hex
    pid = orphan(IGNORING_SIGTERM, dict(os.environ, **{RUN_MARKER: marker}))
    try:
        assert read_process(pid)["ppid"] != os.getpid()                # reparented: no descendant of ours
        wait_for(lambda: ignores_sigterm(pid), what="the trap")
        found = leftover_processes(marker)
        assert pid in found and found[pid]["user"] == "root"
        os.kill(pid, signal.SIGTERM)                                    # ignored: still left
        assert pid in leftover_processes(marker)
    finally:
        kill(pid)
    assert pid not in leftover_processes(marker)


def test_the_check_finds_a_job_that_lost_the_marker_by_its_directory(tmp_path):
    """A job gets a filtered environment (no marker): found by its working directory, and its child with it;
    a process of another run (another marker) in the same directory is not this run's."""
    marker = uuid.uuid4().hex
    job_env = {"PATH": os.environ["PATH"]}                              # as satellite-client's job_environment
    job = orphan(["sh", "-c", "sleep 300 & wait"], job_env, cwd=tmp_path)
    other = orphan(["sleep", "300"], dict(job_env, **{RUN_MARKER: "another-run"}), cwd=tmp_path)
    try:
        wait_for(lambda: [p for p, info in leftover_processes(marker, [tmp_path]).items()
                          if info["ppid"] == job], what="the job's child")
        found = leftover_processes(marker, [tmp_path])
        assert job in found and other not in found
        assert job not in leftover_processes(marker, [tmp_path / "elsewhere"])     # the path is what found it
    finally:
        for pid, info in leftover_processes(marker, [tmp_path]).items():
            if info["ppid"] == job:
                kill(pid)
        kill(job)
        kill(other)


LEAKY_TEST = textwrap.dedent("""
    import subprocess, sys

    def test_leaves_a_process():
        subprocess.run(["sh", "-c", '"$0" -c "$1" >/dev/null 2>&1 &', sys.executable, {code!r}], check=True)
""")


def test_a_run_that_leaves_a_process_fails_and_names_it(tmp_path):
    """The whole check, as a run ends: a passing test that leaves a process behind fails the run, which lists
    the process (pid, user, command line) and kills it."""
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST.format(code=IGNORES_SIGTERM))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), "-c", os.devnull, "--basetemp", str(tmp_path / "basetemp"),
                          str(tmp_path / "test_leaky.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "tests"), SATELLITE_LEFTOVER_GRACE="1"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 passed" in run.stdout, run.stdout
    line = re.search(r"LEFT RUNNING pid (\d+) user root cwd \S+: .*signal\.SIG_IGN", run.stdout)
    assert line, run.stdout
    pid = int(line.group(1))
    try:
        wait_for(lambda: not running(pid), timeout=10, what="the check to kill what was left")
    finally:
        kill(pid)


def test_stop_group_stops_the_command_behind_a_nobody_wrapper():
    """runuser forks the command and waits for it: killing runuser (all the squatter test used to do) leaves
    the command running as nobody. stop_group ends them both."""
    wrapper = start_group(NOBODY + ["/usr/bin/python3", "-c", IGNORES_SIGTERM])   # nobody may not enter .venv
    try:
        wait_for(lambda: len(group_members(wrapper.pid)) == 2, what="runuser's child")
        (command,) = set(group_members(wrapper.pid)) - {wrapper.pid}
        assert read_process(command)["user"] == "nobody"
        stop_group(wrapper, grace=1)
        assert not running(command)
    finally:
        if wrapper.returncode is None:
            wrapper.kill()
            wrapper.wait()
        for pid in group_members(wrapper.pid):
            kill(pid)


def test_the_agent_stops_an_app_that_ignores_sigterm_behind_its_private_network_relay(tmp_path):
    """The app in its private network namespace is a child of the relay (`netns-relay`), which leads the
    process group and ends at the group's SIGTERM at once. stop_process_group used to take the relay's end
    for the app's, and an app that ignores SIGTERM ran on after its job (left by the Slurm test of such an
    app). It waits for the whole group now, then SIGKILLs what is left."""
    assert satellite_client.private_network(), "unprivileged user namespaces are needed (tests/setup-system.sh)"
    app = f"sh -c 'trap \"\" TERM; exec {sys.executable} {ROOT}/tests/apps/echo_app.py --host {{host}} --port {{port}}'"
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                                 signal.SIGUSR1, signal.SIGUSR2)}
    stop = satellite_client.StopFlag()
    proc = members = None
    try:
        proc, where = satellite_client.start_app(app, "127.0.0.1", dict(os.environ), 30, stop)
        assert where.path, "the app is not behind the relay"
        members = group_members(proc.pid)
        assert len(members) == 2, members                    # the relay and the app
        satellite_client.stop_process_group(proc, grace=2)
        left = [pid for pid in members if running(pid)]
        assert not left, f"left running: {[read_process(pid)['cmdline'] for pid in left]}"
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for pid in members or ():
            kill(pid)
        if proc is not None and proc.returncode is None:
            proc.kill()
            proc.wait()

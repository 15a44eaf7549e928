"""`make demo` as a user runs it: the printed link answers with the app's page via curl, and the demo stopped
by a signal (Ctrl-C, timeout's SIGTERM, a closed terminal's SIGHUP) leaves nothing running."""
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, all_processes, kill_leftovers, names_a_path, wait_for

DEMO_WORK = ROOT / ".demo"


def test_demo_link_works():
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py")], check=True, capture_output=True)
    result = subprocess.run([sys.executable, str(ROOT / "contrib/demo.py"), "--check", "--port", "0",
                             "--queue-wait", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo works" in result.stdout
    assert "curl --cacert .demo/certs/ca.pem 'https://" in result.stdout


def demo_processes():
    """The demo's processes (satellite, the job's timeout and shell, agent, relay, app): each names the
    demo's work directory in its command line or runs in it."""
    return {pid: process for pid, process in all_processes().items()
            if process["state"] != "Z" and names_a_path(process, [DEMO_WORK])}


def link_answers(demo, output):
    """The link, once the demo printed it and the job's app answers through it (None before)."""
    assert demo.poll() is None, "the demo exited:\n" + output.read_text()
    printed = re.search(r"curl --cacert \S+ '(https://\S+)'", output.read_text())
    if not printed:
        return None
    page = subprocess.run(["curl", "-sS", "--cacert", str(DEMO_WORK / "certs/ca.pem"), printed.group(1)],
                          capture_output=True, text=True, timeout=30).stdout
    return printed.group(1) if "Hello from the compute node" in page else None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_stops_the_demo_as_ctrl_c_does(signum, tmp_path):
    """SIGTERM (timeout, a service manager) and SIGHUP (a closed terminal) used to end the demo at once: its
    job's agent, relay and app, and satellite, ran on. Now they cancel the job and stop satellite, as Ctrl-C
    does, and when the demo has exited none of its processes is left."""
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py")], check=True, capture_output=True)
    output = tmp_path / "demo.out"
    with open(output, "w") as out:
        demo = subprocess.Popen([sys.executable, str(ROOT / "contrib/demo.py"), "--port", "0", "--queue-wait", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                start_new_session=True)              # the signal reaches the demo alone
    try:
        wait_for(lambda: link_answers(demo, output), timeout=90, interval=0.2, what="the demo's app via its link")
        commands = " | ".join(process["cmdline"] for process in demo_processes().values())
        for part in (" agent ", "tests/apps/echo_app.py", "satellite.pyz serve"):
            assert part in commands, f"no {part.strip()} among the demo's processes: {commands}"
        demo.send_signal(signum)
        demo.wait(90)
        left = demo_processes()
        assert not left, "left running: " + "; ".join(f"{pid} {p['cmdline']}" for pid, p in left.items())
        assert demo.returncode == 0, output.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        kill_leftovers(demo_processes().values())

#!/usr/bin/env python3
"""make demo: satellite on this machine, and satellite-client launching an app as a "job".

Needs only python3, openssl and curl. Everything listens on loopback. The domain is
sat.localhost because browsers and curl resolve every *.localhost name to loopback.

    python3 contrib/demo.py [--port 8443] [--check]

--check fetches the link with curl once the job is up, and exits 0 if the app answered.
Ctrl-C, SIGTERM (timeout, a service manager) and SIGHUP (the terminal closed) stop it: the job is
cancelled and satellite stopped, and nothing of the demo is left running.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
DOMAIN = "sat.localhost"


def step(text):
    print(f"\n== {text}", flush=True)


def curl(*args):
    result = subprocess.run(["curl", "-sS", "--cacert", str(WORK / "certs/ca.pem"), *args],
                            capture_output=True, text=True, timeout=60)
    return result.stdout


def start_satellite(port):
    """satellite in a session of its own: Ctrl-C reaches the demo alone, which stops satellite last, once
    the job's agent has released the link through it."""
    log = open(WORK / "satellite.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "dist/satellite.pyz"), "serve", "--domain", DOMAIN,
                             "--listen", f"127.0.0.1:{port}", "--cert", str(WORK / "certs/cert.pem"),
                             "--key", str(WORK / "certs/key.pem"), "--db", str(WORK / "satellite.db")],
                            stdout=log, stderr=log, start_new_session=True)
    try:
        for _ in range(100):
            match = re.search(r"on 127\.0\.0\.1:(\d+)", (WORK / "satellite.log").read_text())
            if match:
                return proc, int(match.group(1))
            if proc.poll() is not None:
                sys.exit("satellite did not start:\n" + (WORK / "satellite.log").read_text())
            time.sleep(0.1)
        sys.exit("satellite did not start in time")
    except BaseException:                           # not started, or Ctrl-C meanwhile: stop it here
        proc.kill()
        proc.wait()
        raise


def interrupt(signum, _frame):
    raise KeyboardInterrupt


def stop_on_signals():
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does. By default they end this process at once, before it
    cancels the job and stops satellite: the job's agent, relay and app ran on for their hour."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def hold_signals():
    """While the demo stops, a second Ctrl-C, SIGTERM or SIGHUP must not cut that short (it is bounded)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)


def job_ended(session, timeout=45):
    """Wait until the session's local job has ended (its agent stops the app first): its id is PID@START, the
    process and its start time (/proc/PID/stat field 22). `timeout --kill-after=30` bounds it."""
    try:
        pid, start = json.loads((session / "session.json").read_text())["jobid"].split("@")
    except (OSError, ValueError, KeyError):
        return True                                 # never submitted
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return True
        if fields[0] == "Z" or fields[19] != start:
            return True
        time.sleep(0.1)
    return False


def stop_demo(satellite, env):
    """Cancel every job (the agent releases the link and stops the app), wait for them to end, stop satellite."""
    hold_signals()
    with contextlib.suppress(OSError):                  # the terminal may be gone (SIGHUP)
        print("\n   stopping the demo: cancelling the job, then stopping satellite", flush=True)
    sessions = sorted((WORK / "home/.satellite/sessions").glob("*"))
    for session in sessions:                                               # cancel the job, release the link
        subprocess.run([sys.executable, str(ROOT / "dist/satellite-client.pyz"), "cancel", session.name],
                       env=env, capture_output=True, timeout=60)
    for session in sessions:
        job_ended(session)
    satellite.terminate()
    try:
        satellite.wait(10)
    except subprocess.TimeoutExpired:
        satellite.kill()
        satellite.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8443")))
    parser.add_argument("--check", action="store_true", help="verify the link with curl and exit")
    parser.add_argument("--queue-wait", type=float, default=5.0, help="seconds before the job starts")
    args = parser.parse_args()
    stop_on_signals()
    for tool in ("openssl", "curl"):
        if not shutil.which(tool):
            sys.exit(f"the demo needs {tool}")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()

    step("A throwaway CA and a wildcard certificate for *." + DOMAIN)
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(WORK / "certs"), DOMAIN], check=True)
    print(f"   {WORK}/certs/ca.pem (trust it in curl with --cacert)")

    step("satellite serving on loopback")
    satellite, port = start_satellite(args.port)
    api = f"https://127.0.0.1:{port}"
    print(f"   log: {WORK}/satellite.log")
    env = dict(os.environ, HOME=str(WORK / "home"))             # sessions live in .demo/home/.satellite
    try:
        step("A user on the login node launches an app as a job (the 'local' scheduler runs it here)")
        command = (f"sh -c 'sleep {args.queue_wait:g}; APP_TOKEN=$SATELLITE_TOKEN exec {sys.executable} "
                   f"{ROOT}/tests/apps/echo_app.py --host {{host}} --port {{port}}'")
        launch = [sys.executable, str(ROOT / "dist/satellite-client.pyz"), "launch", "--scheduler", "local",
                  "--satellite", api, "--cacert", str(WORK / "certs/ca.pem"), "--command", command, "--quiet"]
        print("   $ satellite-client launch --scheduler local --satellite " + api +
              " --cacert .demo/certs/ca.pem \\\n       --command '<a small web app with {host} and {port}>'")
        result = subprocess.run(launch, env=env, capture_output=True, text=True, cwd=WORK)
        if result.returncode != 0:
            sys.exit(result.stderr)
        url = result.stdout.strip()

        step(f"Your link: the job starts its app after {args.queue_wait:g}s; open the link now to watch")
        print(f"   {url}\n")
        print("   with curl:")
        print(f"   curl --cacert .demo/certs/ca.pem '{url}'")
        print(f"   (the browser will warn about the demo CA unless you import {WORK}/certs/ca.pem)")
        print("   sessions: HOME=.demo/home ./dist/satellite-client.pyz list")
        if args.check:
            for _ in range(int(args.queue_wait * 10) + 300):
                if "Hello from the compute node" in curl(url):
                    print("\n   curl got the app's page through the link: demo works")
                    return 0
                time.sleep(0.1)
            print("the app never answered through the link", file=sys.stderr)
            return 1
        print("\n   Ctrl-C stops the demo.")
        satellite.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_demo(satellite, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())

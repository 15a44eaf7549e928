#!/usr/bin/env python3
"""make demo: satellite on this machine, and satellite-client launching an app as a "job".

Needs only python3, openssl and curl. Everything listens on loopback. The domain is
sat.localhost because browsers and curl resolve every *.localhost name to loopback.

    python3 contrib/demo.py [--port 8443] [--check]

--check fetches the link with curl once the job is up, and exits 0 if the app answered.
"""
import argparse
import os
import re
import shutil
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
    log = open(WORK / "satellite.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "dist/satellite.pyz"), "serve", "--domain", DOMAIN,
                             "--listen", f"127.0.0.1:{port}", "--cert", str(WORK / "certs/cert.pem"),
                             "--key", str(WORK / "certs/key.pem"), "--db", str(WORK / "satellite.db")],
                            stdout=log, stderr=log)
    for _ in range(100):
        match = re.search(r"on 127\.0\.0\.1:(\d+)", (WORK / "satellite.log").read_text())
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            sys.exit("satellite did not start:\n" + (WORK / "satellite.log").read_text())
        time.sleep(0.1)
    sys.exit("satellite did not start in time")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8443")))
    parser.add_argument("--check", action="store_true", help="verify the link with curl and exit")
    parser.add_argument("--queue-wait", type=float, default=5.0, help="seconds before the job starts")
    args = parser.parse_args()
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
        for session in (WORK / "home/.satellite/sessions").glob("*"):      # cancel the job, release the link
            subprocess.run([sys.executable, str(ROOT / "dist/satellite-client.pyz"), "cancel", session.name],
                           env=env, capture_output=True)
        satellite.terminate()
        satellite.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

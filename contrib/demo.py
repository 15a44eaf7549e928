#!/usr/bin/env python3
"""make demo: satellite on this machine, a link, and a "job" that redeems it.

Needs only python3, openssl and curl. Everything listens on loopback. The domain is
sat.localhost because browsers and curl resolve every *.localhost name to loopback.

    python3 contrib/demo.py [--port 8443] [--check]

--check fetches the link with curl once the job is up, and exits 0 if the app answered.
"""
import argparse
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


def start_job(api, key, token, delay):
    """The "batch job": after a queue wait, start the app with the token in its environment,
    wait until it listens, then redeem the key for the app's port."""
    script = f"""
sleep {delay}
exec 3< "$SATELLITE_KEY_FILE"; read -r key <&3
python3 "{ROOT}/tests/apps/echo_app.py" --host 127.0.0.1 > "{WORK}/app.port" &
while ! grep -q listening "{WORK}/app.port" 2>/dev/null; do sleep 0.1; done
port=$(awk '{{print $3}}' "{WORK}/app.port")
curl -sS --cacert "{WORK}/certs/ca.pem" -d "key=$key" -d "port=$port" "{api}/api/redeem" > "{WORK}/redeem.txt"
wait
"""
    key_file = WORK / "job.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    env = dict(os.environ, APP_TOKEN=token, SATELLITE_KEY_FILE=str(key_file))
    return subprocess.Popen(["sh", "-c", script], env=env, start_new_session=True)


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
    job = None
    try:
        step("The login node asks for a link")
        print(f"   $ curl --cacert .demo/certs/ca.pem {api}/api/getlink")
        fields = dict(line.split("=", 1) for line in curl(f"{api}/api/getlink").splitlines())
        print(f"   alias={fields['alias']}  (the reply also holds url=, token= and the job's key=)")

        step(f"The job is submitted; it starts in {args.queue_wait:.0f}s, starts its app, redeems its key")
        job = start_job(api, fields["key"], fields["token"], args.queue_wait)

        host = f"{fields['alias']}.{DOMAIN}:{port}"
        step("Your link (open it now: it shows the job's progress, then the app)")
        print(f"   {fields['url']}\n")
        print("   with curl:")
        print(f"   curl --cacert .demo/certs/ca.pem '{fields['url']}'")
        print(f"   (the browser will warn about the demo CA unless you import {WORK}/certs/ca.pem)")
        if args.check:
            for _ in range(int(args.queue_wait * 10) + 200):
                body = curl(fields["url"])
                if "Hello from the compute node" in body:
                    print(f"\n   curl got the app's page through https://{host}/ : demo works")
                    return 0
                time.sleep(0.1)
            print("the app never answered through the link", file=sys.stderr)
            return 1
        print("\n   Ctrl-C stops the demo.")
        satellite.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if job:
            os.killpg(job.pid, signal.SIGTERM)
        satellite.terminate()
        satellite.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

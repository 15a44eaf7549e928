"""Run by tests/test_workers_attacks.py inside `unshare -n` (a network namespace of its own, as root): satellite
with 2 workers on [::1], and a caller holding fd00:0:0:1::/64 who sends from 20 of its addresses (added to the
namespace's lo). Prints how many wrong tokens and unknown keys were checked from the /64 against a limit of 3;
exits 1 if more. Everything it starts is stopped before it exits; the namespace goes with it.

    unshare -n python3 tests/ipv6_budgets.py WORKDIR
"""
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "sat.test"
ADDRESSES = [f"fd00:0:0:1::{i:x}" for i in range(1, 21)]
FAILURES = 3


def ask(port, host, target, source, context, headers=""):
    raw = socket.create_connection(("::1", port), 10, (source, 0))
    with context.wrap_socket(raw, server_hostname=host.strip("[]")) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode())
        data = b""
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


def serving_port(log: Path, proc) -> int:
    for _ in range(400):
        found = re.search(r"serving .* on ::1:(\d+)", log.read_text())
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit("satellite did not start:\n" + log.read_text())


def main() -> int:
    work = Path(sys.argv[1])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in ADDRESSES:
        subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"], check=True)
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(work / "certs"), DOMAIN], check=True, capture_output=True)
    context = ssl.create_default_context(cafile=str(work / "certs/ca.pem"))
    log_path = work / "satellite.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "satellite.py"), "serve", "--domain", DOMAIN,
                                 "--workers", "2", "--listen", "[::1]:0", "--cert", str(work / "certs/cert.pem"),
                                 "--key", str(work / "certs/key.pem"), "--db", str(work / "satellite.db"),
                                 "--issue-from", "::1/128", "--token-failures", f"{FAILURES}/1m"],
                                stdout=log, stderr=log, cwd=work, start_new_session=True)
    try:
        port = serving_port(log_path, proc)
        status, body = ask(port, "[::1]", "/api/getlink", "::1", context)
        assert status == 201, body
        host = re.search(r"alias=(\S+)", body).group(1) + "." + DOMAIN
        checked = sum(ask(port, host, "/", address, context, "Authorization: token wrong\r\n")[0] == 403
                      for address in ADDRESSES for _ in range(FAILURES + 1))
        looked = sum(ask(port, "[::1]", f"/api/status?key=guess{n}x{i}", address, context)[0] == 404
                     for n, address in enumerate(ADDRESSES) for i in range(FAILURES + 1))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    print(f"wrong tokens checked from one /64: {checked} of {FAILURES}")
    print(f"unknown keys looked up from one /64: {looked} of {FAILURES}")
    return 0 if checked <= FAILURES and looked <= FAILURES else 1


if __name__ == "__main__":
    sys.exit(main())

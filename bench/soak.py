#!/usr/bin/env python3
"""Soak: steady mixed load through one satellite (HTTP downloads, WebSocket echoes, sessions issued,
redeemed, used and released) for SOAK_SECONDS (default 600), loopback only, every loop bounded.
Samples satellite's threads, file descriptors and RSS every 30 s; after a 60 s warm-up none may grow.

    make soak            (or: python3 bench/soak.py [--seconds 600])

Prints the samples and a verdict; exits 1 on any error or growth."""
import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import websocket  # noqa: E402
from conftest import ROOT, App, SatelliteServer  # noqa: E402


def sample(pid):
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        fields[key] = value.split()
    import os
    return {"threads": int(fields["Threads"][0]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_mb": int(fields["VmRSS"][0]) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    import os
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("SOAK_SECONDS", "600")))
    parser.add_argument("--warmup", type=int, default=60)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="satellite-soak-"))
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(work / "certs"), "sat.test"], check=True)
    satellite = SatelliteServer(work / "certs", work, ["--access-log", "off", "--redeem-from", "127.0.0.0/8",
                                                             "--max-connections-per-address", "0"]).start()
    app = App(work)
    deadline = time.monotonic() + args.seconds
    counts = {"http": 0, "ws": 0, "sessions": 0, "errors": 0}
    lock = threading.Lock()
    last_error = []

    def count(kind, ok=True, detail=""):
        with lock:
            counts[kind if ok else "errors"] += 1
            if not ok:
                last_error[:] = [detail]

    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    auth = {"Authorization": "token " + link["token"]}

    def http_worker():
        conn = satellite.connection(host)
        for _ in range(10_000_000):
            if time.monotonic() > deadline:
                return
            try:
                conn.request("GET", "/download?size=20000", headers=auth)
                resp = conn.getresponse()
                ok = resp.status == 200 and len(resp.read()) == 20000
                count("http", ok, f"http {resp.status}")
            except Exception as exc:                              # noqa: BLE001 - counted and reported
                count("http", False, repr(exc))
                conn = satellite.connection(host)
            time.sleep(0.005)

    def websocket_worker():
        ws = websocket.create_connection(f"wss://{host}:{satellite.port}/ws", socket=satellite.tls_socket(host),
                                         header=[f"Authorization: token {link['token']}"], timeout=30)
        for i in range(10_000_000):
            if time.monotonic() > deadline:
                ws.close()
                return
            try:
                ws.send(f"m{i}")
                count("ws", ws.recv() == f"m{i}", "ws echo mismatch")
            except Exception as exc:                              # noqa: BLE001
                count("ws", False, repr(exc))
                return
            time.sleep(0.02)

    def session_worker():
        for _ in range(10_000_000):
            if time.monotonic() > deadline:
                return
            try:
                new = satellite.mapped_session(app)
                ok = satellite.request(satellite.host(new["alias"]), "/?token=" + new["token"])[0] == 200
                ok = ok and satellite.api("release", key=new["key"])[0] == 200
                count("sessions", ok, "session cycle failed")
            except Exception as exc:                              # noqa: BLE001
                count("sessions", False, repr(exc))
            time.sleep(0.5)

    workers = [threading.Thread(target=w) for w in [http_worker] * 3 + [websocket_worker] * 2 + [session_worker]]
    for worker in workers:
        worker.start()
    samples = []
    started = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(min(30, max(0.1, deadline - time.monotonic())))
        samples.append((time.monotonic() - started, sample(satellite.proc.pid), dict(counts)))
    for worker in workers:
        worker.join()
    app.stop()
    satellite.stop()

    print(f"{'t (s)':>6} {'threads':>8} {'fds':>5} {'RSS MB':>7} {'http':>8} {'ws':>8} {'sessions':>8} {'errors':>6}")
    for t, s, c in samples:
        print(f"{t:6.0f} {s['threads']:8d} {s['fds']:5d} {s['rss_mb']:7.1f} {c['http']:8d} {c['ws']:8d} "
              f"{c['sessions']:8d} {c['errors']:6d}")
    warm = [s for t, s, _ in samples if t >= args.warmup] or [samples[-1][1]]
    first = warm[0]
    growth = {"threads": max(s["threads"] for s in warm) - first["threads"],
              "fds": max(s["fds"] for s in warm) - first["fds"],
              "rss_mb": max(s["rss_mb"] for s in warm) - first["rss_mb"]}
    print(f"after warm-up: threads +{growth['threads']}, fds +{growth['fds']}, RSS +{growth['rss_mb']:.1f} MB; "
          f"errors {counts['errors']}" + (f" (last: {last_error[0]})" if last_error else ""))
    ok = counts["errors"] == 0 and growth["threads"] <= 2 and growth["fds"] <= 4 and growth["rss_mb"] <= 8
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

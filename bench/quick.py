#!/usr/bin/env python3
"""Quick figures for the README: keep-alive request rate and latency through satellite,
against the same app reached directly, measured in the same run (loopback only).

    python3 bench/quick.py [--requests 3000] [--clients 1,8]

Not a test: nothing asserts on time. The full side-by-side benchmark is issue #6's `make bench`.
"""
import argparse
import http.client
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import App, LoopbackHTTPS, SatelliteServer, ROOT  # noqa: E402
import subprocess  # noqa: E402


def run_clients(make_conn, target, headers, clients, per_client):
    """Each client: one keep-alive connection, per_client requests; returns (req/s, latencies)."""
    latencies, lock = [], threading.Lock()

    def client():
        conn = make_conn()
        mine = []
        for _ in range(per_client):
            start = time.perf_counter()
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            resp.read()
            mine.append(time.perf_counter() - start)
        conn.close()
        with lock:
            latencies.extend(mine)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return clients * per_client / elapsed, latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", default="1,8")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="satellite-bench-"))
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(work / "certs"), "sat.test"], check=True)
    satellite = SatelliteServer(work / "certs", work, ["--access-log", "off"]).start()
    app = App(work)
    try:
        link = satellite.mapped_session(app)
        host = satellite.host(link["alias"])
        auth = {"Authorization": "token " + link["token"]}
        plain_ctx = ssl.create_default_context(cafile=str(work / "certs/ca.pem"))
        peers = {
            "direct (plain HTTP)": lambda: http.client.HTTPConnection(app.host, app.port, timeout=30),
            "satellite (HTTPS)": lambda: LoopbackHTTPS(host, satellite.port, plain_ctx),
        }
        print(f"{'clients':>7}  {'path':<22} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for clients in [int(c) for c in args.clients.split(",")]:
            rows = {}
            for round_ in range(2):                      # interleave, keep the second round
                for name, make in peers.items():
                    rows[name] = run_clients(make, "/headers", auth, clients, args.requests // clients)
            for name, (rate, lat) in rows.items():
                lat.sort()
                print(f"{clients:>7}  {name:<22} {rate:>8.0f} {statistics.median(lat) * 1e3:>8.2f} "
                      f"{lat[int(len(lat) * 0.99)] * 1e3:>8.2f}")
            direct, proxied = rows["direct (plain HTTP)"], rows["satellite (HTTPS)"]
            print(f"{clients:>7}  satellite/direct rate ratio {proxied[0] / direct[0]:.2f}, added p50 "
                  f"{(statistics.median(proxied[1]) - statistics.median(direct[1])) * 1e3:.2f} ms")
    finally:
        app.stop()
        satellite.stop()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Soak: a long day of a large centre through one satellite with its workers: SESSIONS sessions (default
10,000) issued, redeemed, used and ended, beside steady HTTP downloads and WebSocket echoes, loopback only,
every loop bounded (and the whole run by --seconds).

Every 10 s it pauses the load (each load thread finishes what it is doing and waits; their kept-alive
connections stay open), lets satellite close what ended, and samples each worker's and the supervisor's
RSS, threads and file descriptors, so a sample sees what satellite keeps, not what is in flight. From the
first sample after the warm-up (the first tenth of the sessions) to the last, no process may grow: RSS by
more than --rss-mb (4 MB), threads or descriptors at all. A worker that restarts (a new pid) fails too.

    make soak                      (or: python3 bench/soak.py [--workers 2] [--sessions 10000])

Prints a table per process and a verdict; exits 1 on any error, restart or growth."""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import websocket  # noqa: E402
from conftest import ROOT, App, SatelliteServer  # noqa: E402

SAMPLE_SECONDS = 10


class Pause:
    """Lets the sampler stop the load threads between their steps: `hold()` returns once all `threads` wait
    at a `step()`, `go()` lets them on."""

    def __init__(self, threads: int):
        self.threads, self.waiting, self.paused = threads, 0, False
        self.changed = threading.Condition()

    def step(self) -> None:
        with self.changed:
            if not self.paused:
                return
            self.waiting += 1
            self.changed.notify_all()
            self.changed.wait_for(lambda: not self.paused, timeout=60)
            self.waiting -= 1

    def hold(self) -> bool:
        with self.changed:
            self.paused = True
            return self.changed.wait_for(lambda: self.waiting == self.threads, timeout=60)

    def go(self) -> None:
        with self.changed:
            self.paused = False
            self.changed.notify_all()

    def leave(self) -> None:
        """A load thread that ends no longer counts."""
        with self.changed:
            self.threads -= 1
            self.changed.notify_all()


def sample(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return {"threads": int(fields["Threads"][0]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_mb": int(fields["VmRSS"][0]) / 1024}


def worker_pids(supervisor: int) -> list:
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as children:
        return sorted(int(pid) for pid in children.read().split())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="satellite's workers (default 2)")
    parser.add_argument("--sessions", type=int, default=int(os.environ.get("SOAK_SESSIONS", "10000")),
                        help="sessions to issue, use and end (default 10000, or SOAK_SESSIONS)")
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("SOAK_SECONDS", "1800")),
                        help="stop here even if not all sessions are done (default 1800, or SOAK_SECONDS)")
    parser.add_argument("--rss-mb", type=float, default=4.0, help="RSS growth allowed per process (default 4)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="satellite-soak-"))
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(work / "certs"), "sat.test"], check=True,
                   capture_output=True)
    satellite = SatelliteServer(work / "certs", work, ["--workers", str(args.workers), "--access-log", "off",
                                                       "--redeem-from", "127.0.0.0/8",
                                                       "--max-connections-per-address", "0"]).start()
    app = App(work)
    deadline = time.monotonic() + args.seconds
    counts = {"http": 0, "ws": 0, "sessions": 0, "errors": 0}
    lock = threading.Lock()
    last_error = []
    done = threading.Event()

    def count(kind, ok=True, detail=""):
        with lock:
            counts[kind if ok else "errors"] += 1
            if not ok:
                last_error[:] = [detail]
            if counts["sessions"] >= args.sessions:
                done.set()

    def over() -> bool:
        return done.is_set() or time.monotonic() > deadline

    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    auth = {"Authorization": "token " + link["token"]}

    def http_load():
        conn = satellite.connection(host)
        for _ in range(10_000_000):
            pause.step()
            if over():
                return
            try:
                conn.request("GET", "/download?size=20000", headers=auth)
                resp = conn.getresponse()
                count("http", resp.status == 200 and len(resp.read()) == 20000, f"http {resp.status}")
            except Exception as exc:                              # noqa: BLE001 - counted and reported
                count("http", False, repr(exc))
                conn = satellite.connection(host)
            time.sleep(0.02)

    def websocket_load():
        ws = websocket.create_connection(f"wss://{host}:{satellite.port}/ws", socket=satellite.tls_socket(host),
                                         header=[f"Authorization: token {link['token']}"], timeout=30)
        for i in range(10_000_000):
            pause.step()
            if over():
                ws.close()
                return
            try:
                ws.send(f"m{i}")
                count("ws", ws.recv() == f"m{i}", "ws echo mismatch")
            except Exception as exc:                              # noqa: BLE001
                count("ws", False, repr(exc))
                return
            time.sleep(0.05)

    def session_cycles():
        for _ in range(10_000_000):
            pause.step()
            if over():
                return
            try:
                new = satellite.mapped_session(app)
                ok = satellite.request(satellite.host(new["alias"]), "/?token=" + new["token"])[0] == 200
                ok = ok and satellite.api("release", key=new["key"])[0] == 200
                count("sessions", ok, "session cycle failed")
            except Exception as exc:                              # noqa: BLE001
                count("sessions", False, repr(exc))

    def leaving(work):
        def run():
            try:
                work()
            finally:
                pause.leave()
        return run

    kinds = [http_load] * 2 + [websocket_load] * 2 + [session_cycles] * 4
    pause = Pause(len(kinds))
    load = [threading.Thread(target=leaving(w)) for w in kinds]
    for thread in load:
        thread.start()
    workers = worker_pids(satellite.proc.pid)
    processes = {"supervisor": satellite.proc.pid, **{f"worker {i + 1}": pid for i, pid in enumerate(workers)}}
    samples, restarted = [], []
    started = time.monotonic()
    try:
        while samples[-1:] == [] or not over():
            done.wait(min(SAMPLE_SECONDS, max(0.1, deadline - time.monotonic())))
            now_workers = worker_pids(satellite.proc.pid)
            if now_workers != workers:
                restarted.append((workers, now_workers))
                break
            pause.hold()
            time.sleep(1)                    # satellite closes what the paused threads ended
            samples.append((time.monotonic() - started, {name: sample(pid) for name, pid in processes.items()},
                            dict(counts)))
            pause.go()
    finally:
        done.set()
        pause.go()
        for thread in load:
            thread.join()
        app.stop()
        satellite.stop()
    return report(args, samples, counts, last_error, restarted)


def report(args, samples, counts, last_error, restarted) -> int:
    print(f"soak: {counts['sessions']} sessions, {counts['http']} downloads, {counts['ws']} echoes, "
          f"{counts['errors']} errors" + (f" (last: {last_error[0]})" if last_error else ""))
    warm = [(t, s, c) for t, s, c in samples if c["sessions"] >= args.sessions // 10] or samples[-1:]
    ok = counts["errors"] == 0 and not restarted and counts["sessions"] >= args.sessions
    if restarted:
        print(f"a worker restarted: {restarted[0][0]} -> {restarted[0][1]}")
    if counts["sessions"] < args.sessions:
        print(f"only {counts['sessions']} of {args.sessions} sessions in {args.seconds} s")
    for name in samples[0][1] if samples else ():
        print(f"\n{name}:\n{'t (s)':>6} {'sessions':>8} {'threads':>8} {'fds':>5} {'RSS MB':>7}")
        for t, per_process, c in samples:
            s = per_process[name]
            print(f"{t:6.0f} {c['sessions']:8d} {s['threads']:8d} {s['fds']:5d} {s['rss_mb']:7.1f}")
        first, last = warm[0][1][name], warm[-1][1][name]
        growth = {key: last[key] - first[key] for key in ("threads", "fds", "rss_mb")}
        peak = max(s[name]["rss_mb"] for _, s, _ in warm)
        fine = growth["threads"] <= 0 and growth["fds"] <= 0 and growth["rss_mb"] <= args.rss_mb
        print(f"{name}: from warm-up ({warm[0][2]['sessions']} sessions) to the end ({warm[-1][2]['sessions']}): "
              f"RSS {first['rss_mb']:.1f} -> {last['rss_mb']:.1f} MB ({growth['rss_mb']:+.1f}, peak {peak:.1f}), "
              f"threads {growth['threads']:+d}, fds {growth['fds']:+d}: {'flat' if fine else 'GROWS'}")
        ok = ok and fine
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

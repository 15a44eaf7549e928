#!/usr/bin/env python3
"""make bench, third part: how satellite's workers share the load, and what counting the limits once for all
of them (shared memory under a lock held across processes) costs.

Spread, for N workers (default 2 and 4): 1,000 short connections (one request each, then closed; 8 clients
at a time), then 200 long-lived ones (all open at once, 5 requests each), counted per worker from the
access log (each line names the worker's pid). No limit is near: --max-connections 2000, no per-address cap.

Cost, one worker, in one run: satellite as shipped against a stand-in (bench/unshared.py: the same code
with its limits counted under a thread lock only, as one process could) on the two paths that count:
a new TLS connection per request (wrk with `Connection: close`: every connection admitted and released)
and wrong tokens on keep-alive connections (each one recorded); interleaved rounds, medians. And each
operation alone (timeit): admit + release of a connection, the check and record of a wrong token.

    python3 bench/workers.py [--workers 2,4] [--seconds 5] [--rounds 3] [--smoke]

Results go to stdout and bench/results-workers.md. Numbers, not verdicts: nothing here asserts on time."""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from bench import machine_and_command, wrk  # noqa: E402
from conftest import App, SatelliteServer  # noqa: E402

import satellite as satellite_module  # noqa: E402

PID = re.compile(r" pid=(\d+)$")
CLIENTS = 8


class Unshared(SatelliteServer):
    """satellite run through bench/unshared.py: its limits counted by one process alone (the stand-in)."""

    def command(self):
        command = super().command()
        command[1] = str(ROOT / "bench/unshared.py")
        return command


def start(kind, work, workers, *extra):
    work.mkdir(parents=True, exist_ok=True)
    return kind(work.parent / "certs", work, ["--workers", str(workers), "--access-log", str(work / "access.log"),
                                              "--redeem-from", "127.0.0.0/8", "--max-connections", "2000",
                                              "--max-connections-per-address", "0", *extra]).start()


def served_by(server, since: int) -> Counter:
    """Requests per worker pid in the access log after byte `since`."""
    text = (server.workdir / "access.log").read_text()[since:]
    return Counter(int(m.group(1)) for m in map(PID.search, text.splitlines()) if m)


def access_size(server) -> int:
    return (server.workdir / "access.log").stat().st_size


def settled(server, since: int, expected: int) -> Counter:
    """The access lines of `expected` requests, once all are written (bounded wait)."""
    for _ in range(200):
        counts = served_by(server, since)
        if sum(counts.values()) >= expected:
            return counts
        time.sleep(0.05)
    raise RuntimeError(f"only {sum(counts.values())} of {expected} requests logged")


def in_clients(total: int, work) -> None:
    """`work(i)` for i in range(total), CLIENTS at a time; the first error is raised."""
    errors = []

    def client(start):
        try:
            for i in range(start, total, CLIENTS):
                work(i)
        except Exception as exc:                                  # noqa: BLE001 - raised below
            errors.append(exc)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def short_connections(server, count: int) -> Counter:
    since = access_size(server)

    def one(_):
        conn = server.connection("127.0.0.1")
        conn.request("GET", "/healthz", headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.status != 200:
            raise RuntimeError(f"short connection answered {response.status}")
    in_clients(count, one)
    return settled(server, since, count)


def long_connections(server, count: int, requests: int) -> tuple:
    """Connections all open at once: (which worker holds each, requests served per worker)."""
    since = access_size(server)
    conns = [None] * count

    def first(i):
        conns[i] = server.connection("127.0.0.1")
        conns[i].request("GET", "/healthz")
        response = conns[i].getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"long connection answered {response.status}")
    try:
        in_clients(count, first)
        held = settled(server, since, count)
        since = access_size(server)

        def more(i):
            for _ in range(requests - 1):
                conns[i].request("GET", "/healthz")
                conns[i].getresponse().read()
        in_clients(count, more)
        served = settled(server, since, count * (requests - 1)) + held
    finally:
        for conn in conns:
            if conn is not None:
                conn.close()
    return held, served


def spread(work: Path, workers: int, short: int, long: int) -> dict:
    server = start(SatelliteServer, work / f"spread{workers}", workers)
    try:
        return {"short": short_connections(server, short), "long": long_connections(server, long, 5)}
    finally:
        server.stop()


def operation_costs(number: int) -> dict:
    """Microseconds per operation: the shared counting as shipped vs the same under a thread lock only."""
    settings = satellite_module.Settings()
    settings.max_connections, settings.max_connections_per_address = 2000, 50
    settings.token_failures = (1_000_000, 3600)
    shared = satellite_module.Limits(settings, 2)
    sys.path.insert(0, str(ROOT / "bench"))
    from unshared import ThreadLock
    unshared = satellite_module.Limits(settings, 2)
    for limiter in (unshared.connections, unshared.token_failures):
        limiter.lock = ThreadLock()
    costs = {}
    for name, limits in (("shared", shared), ("unshared", unshared)):
        connections, failures = limits.connections, limits.token_failures

        def connection():
            connections.admit("10.1.2.3", 1)
            connections.release("10.1.2.3", 1)

        def wrong_token():
            failures.retry_after(("10.1.2.3", "alias"))
            failures.record(("10.1.2.3", "alias"))
        costs[name] = {"connection": min(timeit.repeat(connection, number=number, repeat=5)) / number * 1e6,
                       "wrong_token": min(timeit.repeat(wrong_token, number=number, repeat=5)) / number * 1e6}
    return costs


def end_to_end_cost(work: Path, seconds: float, rounds: int, concurrency: int) -> dict:
    """req/s of new connections and of wrong tokens, satellite vs the unshared stand-in, one worker each."""
    servers = {"shared": start(SatelliteServer, work / "shared", 1, "--token-failures", "1000000/1h"),
               "unshared": start(Unshared, work / "unshared", 1, "--token-failures", "1000000/1h")}
    app = App(work)
    try:
        hosts = {}
        for name, server in servers.items():
            link = server.mapped_session(app)
            hosts[name] = server.host(link["alias"])
        runs = {(name, path): [] for name in servers for path in ("connection", "wrong_token")}
        for _ in range(rounds):
            for name, server in servers.items():
                runs[(name, "connection")].append(
                    wrk(server.port, concurrency, seconds, ["Host: 127.0.0.1", "Connection: close"], "/healthz")["rate"])
                runs[(name, "wrong_token")].append(
                    wrk(server.port, concurrency, seconds, [f"Host: {hosts[name]}", "Authorization: token wrong"])["rate"])
    finally:
        app.stop()
        for server in servers.values():
            server.stop()
    return {key: statistics.median(rates) for key, rates in runs.items()}


def render(spreads: dict, costs: dict, rates: dict, short: int, long: int, args) -> str:
    command = f"{machine_and_command('bench/workers.py', args)} --workers {args.workers}"
    lines = [f"Workers: the spread of connections and the cost of counting the limits once for all workers. "
             f"{command}{' --smoke' if args.smoke else ''}", "",
             f"| workers | {short:,} short connections: requests per worker | {long:,} long-lived: connections "
             f"per worker | their {long * 5:,} requests per worker |", "|---:|---|---|---|"]
    for n, found in spreads.items():
        def per(counter):
            return " / ".join(str(count) for count in sorted(counter.values(), reverse=True)) + \
                (f" (only {len(counter)} of {n} workers)" if len(counter) < n else "")
        lines.append(f"| {n} | {per(found['short'])} | {per(found['long'][0])} | {per(found['long'][1])} |")
    lines += ["", "| shared counting, one worker | as shipped | thread lock only (stand-in) | ratio |",
              "|---|---:|---:|---:|"]
    for path, text in (("connection", f"new TLS connections per second (wrk -c {args.concurrency}, "
                                      "Connection: close)"),
                       ("wrong_token", f"wrong tokens per second (wrk -c {args.concurrency}, keep-alive)")):
        shared, unshared = rates[("shared", path)], rates[("unshared", path)]
        lines.append(f"| {text} | {shared:,.0f} | {unshared:,.0f} | {shared / unshared:.2f} |")
    for path, text in (("connection", "admit + release of a connection, µs (timeit)"),
                       ("wrong_token", "check + record of a wrong token, µs (timeit)")):
        shared, unshared = costs["shared"][path], costs["unshared"][path]
        lines.append(f"| {text} | {shared:.1f} | {unshared:.1f} | {shared / unshared:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="2,4", help="worker counts to measure the spread for (default 2,4)")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16, help="connections of wrk for the cost (default 16)")
    parser.add_argument("--smoke", action="store_true", help="N = 2, 100 short and 20 long connections, 1 s (CI)")
    parser.add_argument("--output", default=str(ROOT / "bench/results-workers.md"))
    args = parser.parse_args()
    short, long, number = 1000, 200, 20000
    if args.smoke:
        args.workers, args.seconds, args.rounds, short, long, number = "2", 1, 1, 100, 20, 1000
    work = Path(tempfile.mkdtemp(prefix="satellite-bench-workers-"))
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(work / "certs"), "sat.test"], check=True,
                   capture_output=True)
    spreads = {int(n): spread(work, int(n), short, long) for n in args.workers.split(",")}
    report = render(spreads, operation_costs(number), end_to_end_cost(work, args.seconds, args.rounds, args.concurrency),
                    short, long, args)
    print(report)
    if not args.smoke:
        Path(args.output).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""make bench, second part: nginx and HAProxy deciding at the front (a valid session cookie) vs satellite alone.

One run, one session, one backend: wrk's small keep-alive requests with the session's cookie, TLS on the
browser side, at several concurrencies, through

    satellite   satellite alone -> backend (it checks the cookie and proxies)
    nginx       contrib/nginx-satellite.conf -> backend (the cookie checked at the front; satellite not asked)
    haproxy     contrib/haproxy-satellite.cfg -> backend (likewise)

The backend is nginx returning a fixed 3-byte body over plain HTTP on a "compute node" address. Rounds are
interleaved; the table shows medians and ratios to satellite alone. Then, with `satellite export --watch`
running for each front: redeem -> the first answer the front gives by itself (median of 10), and for nginx
how many reloads that took. Results go to stdout and bench/results-front.md (bench/bench.py writes
bench/results.md). Loopback only; the fronts' configurations are contrib's, adapted as the tests do
(tests/fronts.py).

    python3 bench/front.py [--seconds 5] [--rounds 3] [--concurrency 16,64,256] [--smoke]

Numbers, not verdicts: nothing here asserts on time.
"""
import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from bench import free_port, machine_and_command, medians, wrk  # noqa: E402
from conftest import NODE, App, SatelliteServer, wait_for  # noqa: E402
from fronts import FRONT, start_haproxy, start_nginx, stop_front, write_front_secret  # noqa: E402

import satellite as satellite_module  # noqa: E402


def start_backend(work, port):
    """nginx on the compute node's address answering a fixed body: the floor no path goes under."""
    (work / "backend").mkdir()
    conf = work / "backend/nginx.conf"
    conf.write_text(f"""daemon off; worker_processes 1; pid {work}/backend/nginx.pid;
error_log {work}/backend/error.log;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {work}/backend; proxy_temp_path {work}/backend;
  fastcgi_temp_path {work}/backend; uwsgi_temp_path {work}/backend; scgi_temp_path {work}/backend;
  keepalive_requests 1000000;
  server {{ listen {NODE}:{port}; location / {{ return 200 "ok\\n"; }} }} }}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work / "backend")])
    wait_for(lambda: (work / "backend/nginx.pid").exists(), what="the backend")
    return proc


def session_cookie(satellite, alias, token):
    """The cookie satellite gives this link's browser (what a first visit with the token sets)."""
    key = satellite_module.read_cookie_key(str(satellite.db.with_suffix(".cookie-key")))
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    return f"__Host-satellite={satellite_module.cookie_value(key, alias, token_hash)}"


def answered_by_front(front, alias, cookie):
    status, _, body = front.request(alias, "/headers", {"Cookie": cookie})
    return status == 200 and "via" not in {k.lower() for k, _ in json.loads(body)["headers"]}


def redeem_to_front(satellite, front, app, count):
    """Seconds from a redeem to the first answer the front gives by itself (polling every 10 ms)."""
    times = []
    reloads_before = front.reload_count()
    for _ in range(count):
        link = satellite.getlink()
        cookie = session_cookie(satellite, link["alias"], link["token"])
        start = time.perf_counter()
        status, _ = satellite.api("redeem", source=app.host, key=link["key"], port=app.port)
        assert status == 200
        for _ in range(1000):                         # 10 s at most
            if answered_by_front(front, link["alias"], cookie):
                break
            time.sleep(0.01)
        else:
            raise RuntimeError(f"{front.kind}: the session did not reach the front within 10 s")
        times.append(time.perf_counter() - start)
    return statistics.median(times), front.reload_count() - reloads_before


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="16,64,256")
    parser.add_argument("--redeems", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="one short round at concurrency 16 (CI)")
    parser.add_argument("--output", default=str(ROOT / "bench/results-front.md"))
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.rounds, args.concurrency, args.redeems = 1, 1, "16", 3
    work = Path(tempfile.mkdtemp(prefix="satellite-bench-front-"))
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(work / "certs"), "sat.test"], check=True,
                   capture_output=True)
    certs = work / "certs"
    write_front_secret(work / "front-secret")
    backend_port = free_port()
    procs, fronts = [start_backend(work, backend_port)], []
    satellite = SatelliteServer(certs, work, ["--access-log", "off", "--trusted-fronts", f"{FRONT}/32",
                                              "--control-listen", "127.0.0.1:0", "--front-secret",
                                              str(work / "front-secret"), "--max-connections", "8192",
                                              "--getlink-rate", "0", "--max-live-per-source", "0",
                                              "--max-live-per-user", "0", "--max-connections-per-address", "0"])
    satellite.start()
    app = App(work)
    try:
        for kind, start in (("nginx", start_nginx), ("haproxy", start_haproxy)):
            (work / kind).mkdir()
            front = start(satellite, work / kind, certs)
            if kind == "nginx":                       # what a site runs: a plain reload, not the tests' waiting one
                front.reload_command = f"nginx -s reload -c {work / kind / 'nginx.conf'} -p {work / kind}"
            fronts.append(front.watch())
        link = satellite.getlink()
        status, _ = satellite.api("redeem", source=NODE, key=link["key"], port=backend_port)
        assert status == 200
        cookie = session_cookie(satellite, link["alias"], link["token"])
        host = f"{link['alias']}.sat.test"
        for front in fronts:
            wait_for(lambda: front.request(link["alias"], "/", {"Cookie": cookie})[0] == 200, what=front.kind)
        paths = {"satellite": satellite.port, **{front.kind: front.port for front in fronts}}
        levels = [int(c) for c in args.concurrency.split(",")]
        runs = {(name, c): [] for name in paths for c in levels}
        for _ in range(args.rounds):
            for c in levels:
                for name, port in paths.items():
                    runs[(name, c)].append(wrk(port, c, args.seconds, [f"Host: {host}:{port}", f"Cookie: {cookie}"]))
        redeems = {front.kind: redeem_to_front(satellite, front, app, args.redeems) for front in fronts}
        report = render(runs, paths, levels, redeems, args)
    finally:
        for front in fronts:
            stop_front(front)
        app.stop()
        satellite.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    print(report)
    if not args.smoke:
        Path(args.output).write_text(report)
    return 0


def render(runs, paths, levels, redeems, args):
    median = medians(runs)
    lines = [f"The front decides (a valid session cookie) vs satellite alone: small keep-alive requests with the "
             f"session's cookie, TLS to each path; wrk, {args.rounds} interleaved rounds of {args.seconds:g}s, "
             f"medians. nginx: a worker per CPU; HAProxy: a thread per CPU (its default). "
             f"{machine_and_command('bench/front.py', args)}", "",
             "| concurrency | path | req/s | p50 ms | p99 ms | errors | / satellite alone |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for c in levels:
        alone = median("satellite", c, "rate")
        for name in paths:
            errors = sum(r["errors"] for r in runs[(name, c)])
            rate = median(name, c, "rate")
            lines.append(f"| {c} | {name} | {rate:,.0f} | {median(name, c, 'p50'):.2f} | "
                         f"{median(name, c, 'p99'):.2f} | {errors} | {rate / alone:.2f} |")
    lines += ["", "| figure | value |", "|---|---:|"]
    for kind, (seconds, reloads) in redeems.items():
        extra = f", {reloads} reloads" if kind == "nginx" else ", no reload (runtime API)"
        lines.append(f"| redeem → first answer by the {kind} front (export --watch) | {seconds * 1000:.0f} ms "
                     f"(median of {args.redeems}{extra}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

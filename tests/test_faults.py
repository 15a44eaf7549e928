"""Faults: apps killed mid-transfer, clients vanishing, satellite killed during bursts of writes.
Each leaves no thread or file descriptor behind and loses nothing that was acknowledged."""
import os
import signal
import sqlite3
import ssl
import subprocess
import threading

import pytest
import websocket

from conftest import NODE, wait_for
from test_proxy import open_websocket


def threads_and_fds(pid):
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def leak_checked(fresh_satellite):
    """A satellite whose threads and descriptors must be back to their warm baseline after the test."""
    satellite = fresh_satellite()
    satellite.request("127.0.0.1", "/healthz")
    baseline = threads_and_fds(satellite.proc.pid)
    yield satellite

    def settled():
        threads, fds = threads_and_fds(satellite.proc.pid)
        return threads <= baseline[0] and fds <= baseline[1]
    try:
        wait_for(settled, timeout=30, interval=0.2, what="threads and descriptors to return to their baseline")
    except AssertionError:
        fd_dir = f"/proc/{satellite.proc.pid}/fd"
        open_now = sorted(os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir))
        raise AssertionError(f"baseline {baseline}, now {threads_and_fds(satellite.proc.pid)}: {open_now}")


def test_app_killed_mid_download(leak_checked, new_app):
    satellite, app = leak_checked, new_app()
    link = satellite.mapped_session(app)
    conn = satellite.connection(satellite.host(link["alias"]), timeout=20)
    conn.request("GET", "/download?size=2000000000", headers={"Authorization": "token " + link["token"]})
    resp = conn.getresponse()
    received = len(resp.read(1 << 20))
    assert received == 1 << 20
    app.proc.kill()
    try:                                            # the short body ends promptly: no hang until timeout
        while data := resp.read(1 << 20):           # b'': the connection ended short of its Content-Length
            received += len(data)
    except TimeoutError:                            # socket.timeout, ssl's "read operation timed out" too
        pytest.fail(f"the body did not end when the app was killed: the client waited out its 20 s timeout "
                    f"after {received} bytes")
    except (ConnectionError, ssl.SSLError):         # cut by a reset, or without TLS close_notify: ended too
        pass
    assert received < 2_000_000_000, "the whole body arrived although the app was killed"
    conn.close()


def test_app_killed_mid_upload(leak_checked, new_app):
    satellite, app = leak_checked, new_app()
    link = satellite.mapped_session(app)
    sock = satellite.tls_socket(satellite.host(link["alias"]))
    sock.settimeout(20)
    sock.sendall(f"POST /upload HTTP/1.1\r\nHost: {satellite.host(link['alias'])}:{satellite.port}\r\n"
                 f"Authorization: token {link['token']}\r\nContent-Length: 2000000000\r\n\r\n".encode())
    sock.sendall(b"x" * (4 << 20))
    app.proc.kill()
    answer = b""
    try:
        for _ in range(2000):                       # keep sending until satellite gives up on this upload
            sock.sendall(b"x" * (1 << 20))
    except OSError:
        pass
    try:
        answer = sock.recv(4096)
    except OSError:
        pass
    assert answer == b"" or answer.startswith(b"HTTP/1.1 502")
    sock.close()


def test_app_killed_mid_websocket(leak_checked, new_app):
    satellite, app = leak_checked, new_app()
    link = satellite.mapped_session(app)
    ws = open_websocket(satellite, link)
    ws.send("alive")
    assert ws.recv() == "alive"
    app.proc.kill()
    ws.settimeout(20)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        ws.recv()


def test_client_vanishing_mid_stream_closes_the_app_side(leak_checked, new_app):
    satellite, app = leak_checked, new_app()
    link = satellite.mapped_session(app)
    for target in ("/download?size=2000000000", "/events?n=1000"):
        sock = satellite.tls_socket(satellite.host(link["alias"]))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {satellite.host(link['alias'])}:{satellite.port}\r\n"
                     f"Authorization: token {link['token']}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()                                # gone mid-stream
    for _ in range(3):
        app.direct("/next")                         # the event stream writes again, into a closed path


def test_kill_9_during_bursts_loses_nothing_acknowledged(fresh_satellite, app):
    satellite = fresh_satellite()
    acknowledged, lock, stop = [], threading.Lock(), threading.Event()

    def burst():
        for _ in range(200):                        # bounded
            if stop.is_set():
                return
            try:
                status, link = satellite.api("getlink")
                if status != 201:
                    continue
                with lock:
                    acknowledged.append((link, None))
                status, _ = satellite.api("redeem", source=NODE, key=link["key"], port=app.port)
                if status == 200:
                    with lock:
                        acknowledged.append((link, "mapped"))
            except (OSError, ConnectionError, Exception):
                return
    workers = [threading.Thread(target=burst) for _ in range(4)]
    for worker in workers:
        worker.start()
    wait_for(lambda: len(acknowledged) >= 60, what="a burst under way")
    satellite.proc.send_signal(signal.SIGKILL)
    satellite.proc.wait()
    stop.set()
    for worker in workers:
        worker.join()
    with sqlite3.connect(satellite.db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    satellite.start()
    for link, state in acknowledged:
        status, fields = satellite.api("status", key=link["key"])
        assert status == 200, link["alias"]
        if state == "mapped":
            assert fields["state"] in ("mapped", "proxied") and fields["target"] == f"{NODE}:{app.port}"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB filesystem of our own (tmpfs) for the database, so it can really fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def fill(directory):
    """Fill the filesystem; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_disk_full_is_503_the_proxy_keeps_serving_and_it_recovers(certs, tiny_disk, app):
    from conftest import SatelliteServer
    satellite = SatelliteServer(certs, tiny_disk.parent, ["--db", str(tiny_disk / "satellite.db")]).start()
    try:
        link = satellite.mapped_session(app)
        host = satellite.host(link["alias"])
        assert satellite.request(host, "/?token=" + link["token"])[0] == 200
        filler = fill(tiny_disk)
        for _ in range(20):                                # until SQLite itself hits the full disk
            status, fields = satellite.api("getlink")
            if status == 503:
                break
        assert status == 503 and "database unavailable" in fields["error"]
        # existing mappings keep working, with their cookie and with the token
        _, headers, _ = satellite.request(host, "/?token=" + link["token"])
        assert satellite.request(host, "/headers", headers={"Authorization": "token " + link["token"]})[0] == 200
        status, fields = satellite.api("status", key=link["key"])        # a read may fail too: then a clear 503
        assert (status, fields.get("alias")) == (200, link["alias"]) or (status == 503 and "error" in fields)
        filler.unlink()
        assert satellite.api("getlink")[0] == 201          # recovered, no restart
        with sqlite3.connect(satellite.db) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        satellite.stop()

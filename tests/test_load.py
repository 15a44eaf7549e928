"""Load, on loopback, every loop bounded: slow clients cannot starve others; 1,000 WebSockets at once."""

import websocket

from conftest import DOMAIN, wait_for
from test_faults import threads_and_fds


# Here one loopback address stands for many clients, so its per-address connection cap is off
# (tests/test_exhaustion.py shows the cap itself).
MANY_CLIENTS = ("--max-connections-per-address", "0")


def test_500_slow_clients_do_not_stop_normal_requests(fresh_satellite):
    satellite = fresh_satellite("--header-timeout", "6", "--max-connections", "2000", *MANY_CLIENTS)
    baseline_threads, _ = threads_and_fds(satellite.proc.pid)
    slow = []
    for _ in range(500):
        sock = satellite.tls_socket(f"manage.{DOMAIN}")
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: manage.{DOMAIN}\r\n".encode())   # never finishes the head
        slow.append(sock)
    try:
        peak_threads, _ = threads_and_fds(satellite.proc.pid)
        assert peak_threads <= baseline_threads + 510               # one thread per connection, no more
        for i in range(20):                                          # normal requests are served meanwhile
            for sock in slow[i::20][:5]:
                sock.sendall(b"X-Slow: 1\r\n")                       # keep trickling
            status, _, body = satellite.request("127.0.0.1", "/healthz")
            assert (status, body) == (200, b"ok\n")
        # the header deadline ends them: 408 and closed
        sock = slow[0]
        sock.settimeout(15)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        wait_for(lambda: threads_and_fds(satellite.proc.pid)[0] <= baseline_threads + 2, timeout=30,
                 what="the slow clients' threads to end")
    finally:
        for sock in slow:
            sock.close()


def test_1000_concurrent_websockets_echo_and_none_is_dropped(fresh_satellite, new_app):
    satellite, app = fresh_satellite(*MANY_CLIENTS), new_app()
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    sockets = []
    try:
        for _ in range(1000):
            ws = websocket.create_connection(f"wss://{host}:{satellite.port}/ws", socket=satellite.tls_socket(host),
                                             header=[f"Authorization: token {link['token']}"], timeout=30)
            sockets.append(ws)
        for i, ws in enumerate(sockets):
            ws.send(f"message {i}")
        answers = [ws.recv() for ws in sockets]
        assert answers == [f"message {i}" for i in range(1000)]
        threads, fds = threads_and_fds(satellite.proc.pid)
        assert threads >= 1000 and fds >= 2000                       # really all open at once
        for i, ws in enumerate(sockets[::100]):                      # and still alive after the burst
            ws.send("again")
            assert ws.recv() == "again"
    finally:
        for ws in sockets:
            ws.close()


def test_slow_bodies_hold_only_their_own_threads(fresh_satellite, app):
    """Clients that send their request bodies byte by byte: others are served; satellite's threads
    are bounded by their connections (and --max-connections), and return when they go."""
    satellite = fresh_satellite("--max-connections", "300")
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    baseline_threads, _ = threads_and_fds(satellite.proc.pid)
    slow = []
    for i in range(100):
        target = ("/api/getlink", f"manage.{DOMAIN}") if i % 2 else ("/upload", host)
        sock = satellite.tls_socket(target[1])
        sock.sendall(f"POST {target[0]} HTTP/1.1\r\nHost: {target[1]}:{satellite.port}\r\n"
                     f"Authorization: token {link['token']}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     f"Content-Length: 1000\r\n\r\nx".encode())
        slow.append(sock)
    try:
        for _ in range(10):                                          # bounded trickle, others served meanwhile
            for sock in slow:
                sock.sendall(b"x")
            assert satellite.request(host, "/headers", headers={"Authorization": "token " + link["token"]})[0] == 200
        assert threads_and_fds(satellite.proc.pid)[0] <= baseline_threads + 101
    finally:
        for sock in slow:
            sock.close()
    wait_for(lambda: threads_and_fds(satellite.proc.pid)[0] <= baseline_threads + 2, timeout=30,
             what="the slow senders' threads to end")

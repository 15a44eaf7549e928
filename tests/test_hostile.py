"""Hostile requests over real TLS: each is refused with its status, the connection is closed,
nothing reaches the app, and the database does not change. The corpus is data:
tests/corpus/hostile_requests.json ({host} and {token} are filled in with a live session's; the
"manage:" twins aim the same bytes at the management API's /api/getlink, so an accepted one would
issue a link and change the database)."""
import json
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import wait_for

CORPUS = json.loads((Path(__file__).parent / "corpus/hostile_requests.json").read_text())


def exchange(satellite, host, raw):
    """Send raw bytes; return (status line, whether the server closed the connection)."""
    sock = satellite.tls_socket(host)
    sock.settimeout(10)
    try:
        sock.sendall(raw)
    except OSError:
        pass
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return received.split(b"\r\n", 1)[0], True
            received += data
    except socket.timeout:
        return received.split(b"\r\n", 1)[0], False
    except OSError:                                   # reset after the answer: closed too
        return received.split(b"\r\n", 1)[0], True
    finally:
        sock.close()


@pytest.fixture(scope="module")
def live(satellite, app):
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    assert satellite.request(host, "/?token=" + link["token"])[0] == 200      # mapped and proxied
    return link, host


def database(satellite):
    with sqlite3.connect(satellite.db) as db:
        return list(db.iterdump())


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_hostile_request_is_refused(satellite, app, live, case):
    link, host = live
    raw = case["request"].format(host=f"{host}:{satellite.port}", manage=f"127.0.0.1:{satellite.port}",
                                 token=link["token"]).encode("latin-1")
    seen, before = len(app.seen()), database(satellite)
    status_line, closed = exchange(satellite, host, raw)
    assert status_line.startswith(b"HTTP/1.1 %d " % case["status"]), status_line
    assert closed, "connection left open after a refused request"
    assert len(app.seen()) == seen, app.seen()[seen:]
    assert database(satellite) == before


def test_corpus_covers_the_shapes_we_promise():
    names = " ".join(c["name"] for c in CORPUS).lower()
    for shape in ("cl and te", "te obs-folded", "chunk size", "underscore", "obs-fold", "bare cr", "bare lf",
                  "too long", "too many", "duplicate host", "missing host", "absolute-form", "http/0.9",
                  "http/2 preface", "unknown method", "invalid utf-8"):
        assert shape in names, shape


def test_bad_chunk_mid_body_closes_both_sides_and_smuggles_nothing(satellite, app, live):
    """A framing error after the first chunk is found while streaming: the app got the head of
    one request, then a closed connection; the bytes after the bad chunk never became a request."""
    link, host = live
    smuggled = f"GET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
    raw = (f"POST /upload?token={link['token']} HTTP/1.1\r\nHost: {host}:{satellite.port}\r\n"
           f"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabcdef\r\n0\r\n\r\n{smuggled}").encode()
    seen = len(app.seen())
    status_line, closed = exchange(satellite, host, raw)
    assert status_line.startswith(b"HTTP/1.1 400 ") and closed
    wait_for(lambda: len(app.seen()) > seen, what="the app to log the request head")
    time.sleep(0.5)                                   # room for a smuggled request to show up, if any
    assert app.seen()[seen:] == [f"POST /upload?token={link['token']}"]

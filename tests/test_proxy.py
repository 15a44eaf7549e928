"""The session host: access control, forwarding, the status page, streaming and WebSockets."""
import hashlib
import json
import os
import random
import socket
import time

import pytest
import websocket

from conftest import NODE, App, follow_events, json_body, wait_for

PATTERN = random.Random(1234).randbytes(1 << 20)      # what tests/apps/echo_app.py serves


def rss_peak_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# access control ----------------------------------------------------------------

def test_no_token_is_403_and_the_app_sees_nothing(satellite, app):
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    before = len(app.seen())
    for target in ("/", "/headers", "/?token=wrong", "/?token="):
        status, headers, body = satellite.request(host, target)
        assert status == 403
        assert link["token"].encode() not in body
    status, _, _ = satellite.request(host, "/upload", "POST", body=b"x" * 1000)
    assert status == 403
    assert len(app.seen()) == before


def test_token_of_one_session_does_not_open_another(satellite, app):
    first, second = satellite.mapped_session(app), satellite.mapped_session(app)
    before = len(app.seen())
    status, headers, _ = satellite.request(satellite.host(second["alias"]), "/?token=" + first["token"])
    assert status == 403
    # nor does its cookie
    status, headers, _ = satellite.request(satellite.host(first["alias"]), "/?token=" + first["token"])
    cookie = headers["Set-Cookie"].split(";")[0]
    status, _, _ = satellite.request(satellite.host(second["alias"]), "/headers", headers={"Cookie": cookie})
    assert status == 403
    assert len(app.seen()) == before + 1


def test_first_visit_sets_a_host_only_cookie_that_is_not_the_token(satellite, app):
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    status, headers, _ = satellite.request(host, "/?token=" + link["token"])
    assert status == 200
    cookie = headers["Set-Cookie"]
    attributes = [a.strip().lower() for a in cookie.split(";")]
    name, value = cookie.split(";")[0].split("=", 1)
    assert name == "__Host-satellite" and link["token"] not in value
    assert {"path=/", "secure", "httponly", "samesite=lax"} <= set(attributes)
    assert not any(a.startswith("domain") for a in attributes)
    status, headers, body = satellite.request(host, "/headers", headers={"Cookie": f"{name}={value}"})
    assert status == 200 and "Set-Cookie" not in headers


def test_authorization_header_token_is_accepted(satellite, app):
    link = satellite.mapped_session(app)
    status, _, _ = satellite.request(satellite.host(link["alias"]), "/headers",
                                     headers={"Authorization": "token " + link["token"]})
    assert status == 200


def test_unknown_alias_is_404(satellite):
    assert satellite.request(satellite.host("zzz-zzz-zzz"), "/")[0] == 404


# forwarding --------------------------------------------------------------------

def test_forwarded_request_is_clean(satellite, app):
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    _, headers, _ = satellite.request(host, "/?token=" + link["token"])
    ours = headers["Set-Cookie"].split(";")[0]
    status, _, body = satellite.request(host, "/headers?a=1&token=" + link["token"], headers={
        "Cookie": f"app=1; {ours}; other=2",
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example", "Forwarded": "for=6.6.6.6",
        "X-Real-IP": "6.6.6.6", "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Authorization": "Basic eA==",
    })
    assert status == 200
    seen = json_body(body)
    fields = {}
    for name, value in seen["headers"]:
        fields.setdefault(name.lower(), []).append(value)
    assert seen["target"] == "/headers?a=1&token=" + link["token"]       # query untouched
    assert fields["host"] == [f"{host}:{satellite.port}"]                 # Host preserved
    assert fields["cookie"] == ["app=1; other=2"]                         # only satellite's cookie removed
    assert fields["x-forwarded-for"] == ["127.0.0.1"]
    assert fields["x-forwarded-proto"] == ["https"]
    assert fields["x-forwarded-host"] == [f"{host}:{satellite.port}"]
    assert fields["forwarded"] == [f'for=127.0.0.1;proto=https;host="{host}:{satellite.port}"']
    for hop in ("x-real-ip", "x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert hop not in fields, hop


def test_app_cookies_and_statuses_pass_through(satellite, new_app):
    """The app (with APP_TOKEN) checks its own ?token= or its own app-token cookie, and sets that cookie."""
    app = new_app(APP_TOKEN="apptoken")
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    conn = satellite.connection(host)
    conn.request("GET", "/?token=apptoken&x=" + link["token"].replace("-", "%2D"))
    resp = conn.getresponse()
    body = resp.read()
    # the link token is in another parameter: satellite refuses, and the app sees nothing
    assert resp.status == 403 and b"app:" not in body
    conn.request("GET", "/?token=" + link["token"])
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 403 and body == b"app: wrong or missing token\n"   # the app's own refusal, as it sent it
    assert [c.split("=")[0] for c in resp.headers.get_all("Set-Cookie")] == ["__Host-satellite"]
    ours = resp.headers["Set-Cookie"].split(";")[0]
    # satellite's credential in a header, the app's in the query: both cookies reach the browser
    conn.request("GET", "/?token=apptoken", headers={"Authorization": "token " + link["token"]})
    resp = conn.getresponse()
    assert resp.status == 200 and b"Hello from the compute node" in resp.read()
    cookies = resp.headers.get_all("Set-Cookie")
    assert "app-token=apptoken; Path=/" in cookies, cookies
    assert any(c.startswith("__Host-satellite=") for c in cookies), cookies
    conn.close()
    # the browser sends both back: the app's cookie alone lets it in, and satellite's never reaches it
    status, _, body = satellite.request(host, "/", headers={"Cookie": f"{ours}; app-token=apptoken"})
    assert status == 200 and b"Hello from the compute node" in body
    status, _, body = satellite.request(host, "/headers", headers={"Cookie": f"app-token=apptoken; {ours}"})
    assert status == 200
    seen = [v for k, v in json_body(body)["headers"] if k.lower() == "cookie"]
    assert seen == ["app-token=apptoken"], seen
    assert app.seen()[-2:] == ["GET /", "GET /headers"]


def test_head_204_304_have_no_body_and_keep_alive_works(satellite, app):
    link = satellite.mapped_session(app)
    conn = satellite.connection(satellite.host(link["alias"]))
    auth = {"Authorization": "token " + link["token"]}
    for method, target, status in [("HEAD", "/download?size=5000", 200), ("GET", "/status/204", 204),
                                   ("GET", "/status/304", 304), ("GET", "/download?size=10", 200),
                                   ("GET", "/no-length", 200), ("GET", "/headers", 200)]:
        conn.request(method, target, headers=auth)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == status
        if method == "HEAD":
            assert body == b"" and resp.headers["Content-Length"] == "5000"
        if status in (204, 304):
            assert body == b""
        if target == "/no-length":
            assert body == b"until-close body\n" * 1000 and resp.headers["Transfer-Encoding"] == "chunked"
    conn.close()


def test_event_stream_arrives_incrementally(satellite, new_app):
    """The app sends event i+1 only after /next; a buffering proxy would never deliver event 0 alone."""
    app = new_app()
    link = satellite.mapped_session(app)
    conn = satellite.connection(satellite.host(link["alias"]), timeout=10)
    conn.request("GET", "/events?n=3", headers={"Authorization": "token " + link["token"]})
    resp = conn.getresponse()
    assert resp.headers["Content-Type"] == "text/event-stream"
    follow_events(resp, 3, lambda: app.direct("/next"))
    conn.close()


def test_large_upload_and_download_stream_with_bounded_memory(satellite, app):
    size = 200 * 1024 * 1024
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    auth = {"Authorization": "token " + link["token"]}
    peak_before = rss_peak_kb(satellite.proc.pid)

    conn = satellite.connection(host, timeout=120)
    conn.request("GET", f"/download?size={size}", headers=auth)
    resp = conn.getresponse()
    digest, total = hashlib.sha256(), 0
    while True:
        piece = resp.read(1 << 20)
        if not piece:
            break
        digest.update(piece)
        total += len(piece)
    expected = hashlib.sha256()
    for _ in range(size // len(PATTERN)):
        expected.update(PATTERN)
    assert total == size and digest.hexdigest() == expected.hexdigest()

    def body():
        for _ in range(size // len(PATTERN)):
            yield PATTERN
    conn.request("POST", "/upload", body=body(), headers=dict(auth, **{"Content-Length": str(size)}))
    answer = json_body(conn.getresponse().read())
    assert answer == {"bytes": size, "sha256": expected.hexdigest()}
    conn.close()
    grown_mb = (rss_peak_kb(satellite.proc.pid) - peak_before) / 1024
    assert grown_mb < 40, f"satellite's peak memory grew by {grown_mb:.0f} MB for 200 MB bodies"


def test_chunked_upload_and_curl_expect_100_continue(satellite, app, tmp_path):
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    data = os.urandom(3 * 1024 * 1024)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    for extra in (["--data-binary", f"@{path}"],                                    # curl sends Expect: 100-continue
                  ["-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}"]):
        result = satellite.curl("-H", f"Authorization: token {link['token']}", *extra,
                                satellite.url(host, "/upload"), host=host)
        assert json.loads(result.stdout) == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# status page and app lifecycle -------------------------------------------------

def test_an_ended_sessions_status_is_json_and_tells_its_holder_why(satellite):
    link = satellite.getlink()
    host = satellite.host(link["alias"])
    cookie = satellite.request(host, "/lab?token=" + link["token"])[1]["Set-Cookie"].split(";")[0]
    satellite.api("release", key=link["key"])
    status, headers, body = satellite.request(host, "/__satellite/status", headers={"Cookie": cookie})
    assert status == 200 and headers["Content-Type"] == "application/json"
    info = json_body(body)
    assert (info["state"], info["ended_because"], info["ready"]) == ("ended", "released", False)
    assert "gave the link back" in info["message"] and headers["Content-Security-Policy"].startswith("default-src")
    status, headers, body = satellite.request(host, "/__satellite/status")            # not the holder: no why
    assert status == 410 and json_body(body) == {"state": "ended", "message": json_body(body)["message"]}
    status, _, body = satellite.request(host, "/lab", headers={"Cookie": cookie})
    assert status == 410 and b"gave the link back" in body


NAVIGATION = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Accept": "text/html"}


def test_a_page_load_near_the_end_gets_the_notice_once_and_the_app_never_sees_its_cookie(satellite, app):
    link = satellite.getlink(lifetime="5m")
    assert satellite.api("redeem", source=app.host, key=link["key"], port=app.port)[0] == 200
    host = satellite.host(link["alias"])
    status, headers, body = satellite.request(host, "/headers?token=" + link["token"], headers=NAVIGATION)
    assert status == 200 and b"ends in <strong>4 minutes</strong>" in body and b"Save your work" in body
    cookies = "; ".join(v.split(";")[0] for k, v in headers.items() if k == "Set-Cookie")
    assert "__Host-notice-satellite=shown" in cookies and "__Host-satellite=" in cookies
    status, _, body = satellite.request(host, "/headers", headers={**NAVIGATION, "Cookie": cookies + "; a=1"})
    assert status == 200 and dict(json_body(body)["headers"])["Cookie"] == "a=1"
    assert json_body(satellite.request(host, "/__satellite/status", headers={"Cookie": cookies})[2])[
        "seconds_left"] <= 300


def test_status_page_until_the_app_answers_then_the_app(satellite, new_app):
    link = satellite.getlink()
    host = satellite.host(link["alias"])
    status, headers, body = satellite.request(host, "/lab?token=" + link["token"])
    assert status == 503 and headers["Content-Type"].startswith("text/html") and headers["Retry-After"] == "2"
    assert link["alias"].encode() in body and link["token"].encode() not in body
    assert b"Job waiting in the queue" in body and b"<script>" in body
    cookie = headers["Set-Cookie"].split(";")[0]

    def status_json():
        return json_body(satellite.request(host, "/__satellite/status", headers={"Cookie": cookie})[2])
    assert status_json()["state"] == "queued" and status_json()["ready"] is False
    satellite.api("state", key=link["key"], state="running")
    assert status_json()["state"] == "running"
    # status endpoint needs the credential too
    assert satellite.request(host, "/__satellite/status")[0] == 403

    # redeemed, but the app is not listening yet: still the status page, not an error
    app = new_app()
    port = app.port
    app.stop()
    assert satellite.api("redeem", source=NODE, key=link["key"], port=port)[0] == 200
    status, _, body = satellite.request(host, "/", headers={"Cookie": cookie})
    assert status == 503 and b"not answering yet" in body
    assert status_json() == {**status_json(), "state": "mapped", "ready": False}

    # the app comes up: ready, then proxied
    app = new_app()
    assert satellite.api("redeem", source=NODE, key=link["key"], port=app.port)[0] == 200
    assert status_json()["ready"] is True
    status, _, body = satellite.request(host, "/", headers={"Cookie": cookie})
    assert status == 200 and b"Hello from the compute node" in body
    assert satellite.api("status", key=link["key"])[1]["state"] == "proxied"

    # after it was proxied, a dead app is a 502, not the status page
    app.stop()
    status, _, body = satellite.request(host, "/", headers={"Cookie": cookie})
    assert status == 502 and b"not answering" in body


# WebSocket ---------------------------------------------------------------------

def open_websocket(satellite, link, target="/ws"):
    host = satellite.host(link["alias"])
    sock = satellite.tls_socket(host)
    return websocket.create_connection(f"wss://{host}:{satellite.port}{target}", socket=sock,
                                       header=[f"Authorization: token {link['token']}"], timeout=10)


def test_websocket_echo_text_binary_and_idle(satellite, app):
    link = satellite.mapped_session(app)
    ws = open_websocket(satellite, link)
    ws.send("hello")
    assert ws.recv() == "hello"
    blob = os.urandom(300_000)
    ws.send_binary(blob)
    assert ws.recv() == blob
    time.sleep(2)                    # idle: nothing times the relay out
    ws.ping(b"are you there")
    ws.send("still here")
    assert ws.recv() == "still here"
    ws.close()


def test_websocket_needs_the_token(satellite, app):
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    before = len(app.seen())
    with pytest.raises(websocket.WebSocketBadStatusException) as failure:
        websocket.create_connection(f"wss://{host}:{satellite.port}/ws", socket=satellite.tls_socket(host),
                                    timeout=10)
    assert failure.value.status_code == 403
    assert len(app.seen()) == before


def test_release_cuts_an_idle_websocket(satellite, app):
    """A session that ends closes its live WebSockets, even idle ones (checked every few seconds)."""
    link = satellite.mapped_session(app)
    ws = open_websocket(satellite, link)
    ws.send("one")
    assert ws.recv() == "one"
    satellite.api("release", key=link["key"])
    ws.settimeout(30)
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        ws.recv()


def test_websocket_relay_works_beyond_1024_descriptors(fresh_satellite, app):
    """select() cannot watch descriptors above 1024; with >1100 connections open, the relay still works.
    (All from one address here, so the per-address cap is switched off.)"""
    satellite = fresh_satellite("--max-connections-per-address", "0")
    link = satellite.mapped_session(app)
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", satellite.port)))
        wait_for(lambda: len(os.listdir(f"/proc/{satellite.proc.pid}/fd")) > 1100, what="satellite to accept them")
        ws = open_websocket(satellite, link)
        ws.send("deep descriptors")
        assert ws.recv() == "deep descriptors"
        ws.close()
    finally:
        for sock in idle:
            sock.close()


def test_an_app_restarted_between_requests_is_reached_on_the_same_browser_connection(satellite, tmp_path):
    """The upstream connection kept from the last request is dead: a GET is retried on a new one,
    and a POST (never retried: its body may have been acted on) first checks the kept one."""
    app = App(tmp_path)
    link = satellite.mapped_session(app)
    conn = satellite.connection(satellite.host(link["alias"]))
    auth = {"Authorization": "token " + link["token"]}
    conn.request("GET", "/", headers=auth)
    assert conn.getresponse().read().startswith(b"<!doctype html>")
    for method, target, body in (("GET", "/headers", None), ("POST", "/upload", b"x" * 5000)):
        app.stop()
        app = App(tmp_path, port=app.port)                 # same address and port, a new process
        conn.request(method, target, body=body, headers=auth)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
        assert app.seen() == [f"{method} {target}"]        # arrived once, at the new process
    app.stop()
    conn.close()

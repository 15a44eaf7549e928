"""nginx and HAProxy as the data plane, deciding by themselves on a valid session cookie
(contrib/nginx-satellite.conf, contrib/haproxy-satellite.cfg, `satellite export --watch`).

Every test runs against both fronts: real nginx / HAProxy on loopback with the test CA, real satellite,
the echo app as the session's app (it echoes the Cookie header it received), real curl."""
import json
import os
import stat
import subprocess
import sys

import websocket

from conftest import DOMAIN, ROOT, LoopbackHTTPS, wait_for
from fronts import GROUP, front, satellite_lines, settle_satellite_log  # noqa: F401  (fixtures)


def mapped_and_served(front, app):
    """A session redeemed by `app`, in the front's map, and its cookie (from the first visit with the
    token, which satellite answers)."""
    link = front.satellite.mapped_session(app)
    wait_for(lambda: f"{link['alias']}.{DOMAIN}" in front.map_file.read_text(), what="the watcher to export it")
    status, headers, body = front.request(link["alias"], "/?token=" + link["token"])
    assert status == 200 and b"Hello from the compute node" in body
    cookie = headers["Set-Cookie"].split(";")[0]
    assert cookie.startswith("__Host-satellite=")
    return link, cookie


def app_headers(body):
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def served_by_front(front, alias, cookie):
    """Wait until the front serves this session by itself, every worker of it."""
    wait_for(lambda: direct(front, alias, cookie), what="the front to decide by itself")
    front.settle()
    assert direct(front, alias, cookie)


def direct(front, alias, cookie, target="/headers", **more):
    """A request the front answered without satellite: the app's echo carries no Via of satellite."""
    status, _, body = front.request(alias, target, dict(more.pop("headers", {}), Cookie=cookie), **more)
    return status == 200 and "via" not in app_headers(body)


def test_a_valid_cookie_is_decided_at_the_front_without_any_request_to_satellite(front, new_app):
    app = new_app()
    front.watch()
    link, cookie = mapped_and_served(front, app)
    # the exported map lets the front accept cookies: 0640, the front's group, never world-readable
    st = front.map_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == __import__("grp").getgrnam(GROUP).gr_gid
    text = front.map_file.read_text()
    assert link["token"] not in text and cookie.split("=", 1)[1] not in text        # a digest, not the cookie
    served_by_front(front, link["alias"], cookie)
    settle_satellite_log(front)
    before = len(satellite_lines(front.satellite, link["alias"]))
    seen = len(app.seen())
    for app_cookie, expected in [("", None), ("a=1; {c}; b=2", "a=1; b=2"), ("{c}; lab=x,y", "lab=x,y"),
                                 ("a=1; {c}; __Host-notice-satellite=shown", "a=1")]:
        sent = app_cookie.format(c=cookie) if app_cookie else cookie
        status, _, body = front.request(link["alias"], "/headers", {"Cookie": sent})
        got = app_headers(body)
        assert status == 200 and "via" not in got and got.get("cookie") == expected, (sent, got)
        assert got["x-forwarded-proto"] == "https" and got["x-forwarded-for"] == "127.0.0.1"
        assert "x-satellite-front" not in got
    result = front.curl(link["alias"], "/", "-H", f"Cookie: {cookie}")
    assert "Hello from the compute node" in result.stdout, result.stderr
    # a WebSocket from the session's own page, through the front alone
    host = f"{link['alias']}.{DOMAIN}"
    ws = websocket.create_connection(f"wss://{host}:{front.port}/ws", socket=front.tls_socket(host), timeout=10,
                                     header=[f"Cookie: {cookie}"], origin=f"https://{host}:{front.port}")
    ws.send("through the front")
    assert ws.recv() == "through the front"
    ws.close()
    # a POST from its own page too
    own_page = {"Cookie": cookie, "Origin": f"https://{host}:{front.port}", "Content-Type": "text/plain"}
    status, _, body = front.request(link["alias"], "/upload", own_page, "POST", b"x" * 1000)
    assert status == 200 and json.loads(body)["bytes"] == 1000
    assert len(app.seen()) == seen + 7
    settle_satellite_log(front)
    assert len(satellite_lines(front.satellite, link["alias"])) == before          # satellite saw none of them


def test_what_the_front_cannot_decide_goes_to_satellite(front, new_app):
    app = new_app()
    front.watch()
    link, cookie = mapped_and_served(front, app)
    sibling, sibling_cookie = mapped_and_served(front, app)
    host = f"{link['alias']}.{DOMAIN}"
    served_by_front(front, link["alias"], cookie)
    seen = len(app.seen())
    settle_satellite_log(front)
    before = len(satellite_lines(front.satellite, link["alias"]))
    refused = [
        ({"Cookie": "__Host-satellite=" + "0" * 64}, "GET", 403),                  # forged
        ({"Cookie": sibling_cookie}, "GET", 403),                                    # another session's
        ({"Cookie": cookie, "Origin": f"https://{sibling['alias']}.{DOMAIN}:{front.port}"}, "POST", 403),
        ({"Cookie": cookie, "Origin": "https://evil.example"}, "DELETE", 403),
        ({"Cookie": cookie, "Sec-Fetch-Site": "same-site"}, "POST", 403),
        ({}, "GET", 403),                                                            # no credential
    ]
    for headers, method, expected in refused:
        status, _, body = front.request(link["alias"], "/upload" if method != "GET" else "/headers", headers, method,
                                        b"x" if method != "GET" else None)
        assert status == expected, (headers, method, status, body[:200])
    try:
        websocket.create_connection(f"wss://{host}:{front.port}/ws", socket=front.tls_socket(host), timeout=10,
                                    header=[f"Cookie: {cookie}"],
                                    origin=f"https://{sibling['alias']}.{DOMAIN}:{front.port}")
        raise AssertionError("a WebSocket from another session's page was let through the front")
    except websocket.WebSocketBadStatusException as exc:
        assert exc.status_code == 403
    assert len(app.seen()) == seen                                                  # none reached the app
    # satellite's own pages, and an API client with its token, are satellite's (it lets the latter through)
    status, _, body = front.request(link["alias"], "/__satellite/status", {"Cookie": cookie})
    assert status == 200 and json.loads(body)["state"] in ("mapped", "proxied")
    status, _, body = front.request(link["alias"], "/headers", {"Authorization": "token " + link["token"]})
    assert status == 200 and "via" in app_headers(body)
    # two session cookies (one of them wrong): satellite decides (the first counts) and strips both
    status, _, body = front.request(link["alias"], "/headers", {"Cookie": f"{cookie}; __Host-satellite={'1' * 64}"})
    assert status == 200 and "satellite" not in (app_headers(body).get("cookie") or "")
    settle_satellite_log(front)
    assert len(satellite_lines(front.satellite, link["alias"])) == before + len(refused) + 4
    # a rotated cookie key: the front's checks change with it, old cookies go to satellite, which refuses them
    rotated = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "rotate-cookie-key", "--db",
                              str(front.satellite.db)], capture_output=True, text=True, timeout=30)
    assert rotated.returncode == 0, rotated.stderr
    wait_for(lambda: front.request(link["alias"], "/headers", {"Cookie": cookie})[0] == 403,
             what="the old cookie to be refused")
    status, headers, _ = front.request(link["alias"], "/?token=" + link["token"])
    new_cookie = headers["Set-Cookie"].split(";")[0]
    assert status == 200 and new_cookie != cookie
    served_by_front(front, link["alias"], new_cookie)
    # revoked: gone from the front (satellite answers 410), its sibling still served by the front
    revoked = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "revoke", "--db", str(front.satellite.db),
                              link["alias"]], capture_output=True, text=True, timeout=30)
    assert revoked.returncode == 0, revoked.stderr
    wait_for(lambda: front.request(link["alias"], "/headers", {"Cookie": new_cookie})[0] == 410,
             timeout=5, interval=0.05, what="the revoked session to leave the front")
    assert f"{link['alias']}." not in front.map_file.read_text()
    status, _, _ = front.request(sibling["alias"], "/?token=" + sibling["token"])
    assert status == 200


def test_new_sessions_reach_the_front_without_a_reload_per_change(front, new_app):
    app = new_app()
    front.watch()
    wait_for(lambda: front.reload_count() >= 1 or front.kind == "haproxy", what="the watcher's first sync")
    wait_for(lambda: "routes written" in front.watch_log() or front.map_file.read_text(), what="the first map")
    first_pid = front.proc.pid
    reloads = front.reload_count()
    links = [front.satellite.mapped_session(app) for _ in range(6)]                # in quick succession
    for link in links:
        status, headers, _ = front.request(link["alias"], "/?token=" + link["token"])
        assert status == 200
        cookie = headers["Set-Cookie"].split(";")[0]
        wait_for(lambda: direct(front, link["alias"], cookie), what="the new session at the front")
    if front.kind == "nginx":
        assert front.reload_count() - reloads < len(links)                        # coalesced
    else:
        assert front.reload_count() == 0 and front.proc.poll() is None and front.proc.pid == first_pid
        shown = subprocess.run([sys.executable, "-c", f"import socket; s=socket.socket(socket.AF_UNIX); "
                                f"s.connect({str(front.socket)!r}); s.sendall(b'show map {front.map_file}\\n'); "
                                f"import sys; sys.stdout.write(s.makefile().read())"],
                               capture_output=True, text=True, timeout=10).stdout
        assert all(f"{link['alias']}.{DOMAIN}" in shown for link in links)        # through the runtime API
    assert "failed" not in front.watch_log()


def test_a_watcher_that_cannot_reach_the_front_keeps_going(front, new_app, tmp_path):
    """The reload command or HAProxy's socket failing is logged and tried again; the map stays current."""
    app = new_app()
    if front.kind == "haproxy":
        front.socket = tmp_path / "no-such.sock"
    else:
        front.reload_command = "false"
    front.watch()
    link = front.satellite.mapped_session(app)
    wait_for(lambda: f"{link['alias']}." in front.map_file.read_text(), what="the map to stay current")
    wait_for(lambda: "failed" in front.watch_log(), what="the failure to be logged")
    assert front.watcher.poll() is None
    os.kill(front.watcher.pid, 0)


def test_kept_alive_connections_to_apps_never_cross_sessions(front, new_app):
    """The front keeps connections to apps open and reuses them: a request of one session must never
    ride a connection to another session's app (HAProxy routes by set-dst to one catch-all server)."""
    apps = [new_app(), new_app()]
    front.watch()
    sessions = [mapped_and_served(front, app) for app in apps]
    for link, cookie in sessions:
        served_by_front(front, link["alias"], cookie)
    conns = [LoopbackHTTPS(f"{link['alias']}.{DOMAIN}", front.port, front.satellite.context) for link, _ in sessions]
    for i in range(12):
        for n, ((link, cookie), conn) in enumerate(zip(sessions, conns)):
            conn.request("GET", f"/headers?session={n}&i={i}", headers={"Cookie": cookie})
            resp = conn.getresponse()
            assert resp.status == 200 and "via" not in app_headers(resp.read())
    for conn in conns:
        conn.close()
    for n, app in enumerate(apps):
        mine = [line for line in app.seen() if "session=" in line]
        assert len(mine) == 12 and all(f"session={n}&" in line for line in mine), mine

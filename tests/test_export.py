"""satellite export: the live map for nginx/Apache/HAProxy, and contrib/nginx-satellite.conf run by a real nginx."""
import base64
import hashlib
import shutil
import socket
import stat

import pytest
import websocket

from conftest import DOMAIN, LoopbackHTTPS, wait_for
from fronts import export, nginx_alone  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed (tests/setup-system.sh)")


def test_export_formats_and_atomic_unchanged_writes(fresh_satellite, app, tmp_path):
    satellite = fresh_satellite()
    link = satellite.mapped_session(app)
    satellite.getlink()                                           # not mapped: not exported
    pinned = satellite.getlink()                                  # pinned TLS (and the upstream proof): satellite's
    assert satellite.api("redeem", source=app.host, key=pinned["key"], port=app.port, fingerprint="ab" * 32)[0] == 200
    host, target = f"{link['alias']}.{DOMAIN}", f"{app.host}:{app.port}"
    # the cookie the browser gets on its first visit, and the one-way digests of it each front checks
    _, headers, _ = satellite.request(host, "/?token=" + link["token"])
    cookie = headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    md5 = base64.urlsafe_b64encode(hashlib.md5(cookie.encode()).digest()).decode().rstrip("=")
    nginx = export(satellite, "--format", "nginx").stdout
    assert f'"{host}" "{target} {md5}";' in nginx and cookie not in nginx and link["token"] not in nginx
    assert f"{host} http://{target}" in export(satellite, "--format", "apache").stdout
    assert f"{host} {app.host} {app.port} {hashlib.sha256(cookie.encode()).hexdigest()}" in \
        export(satellite, "--format", "haproxy").stdout
    assert all(pinned["alias"] not in export(satellite, "--format", f).stdout for f in ("nginx", "apache", "haproxy"))
    # a session within its last 10 minutes stays with satellite, which shows the ending notice
    ending = satellite.getlink(lifetime="10m")
    assert satellite.api("redeem", source=app.host, key=ending["key"], port=app.port)[0] == 200
    assert ending["alias"] not in export(satellite, "--format", "haproxy").stdout
    out = tmp_path / "map.conf"
    marker = tmp_path / "reloaded"
    first = export(satellite, "--format", "nginx", "--output", str(out), "--reload-command", f"echo x >> {marker}")
    assert first.returncode == 0 and "1 routes written" in first.stdout and "reloaded" in first.stdout
    again = export(satellite, "--format", "nginx", "--output", str(out), "--reload-command", f"echo x >> {marker}")
    assert "unchanged" in again.stdout and marker.read_text() == "x\n"       # no rewrite, no reload
    failing = export(satellite, "--format", "nginx", "--output", str(tmp_path / "m2"), "--reload-command", "false")
    assert failing.returncode == 1 and "reload failed" in failing.stderr
    # the checks let a front accept cookies: never world-readable (the plain map for Apache may be)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and stat.S_IMODE((tmp_path / "m2").stat().st_mode) == 0o640
    export(satellite, "--format", "apache", "--output", str(tmp_path / "apache.map"))
    assert stat.S_IMODE((tmp_path / "apache.map").stat().st_mode) == 0o644


def test_with_sso_the_front_gets_no_cookie_checks(fresh_satellite, app, tmp_path):
    """With trusted-user-header the owner is checked by satellite: a front could not, so it decides nothing."""
    satellite = fresh_satellite()
    link = satellite.mapped_session(app)
    (tmp_path / "sso.ini").write_text(f"[satellite]\ndb = {satellite.db}\ndomain = {DOMAIN}\n"
                                      f"trusted-user-header = X-Remote-User\ntrusted-fronts = 127.0.0.5/32\n")
    result = export(satellite, "-c", str(tmp_path / "sso.ini"), "--format", "haproxy")
    assert f"{link['alias']}.{DOMAIN} {app.host} {app.port} -\n" in result.stdout, result.stdout + result.stderr


@pytest.fixture
def nginx_front(nginx_alone):
    """nginx running contrib/nginx-satellite.conf (tests/fronts.py), kept current here by plain export."""
    return nginx_alone.satellite, nginx_alone.port, nginx_alone.map_file, nginx_alone.reload_command


def through_nginx(satellite, port, alias, target, headers=None):
    conn = LoopbackHTTPS(f"{alias}.{DOMAIN}", port, satellite.context)
    conn.request("GET", target, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.headers, resp.read()


def test_nginx_front_routes_http_and_websockets_with_satellite_checking_tokens(nginx_front, app):
    satellite, port, map_file, reload = nginx_front
    link = satellite.mapped_session(app)
    waiting = satellite.getlink()
    result = export(satellite, "--format", "nginx", "--output", str(map_file), "--reload-command", reload)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: through_nginx(satellite, port, link["alias"], "/headers")[0] == 403, what="nginx reloaded")
    before = len(app.seen())
    assert through_nginx(satellite, port, link["alias"], "/?token=wrong")[0] == 403
    assert len(app.seen()) == before                                   # refused requests never reach the app
    status, headers, body = through_nginx(satellite, port, link["alias"], "/?token=" + link["token"])
    assert status == 200 and b"Hello from the compute node" in body
    cookie = headers["Set-Cookie"].split(";")[0]
    assert cookie.startswith("__Host-satellite=")
    assert through_nginx(satellite, port, link["alias"], "/headers", {"Cookie": cookie})[0] == 200
    # WebSocket through nginx
    raw = socket.create_connection(("127.0.0.1", port))
    sock = satellite.context.wrap_socket(raw, server_hostname=f"{link['alias']}.{DOMAIN}")
    ws = websocket.create_connection(f"wss://{link['alias']}.{DOMAIN}:{port}/ws", socket=sock, timeout=10,
                                     header=[f"Authorization: token {link['token']}"])
    ws.send("via nginx")
    assert ws.recv() == "via nginx"
    ws.close()
    # an alias not in the map goes to satellite: the status page
    status, _, body = through_nginx(satellite, port, waiting["alias"], "/?token=" + waiting["token"])
    assert status == 503 and b"Starting your session" in body
    # released: out of the map after export + reload, and satellite answers 410
    satellite.api("release", key=link["key"])
    export(satellite, "--format", "nginx", "--output", str(map_file), "--reload-command", reload)
    wait_for(lambda: through_nginx(satellite, port, link["alias"], "/?token=" + link["token"])[0] == 410,
             what="the released alias to leave nginx's map")


def test_an_outsider_through_the_front_reaches_no_control_endpoint(nginx_front, app):
    """Everything nginx forwards comes from nginx's address; none of it may be the control plane:
    the API, tunnels, /metrics and the auth endpoint are on satellite's control listener, which the
    front never forwards to (the old layout answered /metrics and getlink here, and a redeem through the
    front mapped a link to a service on the proxy node's own loopback)."""
    satellite, port, map_file, reload = nginx_front
    link = satellite.mapped_session(app)
    waiting = satellite.getlink()
    export(satellite, "--format", "nginx", "--output", str(map_file), "--reload-command", reload)
    wait_for(lambda: through_nginx(satellite, port, link["alias"], "/?token=" + link["token"])[0] == 200,
             what="nginx to serve the session")
    for host in ("manage", waiting["alias"], "no-such-alias"):
        for target in ("/api/getlink", f"/api/redeem?key={waiting['key']}&port={app.port}", "/api/status?key=x",
                       "/api/jobstates?jobstates=1%20RUNNING", "/api/tunnel", "/metrics",
                       "/__satellite/auth", f"/__satellite/auth?token={waiting['token']}"):
            status, _, body = through_nginx(satellite, port, host, target, {"X-Original-URI": "/"})
            assert status in (403, 404), (host, target, status, body[:200])
    assert satellite.rows() and all(row[3] != "mapped" or row[0] == link["alias"] for row in satellite.rows())
    # the control plane itself still serves the nodes, and the session still works through the front
    assert satellite.api("status", key=waiting["key"])[0] == 200
    assert through_nginx(satellite, port, link["alias"], "/?token=" + link["token"])[0] == 200


def raw_through_nginx(satellite, port, sni_host, raw):
    sock = satellite.context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=sni_host)
    sock.settimeout(10)
    sock.sendall(raw)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return data.split(b"\r\n", 1)[0]


def test_through_the_front_sessions_stay_apart(nginx_front, new_app):
    """What satellite checks itself must hold through the front too: a request line naming another
    session, a cross-site POST or WebSocket, an app's cookies for the whole domain."""
    satellite, port, map_file, reload = nginx_front
    app = new_app()
    victim, mine = satellite.mapped_session(app), satellite.mapped_session(app)
    export(satellite, "--format", "nginx", "--output", str(map_file), "--reload-command", reload)
    mine_cookie = through_nginx(satellite, port, mine["alias"], "/?token=" + mine["token"])[1]["Set-Cookie"]
    mine_cookie = mine_cookie.split(";")[0]

    def nginx_proxies_itself():                            # not satellite answering a session not yet in the map
        status, _, body = through_nginx(satellite, port, mine["alias"], "/headers", {"Cookie": mine_cookie})
        return status == 200 and b"1.1 satellite" not in body
    wait_for(nginx_proxies_itself, what="nginx to serve the sessions from its map")
    seen = len(app.seen())
    mine_host, victim_host = f"{mine['alias']}.{DOMAIN}", f"{victim['alias']}.{DOMAIN}"
    # my token, a request line naming the victim's session, Host naming mine
    line = raw_through_nginx(satellite, port, mine_host,
                             f"GET https://{victim_host}/headers?token={mine['token']} HTTP/1.1\r\n"
                             f"Host: {mine_host}\r\n\r\n".encode())
    assert line.startswith(b"HTTP/1.1 400"), line
    # a page on my session posting to the victim's app, or opening its WebSocket, with the victim's cookie
    status, headers, _ = through_nginx(satellite, port, victim["alias"], "/?token=" + victim["token"])
    cookie = headers["Set-Cookie"].split(";")[0]
    conn = LoopbackHTTPS(victim_host, port, satellite.context)
    conn.request("POST", "/upload", body=b"x", headers={"Cookie": cookie, "Origin": f"https://{mine_host}:{port}",
                                                        "Content-Type": "text/plain"})
    assert conn.getresponse().status == 403
    raw = socket.create_connection(("127.0.0.1", port))
    sock = satellite.context.wrap_socket(raw, server_hostname=victim_host)
    try:
        websocket.create_connection(f"wss://{victim_host}:{port}/ws", socket=sock, timeout=10,
                                    header=[f"Cookie: {cookie}"], origin=f"https://{mine_host}:{port}")
        raise AssertionError("a WebSocket from another session's page was let through the front")
    except websocket.WebSocketBadStatusException as exc:
        assert exc.status_code == 403
    assert len(app.seen()) == seen + 1                                  # only the victim's own first visit
    # an app's cookie for the whole domain is kept to its own host; it cannot clear the domain's cookies
    status, headers, _ = through_nginx(satellite, port, mine["alias"],
                                       f"/set-cookie?v=bomb%3Dx%3B%20Domain%3D{DOMAIN}%3B%20Path%3D%2F&clear=1",
                                       {"Cookie": mine_cookie})
    assert status == 200 and headers.get_all("Set-Cookie") == [f"bomb=x; Domain={mine_host}; Path=/"]
    assert headers["Clear-Site-Data"] is None

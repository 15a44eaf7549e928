"""satellite export: the live map for nginx/Apache/HAProxy, and contrib/nginx-satellite.conf run by a real nginx."""
import shutil
import socket
import subprocess
import sys

import pytest
import websocket

from conftest import DOMAIN, ROOT, LoopbackHTTPS, wait_for

pytestmark = pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed (tests/setup-system.sh)")


def export(satellite, *args):
    return subprocess.run([sys.executable, str(ROOT / "satellite.py"), "export", "--db", str(satellite.db),
                           "--domain", DOMAIN, *args], capture_output=True, text=True, timeout=60)


FRONT = "127.0.0.5"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_export_formats_and_atomic_unchanged_writes(fresh_satellite, app, tmp_path):
    satellite = fresh_satellite()
    link = satellite.mapped_session(app)
    satellite.getlink()                                           # not mapped: not exported
    host, target = f"{link['alias']}.{DOMAIN}", f"{app.host}:{app.port}"
    assert f'"{host}" "{target}";' in export(satellite, "--format", "nginx").stdout
    assert f"{host} http://{target}" in export(satellite, "--format", "apache").stdout
    assert f"{host} {target}" in export(satellite, "--format", "haproxy").stdout
    out = tmp_path / "map.conf"
    marker = tmp_path / "reloaded"
    first = export(satellite, "--format", "nginx", "--output", str(out), "--reload-command", f"echo x >> {marker}")
    assert first.returncode == 0 and "1 routes written" in first.stdout and "reloaded" in first.stdout
    again = export(satellite, "--format", "nginx", "--output", str(out), "--reload-command", f"echo x >> {marker}")
    assert "unchanged" in again.stdout and marker.read_text() == "x\n"       # no rewrite, no reload
    failing = export(satellite, "--format", "nginx", "--output", str(tmp_path / "m2"), "--reload-command", "false")
    assert failing.returncode == 1 and "reload failed" in failing.stderr


RELOAD_AND_WAIT = """import subprocess, sys, time
def workers():
    return set(subprocess.run(["pgrep", "-P", "{master}"], capture_output=True, text=True).stdout.split())
before = workers()
subprocess.run(["nginx", "-s", "reload", "-c", "{conf}", "-p", "{prefix}"], check=True)
for _ in range(300):
    now = workers()
    if now and not now & before:
        sys.exit(0)
    time.sleep(0.05)
sys.exit("nginx's old workers did not exit within 15 s")
"""


@pytest.fixture
def nginx_front(fresh_satellite, tmp_path, certs):
    """A real nginx running contrib/nginx-satellite.conf, with only ports, paths and domain adapted."""
    # nginx connects from 127.0.0.5 here (the tests' login node is 127.0.0.1, which may not be a front)
    secret = "9" * 64
    (tmp_path / "front-secret").write_text(secret + "\n")
    (tmp_path / "front-secret.conf").write_text(f'proxy_set_header X-Satellite-Front "{secret}";\n')
    satellite = fresh_satellite("--admin-from", f"{FRONT}/32", "--trusted-fronts", f"{FRONT}/32",
                                "--control-listen", "127.0.0.1:0", "--front-secret", str(tmp_path / "front-secret"))
    port = free_port()
    map_file = tmp_path / "satellite-map.conf"
    map_file.write_text("")
    site = (ROOT / "contrib/nginx-satellite.conf").read_text()
    for old, new in [("server 127.0.0.1:8443;", f"server 127.0.0.1:{satellite.port};"),
                     ("server 127.0.0.1:8444;", f"server 127.0.0.1:{satellite.control_port};"),
                     ("# proxy_bind 127.0.0.1;", f"proxy_bind {FRONT};"),
                     ("/etc/nginx/satellite-front-secret.conf", str(tmp_path / "front-secret.conf")),
                     ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
                     ("satellite.example.edu", DOMAIN), ("/etc/nginx/satellite-map.conf", str(map_file)),
                     ("/etc/satellite/tls/fullchain.pem", str(certs / "cert.pem")),
                     ("/etc/satellite/tls/privkey.pem", str(certs / "key.pem"))]:
        assert old in site
        site = site.replace(old, new)
    (tmp_path / "site.conf").write_text(site)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;
events {{ worker_connections 256; }}
http {{ access_log off; client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/fastcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
  include {tmp_path}/site.conf; }}
""")
    check = subprocess.run(["nginx", "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp_path)])
    wait_for(lambda: (tmp_path / "nginx.pid").exists(), what="nginx")
    # a graceful reload leaves the old worker (with the old map) accepting for a moment: the reload command
    # returns only once every worker the master had before is gone, so the next request meets the new map
    (tmp_path / "reload.py").write_text(RELOAD_AND_WAIT.format(master=proc.pid, conf=conf, prefix=tmp_path))
    reload = f"{sys.executable} {tmp_path / 'reload.py'}"
    yield satellite, port, map_file, reload
    proc.terminate()
    proc.wait(10)


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
    def nginx_proxies_itself():                            # not satellite answering a session not yet in the map
        status, _, body = through_nginx(satellite, port, mine["alias"], "/headers?token=" + mine["token"])
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
                                       {"Authorization": "token " + mine["token"]})
    assert status == 200 and headers.get_all("Set-Cookie") == [f"bomb=x; Domain={mine_host}; Path=/"]
    assert headers["Clear-Site-Data"] is None

"""Attacks on the front (contrib/nginx-satellite.conf, contrib/haproxy-satellite.cfg, `export --watch`), from a
red team's review: each test states a boundary the README promises and attacks it with the real nginx / HAProxy
on loopback, configured exactly as contrib says (tests/fronts.py adapts only addresses, ports, paths and the
domain). Each one failed before its fix (the docstrings tell what the attack did then); a failure now is a
regression."""
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
import urllib.parse

import pytest

from conftest import DOMAIN, ROOT, SatelliteServer, start_group, stop_group, wait_for
from fronts import (FRONT, SECRET, front, haproxy_alone, start_haproxy, start_nginx, stop_front,  # noqa: F401
                    write_front_secret)
from test_front import app_headers, direct, mapped_and_served, served_by_front


# --- helpers ------------------------------------------------------------------------------------------------

def browser_cookie_domain(set_cookie):
    """The Domain a browser applies to this Set-Cookie (RFC 6265 section 5.2, as Chromium and Firefox parse
    it): attributes split on ';', each name and value trimmed of spaces and tabs, names compared without
    case, the last Domain attribute wins, a leading dot ignored. None: a host-only cookie."""
    domain = None
    for attribute in set_cookie.split(";")[1:]:
        name, _, value = attribute.partition("=")
        if name.strip(" \t").lower() == "domain":
            value = value.strip(" \t").lstrip(".").lower()
            domain = value or None
    return domain


def make_self_signed(directory):
    """A certificate for *.DOMAIN that no CA the front trusts has signed: what a local user can make."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    f"/CN=*.{DOMAIN}", "-addext", f"subjectAltName=DNS:*.{DOMAIN},DNS:{DOMAIN}",
                    "-keyout", str(directory / "impostor-key.pem"), "-out", str(directory / "impostor.pem")],
                   check=True, capture_output=True)
    return directory / "impostor.pem", directory / "impostor-key.pem"


class Impostor:
    """A local user's TLS listener on satellite's data-plane address (free while satellite restarts or is
    down: any user may bind a port above 1023 on 127.0.0.1). It records every request head it receives."""

    def __init__(self, directory):
        cert, key = make_self_signed(directory)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.heads = []
        self.running = True
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        self.sock.settimeout(0.2)
        while self.running:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self.handle, args=(raw,), daemon=True).start()

    def handle(self, raw):
        try:
            raw.settimeout(5)
            conn = self.context.wrap_socket(raw, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    break
                head += data
            self.heads.append(head.decode("latin-1"))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            conn.close()
        except (OSError, ssl.SSLError):
            raw.close()

    def stop(self):
        self.running = False
        self.sock.close()


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def many_sessions(satellite, app, count):
    """`count` live sessions, each redeemed by `app` (the compute node's address and port)."""
    for _ in range(count):
        satellite.mapped_session(app)


def restart_haproxy(started):
    """Restart HAProxy (an upgrade, a reboot): it loads the map file as it is now."""
    stop_group(started.proc, signal.SIGUSR1)
    log = open(started.workdir / "haproxy.log", "a")
    started.socket.unlink(missing_ok=True)
    started.proc = start_group(["haproxy", "-db", "-f", str(started.workdir / "haproxy.cfg")], stdout=log,
                               stderr=log)
    log.close()
    wait_for(lambda: started.socket.exists(), what="HAProxy's runtime API socket")


def haproxy_map_entries(started):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(started.socket))
        s.sendall(f"show map {started.map_file}\n".encode())
        text = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            text += data
    return [line for line in text.decode().splitlines() if line.strip()]


# --- 1. an app sets cookies for the whole domain through the front --------------------------------------------

TAB_BEFORE_DOMAIN = ";\tDomain=DOMAIN; Path=/"          # nginx's proxy_cookie_domain misses it (README: what remains)
DOMAIN_SPELLINGS = ["; Domain =DOMAIN; Path=/",                  # a space before '=' (HAProxy's old rule missed it)
                    TAB_BEFORE_DOMAIN,
                    "; Path=/; Domain=DOMAIN; Domain =DOMAIN",   # two: browsers take the last
                    "; domain=DOMAIN;Domain\t=DOMAIN; DOMAIN=DOMAIN ; Path=/;  Domain = DOMAIN"]


def test_an_apps_cookie_stays_on_its_own_host_through_the_front(front, new_app):
    """README (security model, session A's app): it cannot "set cookies for the whole domain from its
    answers (an app's Domain= is removed by satellite and by the fronts)". Satellite alone holds
    (host_only_cookie trims the attribute name). Through the front, a Domain attribute spelled the way RFC
    6265 parsers accept it (whitespace around the name, several of them) must not survive either, or the
    browser stores a cookie for the whole domain: it rides along to every sibling session (cookie bomb: B
    answers 431; fixing cookies on B's app), and unlike document.cookie it can be HttpOnly. HAProxy removes
    every spelling (a Set-Cookie with more than three is dropped); nginx's proxy_cookie_domain does not see a
    tab before the attribute's name and no module built into nginx can rewrite that one: README, what remains."""
    app = new_app()
    front.watch()
    link, cookie = mapped_and_served(front, app)
    served_by_front(front, link["alias"], cookie)
    host = f"{link['alias']}.{DOMAIN}"
    for attributes in DOMAIN_SPELLINGS:
        if front.kind == "nginx" and attributes == TAB_BEFORE_DOMAIN:
            continue
        value = "bomb=x" + attributes.replace("DOMAIN", DOMAIN) + "; HttpOnly; Secure"
        status, headers, _ = front.request(link["alias"], "/set-cookie?v=" + urllib.parse.quote(value),
                                           {"Cookie": cookie})
        assert status == 200
        set_cookies = headers.get_all("Set-Cookie") or []
        for set_cookie in set_cookies:
            assert browser_cookie_domain(set_cookie) in (None, host), \
                f"{front.kind} let the app set a cookie for {browser_cookie_domain(set_cookie)}: {set_cookie!r}"
        if attributes.count("=DOMAIN") + attributes.count("= DOMAIN") <= 3:
            assert [c.split(";")[0] for c in set_cookies] == ["bomb=x"], (attributes, set_cookies)   # kept


# --- 2. the front secret goes to whoever listens on satellite's data-plane port ---------------------------------

@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_the_front_secret_goes_only_to_satellite(kind, tmp_path, certs):
    """README: "a front on this host must send front-secret (X-Satellite-Front; ...), which is never passed to
    apps" — it is what tells the front from every other local user at 127.0.0.1. nginx-satellite.conf sends
    it to https://127.0.0.1:8443 without proxy_ssl_verify (nginx's default: off), so when satellite is not
    listening there (a restart, an upgrade, a crash, or a local user who binds 8443 first at boot), any local
    user who binds the port gets the secret with the first request: then they speak for clients
    (X-Forwarded-For: limits, token-failure counting, audit) and, with SSO, for any signed-in user
    (trusted-user-header). HAProxy's `verify required ca-file ... sni` refuses such a listener; nginx now has
    proxy_ssl_verify on with the CA, and the session's host as the name."""
    impostor = Impostor(tmp_path)
    try:
        stand_in = types.SimpleNamespace(port=impostor.port,
                                         context=ssl.create_default_context(cafile=str(certs / "ca.pem")))
        workdir = tmp_path / kind
        workdir.mkdir()
        started = (start_nginx if kind == "nginx" else start_haproxy)(stand_in, workdir, certs)
        try:
            wait_for(lambda: port_open(started.port), what=f"{kind} to listen")
            sock = started.tls_socket(f"any-words-here.{DOMAIN}")
            sock.settimeout(10)
            sock.sendall(f"GET / HTTP/1.1\r\nHost: any-words-here.{DOMAIN}:{started.port}\r\n"
                         f"Connection: close\r\n\r\n".encode())
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            sock.close()
            time.sleep(0.5)
        finally:
            stop_group(started.proc, signal.SIGTERM if kind == "nginx" else signal.SIGUSR1)
        leaked = [head for head in impostor.heads if SECRET in head]
        assert not leaked, f"{kind} sent X-Satellite-Front to a listener with an unverified certificate:\n{leaked[0]}"
    finally:
        impostor.stop()


@pytest.fixture(params=["nginx", "haproxy"])
def big_front(request, fresh_satellite, tmp_path, certs):
    """`front` (tests/fronts.py), for a site with more live sessions than one login node's default ceiling
    (max-live-per-source = 500): several login nodes, or a raised ceiling."""
    write_front_secret(tmp_path / "front-secret")
    satellite = fresh_satellite("--trusted-fronts", f"{FRONT}/32", "--control-listen", "127.0.0.1:0",
                                "--front-secret", str(tmp_path / "front-secret"), "--max-live-per-source", "5000")
    workdir = tmp_path / request.param
    workdir.mkdir()
    started = (start_nginx if request.param == "nginx" else start_haproxy)(satellite, workdir, certs)
    yield started
    stop_front(started)


# --- 3. HAProxy's runtime update fails once the map is large: revoked sessions stay at the front ------------------

def test_a_revoked_session_leaves_the_front_with_many_live_sessions(big_front, new_app):
    """README: "new requests and new WebSockets are refused within a second" of a revoke (gone from the front's
    map with export --watch). push_haproxy_map used to send the whole map as ONE runtime-API payload (`add map
    @N FILE <<`), which HAProxy limits to its buffer (tune.bufsize, 16 KiB by default; contrib leaves it
    commented out); it now sends one short `add map` line per entry. A site with a few hundred live sessions: after HAProxy restarts it loads the whole file,
    and from then on every push is cut off (connection reset); the watcher logs 'failed' and retries for ever,
    HAProxy keeps the map it loaded, and a revoked (released, expired, ended) session's cookie keeps reaching
    its app at the front — until HAProxy restarts. (Between ~16 and ~32 KiB the payload is dropped silently,
    `add map` answers nothing, and an EMPTY map is committed: see the next test.)"""
    front = big_front
    app = new_app()
    many_sessions(front.satellite, app, 400)    # ~45 KiB of map: over 32 KiB, always cut off (old push)
    front.watch()
    link, cookie = mapped_and_served(front, app)
    if front.kind == "haproxy":
        restart_haproxy(front)                                       # loads the current file, every session in it
    served_by_front(front, link["alias"], cookie)
    if front.kind == "haproxy":
        assert any(f" {link['alias']}." in line for line in haproxy_map_entries(front))   # it loaded the file
    revoked = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "revoke", "--db", str(front.satellite.db),
                              link["alias"]], capture_output=True, text=True, timeout=30)
    assert revoked.returncode == 0, revoked.stderr
    wait_for(lambda: f"{link['alias']}." not in front.map_file.read_text(), what="the watcher to export the revoke")
    front.settle()
    time.sleep(1.2)                                                  # the documented bound is 1 s
    reached = []
    for _ in range(6):          # before the watcher's retry (2 s after a failure): the push the revoke caused
        status, _, _ = front.request(link["alias"], "/headers", {"Cookie": cookie})
        if status != 410:
            reached.append(status)
        time.sleep(0.05)
    assert not reached, (f"{front.kind}: 1.2-1.8 s after the revoke its cookie still reached the app "
                         f"{len(reached)} times of 6 ({reached[:3]}); watcher log tail: {front.watch_log()[-300:]}")


def test_the_haproxy_front_holds_the_exported_map_with_many_sessions(haproxy_alone, new_app):
    """(Before the fix) with ~150-300 live sessions the payload exceeded HAProxy's buffer and was dropped
    without an error:
    `add map` answers nothing (taken for success), `commit map` commits the empty new version, and HAProxy
    decides nothing by itself any more (every request goes to satellite, the scale-out silently gone; the
    watcher logs success). Fails safe, but the README's "a new map reaches the front within a second" was
    false and nothing said so. Now the push counts HAProxy's entries after the commit."""
    front = haproxy_alone
    app = new_app()
    front.watch()
    many_sessions(front.satellite, app, 200)
    link, cookie = mapped_and_served(front, app)
    time.sleep(3)                                                    # the watcher pushes within a second
    assert len(haproxy_map_entries(front)) == front.map_file.read_text().count("\n") - 1, \
        f"HAProxy holds {len(haproxy_map_entries(front))} entries, the exported file {front.map_file.read_text().count(chr(10)) - 1}"
    assert direct(front, link["alias"], cookie)


# --- 4. nginx: one long host name stops every later map update ------------------------------------------------

LONG_DOMAIN = "apps.hpc.example-univ.edu"        # 25 characters; README's example, satellite.example.edu, is 21


class LongDomainSatellite(SatelliteServer):
    def command(self):
        return [LONG_DOMAIN if arg == DOMAIN else arg for arg in super().command()]


def test_a_long_alias_does_not_freeze_the_nginx_front(tmp_path, new_app, monkeypatch):
    """nginx-satellite.conf includes the exported file in `map $host ... { hostnames; }` with nginx's default
    map_hash_bucket_size (64: one CPU cache line), which holds host names of at most 46 characters. An alias
    is 11-23 characters (three words of 3-7 letters), so under any domain longer than 21 characters some
    aliases make a host name nginx cannot hash: the reload the watcher runs then fails ("could not build
    map_hash, you should increase map_hash_bucket_size: 64"), nginx keeps its OLD map, and it keeps it while
    that session lives (hours to days). Every revoke, release, end or cookie-key rotation in that time is
    ignored at the front: the old cookies keep reaching their apps. Under a 25-character domain about one
    alias in four is long enough. Now contrib sets map_hash_bucket_size 128 (names up to 110 characters:
    tests/test_contrib.py checks nginx's limit) and export warns for longer domains."""
    import fronts
    certs = tmp_path / "long-certs"
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(certs), LONG_DOMAIN], check=True)
    write_front_secret(tmp_path / "front-secret")
    workdir = tmp_path / "satellite"
    workdir.mkdir()
    satellite = LongDomainSatellite(certs, workdir, ("--trusted-fronts", f"{FRONT}/32", "--control-listen",
                                                     "127.0.0.1:0", "--front-secret", str(tmp_path / "front-secret")))
    satellite.start()
    monkeypatch.setattr(fronts, "DOMAIN", LONG_DOMAIN)
    (tmp_path / "nginx").mkdir()
    started = start_nginx(satellite, tmp_path / "nginx", certs)
    try:
        app = new_app()
        short = long = None
        for _ in range(400):                     # aliases are random: draw until one of each kind
            link = satellite.getlink()
            if len(link["alias"]) <= 18 and short is None:
                short = link
            elif len(f"{link['alias']}.{LONG_DOMAIN}") >= 47 and long is None:
                long = link
            if short and long:
                break
        assert short and long
        status, fields = satellite.api("redeem", source=app.host, key=short["key"], port=app.port)
        assert status == 200, fields
        started.watch()
        wait_for(lambda: f"{short['alias']}." in started.map_file.read_text(), what="the short alias exported")
        status, headers, _ = started.request(short["alias"], "/?token=" + short["token"])
        assert status == 200
        cookie = headers["Set-Cookie"].split(";")[0]
        served_by_front(started, short["alias"], cookie)
        # another user's job redeems a session whose alias happens to be long
        status, fields = satellite.api("redeem", source=app.host, key=long["key"], port=app.port)
        assert status == 200, fields
        wait_for(lambda: f"{long['alias']}." in started.map_file.read_text(), what="the long alias exported")
        time.sleep(1)
        # the first session is revoked
        revoked = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "revoke", "--db", str(satellite.db),
                                  short["alias"]], capture_output=True, text=True, timeout=30)
        assert revoked.returncode == 0, revoked.stderr
        wait_for(lambda: f"{short['alias']}." not in started.map_file.read_text(), what="the revoke exported")
        time.sleep(1.5)                                                   # the documented bound is 1 s
        status, _, _ = started.request(short["alias"], "/headers", {"Cookie": cookie})
        assert status == 410, (f"nginx still sends the revoked session's cookie to its app ({status}); "
                               f"watcher: {started.watch_log()[-400:]}")
    finally:
        stop_front(started)
        satellite.stop()


def test_an_ended_sessions_cookie_never_reaches_the_next_job_on_its_port(big_front, tmp_path):
    """The consequence of the stale map above, across users: session A's job ends (released, revoked, its
    time over) and the scheduler gives the node to user Y, whose app listens on the same port (a fixed
    default such as Jupyter's, or a port from the same range). A's holder, with A's old cookie, is sent by
    the front to A's old address and port: Y's app, without any credential of Y's."""
    from conftest import NODE, App
    front = big_front
    first = App(tmp_path, NODE, {"WHOSE_APP": "user X"})
    try:
        many_sessions(front.satellite, first, 400)
        front.watch()
        link, cookie = mapped_and_served(front, first)
        if front.kind == "haproxy":
            restart_haproxy(front)                               # a reload: a certificate renewal, an upgrade
        served_by_front(front, link["alias"], cookie)
        key = link["key"]
        status, fields = front.satellite.api("release", key=key, source=NODE)   # A's job ends
        assert status == 200, fields
        wait_for(lambda: f"{link['alias']}." not in front.map_file.read_text(), what="the release exported")
        port = first.port
    finally:
        first.stop()
    time.sleep(1.2)
    second = App(tmp_path, NODE, {"WHOSE_APP": "user Y"}, port=port)   # Y's job, the same node and port
    try:
        status, _, body = front.request(link["alias"], "/env?name=WHOSE_APP", {"Cookie": cookie})
        assert body != b"user Y", f"{front.kind}: session {link['alias']} ended; its old cookie reached user Y's app"
        assert status == 410, (status, body[:200])
    finally:
        second.stop()


# --- 5. what satellite would judge or strip, the front must not pass to the app ---------------------------------

def raw_request(front, host, lines, body=b""):
    """One request sent as is (repeated fields, odd names) through the front; (status, body)."""
    sock = front.tls_socket(host)
    sock.settimeout(10)
    try:
        closing = [] if any(line.lower().startswith("connection:") for line in lines) else ["Connection: close"]
        sock.sendall(("\r\n".join(lines + closing) + "\r\n\r\n").encode() + body)
        answer = b""
        while len(answer) < 1 << 20:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except OSError:
        pass
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, body


def test_the_front_forwards_to_apps_only_what_satellite_would(front, new_app):
    """Satellite (forwarded_request_head) drops the client's forwarding fields and every header named in
    Connection, answers 400 to look-alikes with '_' of the fields it sets (X_Satellite_Front), and judges a
    request's Host, Origin and Sec-Fetch-Site by one value. A front that passes them on, or picks another
    value than satellite (HAProxy takes the last of repeated values), lets a client tell the app what
    satellite would not (its address, its port, a header satellite strips) or decide a request from
    elsewhere at the front."""
    app = new_app()
    front.watch()
    link, cookie = mapped_and_served(front, app)
    served_by_front(front, link["alias"], cookie)
    host = f"{link['alias']}.{DOMAIN}"
    own = f"https://{host}:{front.port}"
    status, body = raw_request(front, host, [
        "GET /headers HTTP/1.1", f"Host: {host}:{front.port}", f"Cookie: {cookie}", "X-Real-IP: 192.0.2.9",
        "X-Forwarded-Port: 1", "X-Hop-Only: secret-of-the-hop", "Connection: X-Hop-Only, close"])
    if status == 200:
        got = app_headers(body)
        # nginx passes a header the client names in Connection (it drops only those it knows, and satellite
        # behind it never sees the client's Connection): no boundary, the client may send it unnamed
        for name in ("x-real-ip", "x-forwarded-port") + (("x-hop-only",) if front.kind == "haproxy" else ()):
            assert name not in got, (front.kind, name, got)
    for name in ("X_Satellite_Front", "X_Forwarded_For", "X_Real_IP"):
        status, body = raw_request(front, host, ["GET /headers HTTP/1.1", f"Host: {host}:{front.port}",
                                                 f"Cookie: {cookie}", f"{name}: {SECRET}"])
        assert status in (200, 400), (front.kind, name, status)
        if status == 200:
            got = app_headers(body)
            assert name.lower() not in got and SECRET not in got.values(), (front.kind, name, got)
    post = ["POST /upload HTTP/1.1", f"Host: {host}:{front.port}", f"Cookie: {cookie}", "Content-Length: 2"]
    for repeated in ([f"Origin: https://evil.{DOMAIN}, {own}"],
                     [f"Origin: https://evil.{DOMAIN}", f"Origin: {own}"],
                     [f"Origin: {own}", "Sec-Fetch-Site: cross-site", "Sec-Fetch-Site: same-origin"],
                     [f"Origin: {own}", "Sec-Fetch-Site: cross-site, same-origin"]):
        status, body = raw_request(front, host, post[:3] + repeated + post[3:], b"ok")
        assert status in (400, 403), (front.kind, repeated, status, body[:200])
    other = front.satellite.mapped_session(app)
    status, body = raw_request(front, host, ["GET /headers HTTP/1.1",
                                             f"Host: {other['alias']}.{DOMAIN}, {host}:{front.port}",
                                             f"Cookie: {cookie}"])
    assert status == 400 or (status != 200 and b"Hello" not in body), (front.kind, status, body[:200])


def test_a_failed_haproxy_push_empties_its_map_rather_than_keeping_the_old_one(haproxy_alone, new_app):
    """When HAProxy cannot be given the new map, the watcher must not leave it deciding with the old one
    (which may hold a revoked session): it clears HAProxy's map, so every request goes to satellite, and says
    so; the next push that succeeds brings the front back."""
    import satellite as product
    front = haproxy_alone
    app = new_app()
    front.watch()
    link, cookie = mapped_and_served(front, app)
    served_by_front(front, link["alias"], cookie)
    front.stop()                                          # the watcher: this test pushes by itself
    good = front.map_file.read_text()
    with pytest.raises(ValueError):                       # a line HAProxy's runtime API cannot carry
        product.push_haproxy_map(str(front.socket), str(front.map_file), good + "odd.host 127.0.0.1\t1 -\n")
    assert haproxy_map_entries(front) == []
    status, _, _ = front.request(link["alias"], "/headers", {"Cookie": cookie})
    assert status == 200 and not direct(front, link["alias"], cookie)         # satellite serves it now
    product.push_haproxy_map(str(front.socket), str(front.map_file), good)
    assert direct(front, link["alias"], cookie)

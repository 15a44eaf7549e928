"""Operating satellite: refresh, admin commands, audit log, metrics, limits, HSTS and redirects."""
import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from conftest import NODE, ROOT, start_group, stop_group, wait_for
from test_proxy import open_websocket


def admin(satellite, *args):
    """An admin command against the server's database (and its audit log, as -c FILE would give)."""
    audit = ["--audit-log", str(satellite.workdir / "audit.log")] if args[0] in ("refresh", "revoke") else []
    return subprocess.run([sys.executable, str(ROOT / "satellite.py"), *args, "--db", str(satellite.db), *audit],
                          capture_output=True, text=True, timeout=60)


def audit_lines(satellite):
    path = satellite.workdir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def ops_satellite(fresh_satellite):
    def make(*extra):
        return fresh_satellite("--audit-log", "audit.log", *extra)
    return make


# refresh ---------------------------------------------------------------------------

def test_refresh_expires_unredeemed_links(ops_satellite):
    satellite = ops_satellite("--redeem-within", "1")
    link = satellite.getlink()
    time.sleep(1.2)
    out = admin(satellite, "refresh").stdout
    assert "expired 1 unredeemed links and 0 sessions" in out
    assert satellite.api("status", key=link["key"])[1]["state"] == "ended"
    assert satellite.request(satellite.host(link["alias"]), "/?token=" + link["token"])[0] == 410
    assert [l for l in audit_lines(satellite) if l["event"] == "expire"][0]["alias"] == link["alias"]


def test_refresh_ends_sessions_whose_app_is_gone(ops_satellite, new_app):
    satellite = ops_satellite()
    app = new_app()
    link = satellite.mapped_session(app)
    healthy = satellite.mapped_session(new_app())
    assert "probed 2 apps, 0 not answering" in admin(satellite, "refresh", "--dead-after", "2").stdout
    app.stop()
    assert "1 not answering, 0 ended" in admin(satellite, "refresh", "--dead-after", "2").stdout
    assert "app_not_answering_since=" in admin(satellite, "show", link["alias"]).stdout
    time.sleep(2.1)
    assert "1 not answering, 1 ended as gone" in admin(satellite, "refresh", "--dead-after", "2").stdout
    assert satellite.api("status", key=link["key"])[1]["state"] == "ended"
    assert satellite.api("status", key=healthy["key"])[1]["state"] == "mapped"
    assert [l["alias"] for l in audit_lines(satellite) if l["event"] == "dead"] == [link["alias"]]


def test_refresh_dry_run_changes_nothing_and_prune_frees_old_rows(ops_satellite, new_app):
    satellite = ops_satellite()
    app = new_app()
    link = satellite.mapped_session(app)
    satellite.api("release", key=link["key"])
    app2 = new_app()
    satellite.mapped_session(app2)
    app2.stop()
    time.sleep(1.1)
    with sqlite3.connect(satellite.db) as db:
        before = list(db.iterdump())
    out = admin(satellite, "refresh", "--dry-run", "--dead-after", "0", "--retention", "1").stdout
    assert out.startswith("refresh (dry run") and "1 ended as gone" in out and "pruned 1" in out
    with sqlite3.connect(satellite.db) as db:
        assert list(db.iterdump()) == before
    out = admin(satellite, "refresh", "--dead-after", "0", "--retention", "1").stdout
    assert "pruned 1" in out
    assert satellite.api("status", key=link["key"])[0] == 404          # the row is gone


def test_concurrent_refreshes_beside_live_traffic(ops_satellite, new_app):
    """Two refreshes at once while serve proxies: every gone app's session ends exactly once."""
    satellite = ops_satellite()
    dying_apps = [new_app() for _ in range(3)]
    dying = [satellite.mapped_session(a) for a in dying_apps]
    live = satellite.mapped_session(new_app())
    errors, stop = [], threading.Event()

    def traffic():
        conn = satellite.connection(satellite.host(live["alias"]))
        for _ in range(2000):                               # bounded; stopped early when refreshes finish
            if stop.is_set():
                break
            conn.request("GET", "/headers", headers={"Authorization": "token " + live["token"]})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(resp.status)
    worker = threading.Thread(target=traffic)
    worker.start()
    for a in dying_apps:
        a.stop()
    refreshes = [start_group([sys.executable, str(ROOT / "satellite.py"), "refresh", "--db", str(satellite.db),
                              "--dead-after", "0", "--audit-log", str(satellite.workdir / "audit.log")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=60) + (p.returncode,) for p in refreshes]
    finally:
        for refresh in refreshes:
            stop_group(refresh)
    stop.set()
    worker.join()
    assert all(code == 0 for _, _, code in results), results
    assert errors == []
    dead = sorted(l["alias"] for l in audit_lines(satellite) if l["event"] == "dead")
    assert dead == sorted(d["alias"] for d in dying)
    assert satellite.api("status", key=live["key"])[1]["state"] == "proxied"


# scheduler feed --------------------------------------------------------------------

def test_jobstate_feed_endpoint_and_refresh_command(ops_satellite):
    satellite = ops_satellite("--jobstates-from", "127.0.0.1/32")
    pending, held = satellite.getlink(), satellite.getlink()
    satellite.api("state", key=pending["key"], state="queued", jobid="4242")
    satellite.api("state", key=held["key"], state="queued", jobid="4243")
    status, fields = satellite.api("jobstates", method="POST", jobstates="4242 PENDING\n4243 HELD\n9999 RUNNING")
    assert status == 200 and fields == {"jobs": "3", "sessions": "2", "ended": "0"}
    assert satellite.api("jobstates", source=NODE, method="POST", jobstates="4242 RUNNING")[0] == 403
    _, _, page = satellite.request(satellite.host(pending["alias"]), "/?token=" + pending["token"])
    assert b"job 4242 is pending" in page
    _, _, page = satellite.request(satellite.host(held["alias"]), "/?token=" + held["token"])
    assert b"The scheduler holds job 4243" in page
    out = admin(satellite, "refresh", "--jobstate-command", "printf '4242 RUNNING\\n'").stdout
    assert "1 job states" in out
    assert "jobstate=RUNNING" in admin(satellite, "show", pending["alias"]).stdout


# admin commands ------------------------------------------------------------------------

def test_admin_list_show_stats(ops_satellite, app):
    satellite = ops_satellite()
    mapped = satellite.mapped_session(app)
    queued = satellite.getlink()
    rows = json.loads(admin(satellite, "list", "--json").stdout)
    assert {r["alias"] for r in rows} == {mapped["alias"], queued["alias"]}
    assert [r["alias"] for r in json.loads(admin(satellite, "list", "--state", "mapped", "--json").stdout)] \
        == [mapped["alias"]]
    table = admin(satellite, "list").stdout
    assert mapped["alias"] in table and f"{app.host}:{app.port}" in table
    shown = admin(satellite, "show", mapped["alias"]).stdout
    assert f"target={app.host}:{app.port}" in shown and "issued_to=127.0.0.1" in shown
    assert mapped["token"] not in shown + table and mapped["key"] not in shown + table
    stats = admin(satellite, "stats").stdout
    assert "queued 1" in stats and "mapped 1" in stats and "issue 2" in stats and "redeem 1" in stats
    missing = admin(satellite, "show", "no-such-alias")
    assert missing.returncode == 1 and "no session" in missing.stderr
    nodb = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "list", "--db", "/nonexistent.db"],
                          capture_output=True, text=True)
    assert nodb.returncode != 0 and "no database" in nodb.stderr


def test_revoke_cuts_a_live_websocket_and_the_link(ops_satellite, app):
    satellite = ops_satellite()
    link = satellite.mapped_session(app)
    ws = open_websocket(satellite, link)
    ws.send("before")
    assert ws.recv() == "before"
    out = admin(satellite, "revoke", link["alias"])
    assert out.returncode == 0 and f"revoked {link['alias']}" in out.stdout
    ws.settimeout(20)
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        ws.recv()
    assert satellite.request(satellite.host(link["alias"]), "/?token=" + link["token"])[0] == 410
    assert "already ended" in admin(satellite, "revoke", link["alias"]).stdout
    revokes = [l for l in audit_lines(satellite) if l["event"] == "revoke"]
    assert len(revokes) == 1 and revokes[0]["alias"] == link["alias"]


# audit log ----------------------------------------------------------------------------------

def test_audit_log_has_every_event_and_no_secret(ops_satellite, app):
    satellite = ops_satellite()
    link = satellite.mapped_session(app)
    satellite.api("state", key=link["key"], state="running", jobid="77")
    satellite.request(satellite.host(link["alias"]), "/?token=wrong")
    satellite.request(satellite.host(link["alias"]), "/")
    satellite.api("getlink", source="127.0.0.5")
    satellite.api("release", key=link["key"])
    lines = audit_lines(satellite)
    events = [l["event"] for l in lines]
    assert events[:3] == ["issue", "redeem", "state"] and events[-1] == "release"
    denied = [l for l in lines if l["event"] == "denied"]
    assert {d["reason"] for d in denied} >= {"wrong token", "no token"}
    assert any("not allowed from 127.0.0.5" in d["reason"] for d in denied)
    for line in lines:
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", line["time"]) and "source" in line
    redeem = lines[1]
    assert redeem["alias"] == link["alias"] and redeem["source"] == NODE and redeem["target"] == f"{NODE}:{app.port}"
    text = (satellite.workdir / "audit.log").read_text()
    assert link["token"] not in text and link["key"] not in text


# metrics -------------------------------------------------------------------------------------

def scrape(satellite, source="127.0.0.1"):
    status, _, body = satellite.request("127.0.0.1", "/metrics", source=source)
    if status != 200:
        return status, {}
    return status, {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_metrics_parse_and_match_what_happened(ops_satellite, app, certs):
    satellite = ops_satellite("--metrics-from", "127.0.0.1/32")
    links = [satellite.mapped_session(app) for _ in range(3)]      # two get traffic, one stays mapped
    satellite.getlink()
    host = satellite.host(links[0]["alias"])
    for _ in range(5):
        assert satellite.request(host, "/download?size=1000", headers={"Authorization": "token " + links[0]["token"]})[0] == 200
    satellite.request(host, "/?token=wrong")
    ws = open_websocket(satellite, links[1])
    ws.send("x")
    ws.recv()
    status, samples = scrape(satellite)
    assert status == 200
    assert samples[("satellite_sessions", (("state", "mapped"),))] == 1
    assert samples[("satellite_sessions", (("state", "proxied"),))] == 2
    assert samples[("satellite_sessions", (("state", "queued"),))] == 1
    assert samples[("satellite_link_events_total", (("event", "issue"),))] == 4
    assert samples[("satellite_link_events_total", (("event", "redeem"),))] == 3
    assert samples[("satellite_websockets_open", ())] == 1
    assert samples[("satellite_denied_total", (("reason", "wrong_token"),))] == 1
    assert samples[("satellite_sent_bytes_total", ())] >= 5000
    assert samples[("satellite_requests_total", (("code", "2xx"),))] >= 5
    assert samples[("satellite_request_duration_seconds_count", ())] == sum(
        v for (name, labels), v in samples.items() if name == "satellite_requests_total")
    enddate = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(certs / "cert.pem")],
                             capture_output=True, text=True).stdout.strip().split("=", 1)[1]
    expected = time.mktime(time.strptime(enddate, "%b %d %H:%M:%S %Y %Z")) - time.timezone
    assert samples[("satellite_certificate_expiry_timestamp_seconds", ())] == expected
    ws.close()
    wait_for(lambda: scrape(satellite)[1][("satellite_websockets_open", ())] == 0, what="websocket gauge")
    assert scrape(satellite, source=NODE)[0] == 403
    admin(satellite, "refresh")
    assert scrape(satellite)[1][("satellite_refresh_runs_total", (("outcome", "ok"),))] == 1


# limits ----------------------------------------------------------------------------------------

def test_getlink_rate_limit_and_live_quota(ops_satellite):
    satellite = ops_satellite("--getlink-rate", "3/1m")
    for _ in range(3):
        satellite.getlink()
    status, headers, body = satellite.request("127.0.0.1", "/api/getlink")
    assert status == 429 and int(headers["Retry-After"]) > 0 and b"too many links" in body

    quota = ops_satellite("--max-live-per-source", "2")
    first, _ = quota.getlink(), quota.getlink()
    status, headers, body = quota.request("127.0.0.1", "/api/getlink")
    assert status == 429 and b"2 live sessions" in body and headers["Retry-After"]
    quota.api("release", key=first["key"])
    assert quota.api("getlink")[0] == 201


def test_token_guessing_is_rate_limited_but_never_the_right_token(ops_satellite, app):
    satellite = ops_satellite("--token-failures", "5/1m")
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    for _ in range(5):
        assert satellite.request(host, "/?token=guess")[0] == 403
    status, headers, _ = satellite.request(host, "/?token=guess")
    assert status == 429 and int(headers["Retry-After"]) > 0          # guessing stops here
    assert satellite.request(host, "/?token=" + link["token"])[0] == 200   # the right token, same address: served


# HSTS and the redirect listener -----------------------------------------------------------------

def test_hsts_on_pages_and_proxied_responses(ops_satellite, app):
    satellite = ops_satellite()
    link = satellite.mapped_session(app)
    _, headers, _ = satellite.request(satellite.host(link["alias"]), "/?token=" + link["token"])
    assert headers["Strict-Transport-Security"] == "max-age=31536000"
    _, headers, _ = satellite.request("127.0.0.1", "/api/status?key=x")
    assert headers["Strict-Transport-Security"] == "max-age=31536000"


def test_http_listener_only_redirects(ops_satellite, app):
    satellite = ops_satellite("--redirect-listen", "127.0.0.1:0")
    port = int(re.search(r"redirecting http://127\.0\.0\.1:(\d+)", satellite.log_text()).group(1))
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    result = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                             "--resolve", f"{host}:{port}:127.0.0.1", f"http://{host}:{port}/lab?x=1"],
                            capture_output=True, text=True)
    assert result.stdout == f"301 https://{host}:{satellite.port}/lab?x=1"
    # CRLF injection: raw CR in the target is refused; encoded, it stays encoded in Location
    before = len(app.seen())
    for target, expected in [(b"/a\rSet-Cookie: x=1", b"HTTP/1.1 400 "), (b"/a%0d%0aSet-Cookie:x=1", b"HTTP/1.1 301 ")]:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
            answer = sock.recv(4096)
        assert answer.startswith(expected), answer
        head = answer.split(b"\r\n\r\n")[0]
        assert b"Set-Cookie" not in [line.split(b":")[0] for line in head.split(b"\r\n")]
    assert len(app.seen()) == before


# SSO front ---------------------------------------------------------------------------------------

FRONT = "127.0.0.5"                  # the SSO front's own address; it names its clients in X-Forwarded-For
FRONT_SECRET = "front-secret-" + "5" * 32


@pytest.fixture
def front_satellite(ops_satellite, tmp_path):
    """A satellite behind a front on this host (loopback): the front proves itself with a secret."""
    secret = tmp_path / "front-secret"
    secret.write_text(FRONT_SECRET + "\n")
    secret.chmod(0o600)
    return lambda *extra: ops_satellite("--trusted-fronts", f"{FRONT}/32", "--front-secret", str(secret), *extra)


def through_front(satellite, host, target, user=None, client="198.51.100.7", **headers):
    headers = dict(headers, **{"X-Forwarded-For": client, "X-Satellite-Front": FRONT_SECRET})
    if user:
        headers["X-Remote-User"] = user
    return satellite.request(host, target, headers=headers, source=FRONT)


def test_sso_binds_a_session_to_its_first_user(front_satellite, app):
    satellite = front_satellite("--trusted-user-header", "X-Remote-User")
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    target = "/headers?token=" + link["token"]
    before = len(app.seen())
    # no signed-in user (no header, or a header from an address that is not a front): refused
    assert through_front(satellite, host, target)[0] == 403
    assert satellite.request(host, target, headers={"X-Remote-User": "alice"}, source="127.0.0.4")[0] == 403
    # alice through the front: allowed, and now the session is hers
    status, _, body = through_front(satellite, host, target, "alice")
    assert status == 200 and ["X-Remote-User", "alice"] in json.loads(body)["headers"]
    assert "user=alice" in admin(satellite, "show", link["alias"]).stdout
    # bob has the token but not the session; alice without the token does not get in either
    status, _, body = through_front(satellite, host, target, "bob")
    assert status == 403 and b"belongs to another user" in body
    assert through_front(satellite, host, "/headers", "alice")[0] == 403
    assert len(app.seen()) == before + 1
    denied = [l for l in audit_lines(satellite) if l["event"] == "denied" and l.get("user") == "bob"]
    assert denied and denied[0]["reason"] == "This session belongs to another user."
    assert denied[0]["source"] == "198.51.100.7"                       # the client, not the front


def test_sso_user_header_look_alikes_never_reach_the_app(front_satellite, app):
    """CGI/WSGI gateways fold '_' into '-': X_Remote_User from a client must not become the app's user."""
    satellite = front_satellite("--trusted-user-header", "X-Remote-User")
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    status, _, body = through_front(satellite, host, "/headers?token=" + link["token"], "alice",
                                    **{"X_Remote_User": "mallory", "X-Remote_User": "eve"})
    names = {(n.lower().replace("_", "-"), v) for n, v in json.loads(body)["headers"]}
    assert status == 200 and {v for n, v in names if n == "x-remote-user"} == {"alice"}
    # a request naming two users is believed for neither
    status, _, _ = through_front(satellite, host, "/headers?token=" + link["token"], "alice", **{"x-remote-user": "eve"})
    assert status == 403


def test_a_front_names_its_client_and_is_never_taken_for_it(front_satellite, app):
    satellite = front_satellite()
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    assert satellite.request(host, "/?token=" + link["token"], source=FRONT,
                             headers={"X-Satellite-Front": FRONT_SECRET})[0] == 400     # no X-Forwarded-For
    # the client's own claims come first; the front's entry (last) is believed
    status, _, _ = through_front(satellite, host, "/?token=wrong", client="127.0.0.1, 203.0.113.9")
    assert status == 403
    assert [l["source"] for l in audit_lines(satellite) if l["event"] == "denied"][-1] == "203.0.113.9"
    # the API through a front: the client's address decides, so an outsider gets 403, not the front's rights
    assert satellite.request("127.0.0.1", "/api/getlink", headers={"X-Forwarded-For": "203.0.113.9",
                             "X-Satellite-Front": FRONT_SECRET}, source=FRONT)[0] == 403


def test_a_local_user_at_the_fronts_address_does_not_speak_for_clients(front_satellite, app):
    """A front on this host is loopback, which every local user can connect from: without the front's
    secret, X-Forwarded-For and the user header are the caller's own claims, and not believed."""
    satellite = front_satellite("--trusted-user-header", "X-Remote-User", "--issue-from", "127.0.0.1/32")
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    as_login_node = {"X-Forwarded-For": "127.0.0.1", "X-Remote-User": "alice"}
    assert satellite.request("127.0.0.1", "/api/getlink", headers=as_login_node, source=FRONT)[0] == 403
    assert satellite.request(host, "/headers?token=" + link["token"], headers=as_login_node, source=FRONT)[0] == 403
    status, _, body = through_front(satellite, host, "/headers?token=" + link["token"], "alice")
    assert status == 200                                                  # the real front, with its secret
    assert ["X-Satellite-Front", FRONT_SECRET] not in json.loads(body)["headers"]    # never passed to the app


def test_a_front_on_this_host_needs_its_secret(tmp_path, certs):
    result = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "serve", "--domain", "x.org", "--cert", "c",
                             "--key", "k", "--trusted-fronts", "127.0.0.5/32", "--issue-from", "10.1.0.0/24",
                             "--redeem-from", "10.2.0.0/16"], capture_output=True, text=True)
    assert result.returncode == 2 and "trusted_fronts includes loopback" in result.stderr


def test_a_front_may_not_be_in_issue_or_redeem_networks(tmp_path, certs):
    result = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "serve", "--domain", "x.org", "--cert", "c",
                             "--key", "k", "--trusted-fronts", "127.0.0.1/32"], capture_output=True, text=True)
    assert result.returncode == 2 and "issue_from (127.0.0.0/8) includes a trusted front" in result.stderr


def test_sso_settings_must_name_the_fronts(tmp_path, certs):
    result = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "serve", "--domain", "x.org", "--cert", "c",
                             "--key", "k", "--trusted-user-header", "X-Remote-User"], capture_output=True, text=True)
    assert result.returncode == 2 and "trusted_fronts" in result.stderr


# upstream TLS with a pinned certificate ------------------------------------------------------------

@pytest.fixture
def tls_app(tmp_path):
    """The echo app serving HTTPS with its own self-signed certificate."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=app", "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")],
                   check=True, capture_output=True)
    der = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "c.pem"), "-outform", "DER"],
                         capture_output=True, check=True).stdout
    proc = start_group([sys.executable, str(ROOT / "tests/apps/echo_app.py"), "--host", NODE, "--certfile",
                        str(tmp_path / "c.pem"), "--keyfile", str(tmp_path / "k.pem")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[2])
        yield port, __import__("hashlib").sha256(der).hexdigest()
    finally:
        stop_group(proc)


def test_pinned_tls_to_the_app(ops_satellite, tls_app):
    satellite = ops_satellite()
    port, fingerprint = tls_app
    good, bad, plain = satellite.getlink(), satellite.getlink(), satellite.getlink()
    colons = ":".join(fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()        # openssl's way of printing it
    assert satellite.api("redeem", source=NODE, key=good["key"], port=port, fingerprint=colons)[0] == 200
    assert satellite.api("redeem", source=NODE, key=bad["key"], port=port, fingerprint="ab" * 32)[0] == 200
    assert satellite.api("redeem", source=NODE, key=plain["key"], port=port, fingerprint="xyz")[0] == 400
    status, _, body = satellite.request(satellite.host(good["alias"]), "/headers?token=" + good["token"])
    assert status == 200 and json.loads(body)["target"].startswith("/headers")
    ws = open_websocket(satellite, good)
    ws.send("over TLS both ways")
    assert ws.recv() == "over TLS both ways"
    ws.close()
    status, _, body = satellite.request(satellite.host(bad["alias"]), "/headers?token=" + bad["token"])
    assert status == 502 and b"wrong certificate" in body
    assert "upstream=tls, pinned sha256:" + fingerprint in admin(satellite, "show", good["alias"]).stdout


def test_changes_by_other_processes_reach_the_cached_proxy_path_promptly(ops_satellite, app):
    """The proxy serves sessions from memory; a revoke by another process must still win within moments."""
    satellite = ops_satellite()
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    for _ in range(5):                                   # warm: now served from the cache
        assert satellite.request(host, "/headers?token=" + link["token"])[0] == 200
    assert admin(satellite, "revoke", link["alias"]).returncode == 0
    wait_for(lambda: satellite.request(host, "/headers?token=" + link["token"])[0] == 410, timeout=3, interval=0.05,
             what="the revoke to be seen")

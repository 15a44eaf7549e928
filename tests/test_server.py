"""TLS handling, certificate reload, restarts and configuration."""
import http.client
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from conftest import DOMAIN, LOGIN, ROOT, start_group, stop_group, wait_for


def test_plain_http_on_the_tls_port_gets_a_hint(satellite):
    result = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{satellite.port}/healthz", "-w", "%{http_code}"],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("This port speaks HTTPS") and result.stdout.endswith("400")


def test_a_silent_client_does_not_block_others(satellite):
    silent = [socket.create_connection(("127.0.0.1", satellite.port)) for _ in range(5)]
    try:
        # handshakes happen in worker threads: others are served while these say nothing
        result = satellite.curl("--max-time", "5", satellite.url(LOGIN, "/healthz"))
        assert result.stdout == "ok\n", result.stderr
    finally:
        for sock in silent:
            sock.close()


def test_http2_clients_negotiate_http11(satellite):
    result = satellite.curl("--http2", "-o", "/dev/null", "-w", "%{http_version}", satellite.url(LOGIN, "/healthz"))
    assert result.stdout == "1.1"


def test_certificate_reload_on_sighup_keeps_connections_and_refuses_a_broken_cert(fresh_satellite, tmp_path):
    live = tmp_path / "live"
    first = tmp_path / "first"
    second = tmp_path / "second"
    for directory in (first, second):
        subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(directory), DOMAIN], check=True)
    live.mkdir()
    for name in ("cert.pem", "key.pem"):
        shutil.copy(first / name, live / name)
    satellite = fresh_satellite("--cert", str(live / "cert.pem"), "--key", str(live / "key.pem"))
    first_ctx = ssl.create_default_context(cafile=str(first / "ca.pem"))
    second_ctx = ssl.create_default_context(cafile=str(second / "ca.pem"))

    def healthz(context):
        sock = context.wrap_socket(socket.create_connection(("127.0.0.1", satellite.port), 5),
                                   server_hostname=f"manage.{DOMAIN}")
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: manage.{DOMAIN}\r\n\r\n".encode())
        return sock, sock.recv(4096)

    kept, answer = healthz(first_ctx)
    assert answer.startswith(b"HTTP/1.1 200")
    for name in ("cert.pem", "key.pem"):
        shutil.copy(second / name, live / name)
    satellite.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "certificate reloaded" in satellite.log_text(), what="reload")
    # the connection opened before the reload goes on
    kept.sendall(f"GET /healthz HTTP/1.1\r\nHost: manage.{DOMAIN}\r\n\r\n".encode())
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    # new connections get the new certificate
    with pytest.raises(ssl.SSLCertVerificationError):
        healthz(first_ctx)
    assert healthz(second_ctx)[1].startswith(b"HTTP/1.1 200")
    # a broken certificate is refused; the good one stays
    (live / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    satellite.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "certificate reload failed, keeping the old certificate" in satellite.log_text(),
             what="refused reload")
    assert healthz(second_ctx)[1].startswith(b"HTTP/1.1 200")
    kept.close()


def test_sessions_mappings_and_cookies_survive_a_restart(fresh_satellite, app):
    satellite = fresh_satellite()
    mapped = satellite.mapped_session(app)
    waiting = satellite.getlink()
    host = satellite.host(mapped["alias"])
    _, headers, _ = satellite.request(host, "/?token=" + mapped["token"])
    cookie = headers["Set-Cookie"].split(";")[0]
    satellite.restart()
    status, _, body = satellite.request(host, "/", headers={"Cookie": cookie})
    assert status == 200 and b"Hello from the compute node" in body
    assert satellite.api("status", key=mapped["key"])[1]["state"] == "proxied"
    # a link issued before the restart can still be redeemed after it
    assert satellite.api("redeem", source=app.host, key=waiting["key"], port=app.port)[0] == 200
    assert satellite.request(satellite.host(waiting["alias"]), "/?token=" + waiting["token"])[0] == 200


def run_satellite(*args):
    return subprocess.run([sys.executable, str(ROOT / "satellite.py"), *args],
                          capture_output=True, text=True, timeout=30)


def test_config_file_and_flags(certs, tmp_path):
    ini = tmp_path / "satellite.ini"
    ini.write_text(f"[satellite]\ndomain = {DOMAIN}\nlisten = 127.0.0.1:0\ncert = {certs}/cert.pem\n"
                   f"key = {certs}/key.pem\ndb = {tmp_path}/s.db\nissue-from = 127.0.0.1/32\n"
                   "port-range = 2000-3000\n")
    proc = start_group([sys.executable, str(ROOT / "satellite.py"), "serve", "-c", str(ini),
                        "--port-range", "4000-5000"], stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(3)]       # a first start also logs the keys it made
        assert "cookie-key: made a new key" in lines[0] and "upstream-key: made a new key" in lines[1]
        line = lines[2]
        assert "serving https://*.sat.test on 127.0.0.1:" in line
        port = int(line.rsplit(":", 1)[1].split()[0])
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.request("GET", "/api/getlink")
        key = dict(l.split("=", 1) for l in conn.getresponse().read().decode().split())["key"]
        conn.request("GET", f"/api/redeem?key={key}&port=2500")          # outside the flag's range
        resp = conn.getresponse()
        assert resp.status == 400 and b"4000 to 5000" in resp.read()
    finally:
        stop_group(proc)


@pytest.mark.parametrize("args, message", [
    (["serve"], "domain"),
    (["serve", "--domain", "bad domain!"], "domain"),
    (["serve", "--domain", "x.org", "--cert", "c", "--key", "k", "--listen", "nowhere"], "HOST:PORT"),
    (["serve", "--domain", "x.org", "--cert", "c", "--key", "k", "--issue-from", "10.0.0.0/33"], "not a network"),
    (["serve", "--domain", "x.org", "--cert", "c", "--key", "k", "--port-range", "9-3"], "port range"),
    (["serve", "--domain", "x.org", "--cert", "c", "--key", "k", "--session-lifetime", "soon"], "duration"),
    (["serve", "--bogus"], "unrecognized arguments"),
])
def test_bad_settings_fail_clearly(args, message):
    result = run_satellite(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_certificate_fails_clearly(tmp_path):
    result = run_satellite("serve", "--domain", "x.org", "--cert", str(tmp_path / "none.pem"),
                           "--key", str(tmp_path / "none.key"), "--db", str(tmp_path / "s.db"))
    assert result.returncode == 1 and f"cert: cannot read {tmp_path}/none.pem: No such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_ini_setting_fails_clearly(tmp_path):
    ini = tmp_path / "s.ini"
    ini.write_text("[satellite]\ndomian = x.org\n")
    result = run_satellite("serve", "-c", str(ini))
    assert result.returncode == 2 and "unknown setting 'domian'" in result.stderr


def test_example_config_in_contrib_loads(certs, tmp_path):
    """The commented example is a working config: only the file paths differ on a test machine."""
    sys.path.insert(0, str(ROOT))
    import satellite
    settings = satellite.Settings.from_sources(str(ROOT / "contrib/satellite.ini"),
                                               {"cert": str(certs / "cert.pem"), "key": str(certs / "key.pem")})
    assert settings.domain == "satellite.example.edu" and settings.listen == ("::", 443)
    assert settings.redeem_within == 12 * 3600 and settings.session_lifetime == 12 * 3600
    assert satellite.address_in("10.2.3.4", settings.redeem_from)
    assert not satellite.address_in("10.1.0.9", settings.redeem_from)
    assert settings.session_url("a-b-c") == "https://a-b-c.satellite.example.edu/"

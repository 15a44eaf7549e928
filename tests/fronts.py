"""Fixtures: a real nginx and a real HAProxy running contrib's configurations in front of a real satellite,
with only addresses, ports, paths and the domain adapted, and `satellite export --watch` keeping them current.
Test modules import the fixtures they use (from fronts import nginx_front, haproxy_front)."""
import grp
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from conftest import DOMAIN, ROOT, start_group, stop_group, wait_for

FRONT = "127.0.0.5"          # the fronts connect to satellite from here (127.0.0.1 is the login node)
SECRET = "9" * 64
# the group the exported map is given: one that is not the test's own, to see it set
GROUP = "nogroup" if os.geteuid() == 0 else grp.getgrgid(os.getgid()).gr_name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export(satellite, *args):
    return subprocess.run([sys.executable, str(ROOT / "satellite.py"), "export", "--db", str(satellite.db),
                           "--domain", DOMAIN, *args], capture_output=True, text=True, timeout=60)


def adapt(text, replacements):
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text


class Front:
    """One front (nginx or HAProxy) before one satellite, and its watcher."""

    def __init__(self, kind, satellite, port, map_file, workdir):
        self.kind, self.satellite, self.port, self.map_file, self.workdir = kind, satellite, port, map_file, workdir
        self.watcher = None
        self.reloads = workdir / "reloads"           # nginx: one line per reload the watcher ran
        self.reloads.write_text("")
        self.reload_command = None
        self.socket = None

    def watch(self):
        """Start `satellite export --watch` for this front; the first map is in place when this returns."""
        args = ["--format", self.kind, "--output", str(self.map_file), "--group", GROUP, "--watch"]
        args += ["--haproxy-socket", str(self.socket)] if self.kind == "haproxy" else \
            ["--reload-command", f"echo x >> {self.reloads} && {self.reload_command} && echo done >> {self.reloads}"]
        log = open(self.workdir / "watch.log", "a")
        self.watcher = start_group([sys.executable, str(ROOT / "satellite.py"), "export", "--db",
                                    str(self.satellite.db), "--domain", DOMAIN, *args],
                                   stdout=log, stderr=log)         # its reload commands are in its group
        log.close()
        wait_for(lambda: "# satellite export" in self.map_file.read_text(), what="the watcher's first map")
        return self

    def watch_log(self):
        return (self.workdir / "watch.log").read_text()

    def reload_count(self):
        return self.reloads.read_text().split().count("x")

    def settle(self):
        """nginx: no reload under way. While one is, some connections still meet the old workers and
        their old map (a reload's nature): the watcher's reload command returns once they are gone."""
        wait_for(lambda: self.reload_count() == self.reloads.read_text().split().count("done"),
                 what="nginx's reload to finish")

    def request(self, alias, target, headers=None, method="GET", body=None):
        return self.satellite.request(f"{alias}.{DOMAIN}", target, method, headers, body, port=self.port)

    def tls_socket(self, host):
        raw = socket.create_connection(("127.0.0.1", self.port), 10)
        return self.satellite.context.wrap_socket(raw, server_hostname=host)

    def curl(self, alias, target, *args):
        host = f"{alias}.{DOMAIN}"
        return subprocess.run(["curl", "-sS", "--cacert", str(self.satellite.certs / "ca.pem"), "--resolve",
                               f"{host}:{self.port}:127.0.0.1", *args, f"https://{host}:{self.port}{target}"],
                              capture_output=True, text=True, timeout=60)

    def stop(self):
        if self.watcher:
            stop_group(self.watcher)


def write_front_secret(path):
    """The front secret's file as a site makes it: closed to other users (satellite refuses it otherwise)."""
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return str(path)


def front_satellite(fresh_satellite, tmp_path):
    return fresh_satellite("--trusted-fronts", f"{FRONT}/32", "--control-listen", "127.0.0.1:0",
                           "--front-secret", write_front_secret(tmp_path / "front-secret"))


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


def start_nginx(satellite, tmp_path, certs):
    """A real nginx running contrib/nginx-satellite.conf. Its reload command returns only once every worker
    the master had before is gone, so the next request meets the new map."""
    (tmp_path / "front-secret.conf").write_text(f'proxy_set_header X-Satellite-Front "{SECRET}";\n')
    port = free_port()
    map_file = tmp_path / "nginx.map"
    map_file.write_text("")
    site = adapt((ROOT / "contrib/nginx-satellite.conf").read_text(), [
        ("server 127.0.0.1:8443;", f"server 127.0.0.1:{satellite.port};"),
        ("# proxy_bind 127.0.0.1;", f"proxy_bind {FRONT};"),
        ("/etc/nginx/satellite-front-secret.conf", str(tmp_path / "front-secret.conf")),
        ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        ("satellite.example.edu", DOMAIN), ("/var/lib/satellite-front/nginx.map", str(map_file)),
        ("/etc/satellite/tls/fullchain.pem", str(certs / "cert.pem")),
        ("/etc/satellite/tls/privkey.pem", str(certs / "key.pem")),
        ("proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt",
         f"proxy_ssl_trusted_certificate {certs / 'ca.pem'}")])
    (tmp_path / "site.conf").write_text(site)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir(exist_ok=True)
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""daemon off; worker_processes auto; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/fastcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
  include {tmp_path}/site.conf; }}
""")
    check = subprocess.run(["nginx", "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = start_group(["nginx", "-c", str(conf), "-p", str(tmp_path)])             # the master and its workers
    wait_for(lambda: (tmp_path / "nginx.pid").exists(), what="nginx")
    front = Front("nginx", satellite, port, map_file, tmp_path)
    (tmp_path / "reload.py").write_text(RELOAD_AND_WAIT.format(master=proc.pid, conf=conf, prefix=tmp_path))
    front.reload_command = f"{sys.executable} {tmp_path / 'reload.py'}"
    front.proc = proc
    return front


def start_haproxy(satellite, tmp_path, certs):
    """A real HAProxy running contrib/haproxy-satellite.cfg; the watcher talks to its runtime API."""
    port = free_port()
    map_file = tmp_path / "haproxy.map"
    map_file.write_text("")
    pem = tmp_path / "front.pem"
    pem.write_text((certs / "cert.pem").read_text() + (certs / "key.pem").read_text())
    (tmp_path / "front-secret.map").write_text(f"secret {SECRET}\n")
    admin_socket = tmp_path / "haproxy.sock"
    cfg = adapt((ROOT / "contrib/haproxy-satellite.cfg").read_text(), [
        ("/run/haproxy/satellite-sync.sock mode 660 group satellite-front",
         f"{admin_socket} mode 660 group {GROUP}"),
        ("bind :443 ssl crt /etc/haproxy/satellite.pem", f"bind 127.0.0.1:{port} ssl crt {pem}"),
        ("/var/lib/satellite-front/haproxy.map", str(map_file)),
        ("/etc/haproxy/satellite-front-secret.map", str(tmp_path / "front-secret.map")),
        ("server satellite 127.0.0.1:8443", f"server satellite 127.0.0.1:{satellite.port} source {FRONT}"),
        ("ca-file /etc/ssl/certs/ca-certificates.crt", f"ca-file {certs / 'ca.pem'}")])
    (tmp_path / "haproxy.cfg").write_text(cfg)
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(tmp_path / "haproxy.log", "a")
    proc = start_group(["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=log, stderr=log)
    log.close()
    wait_for(lambda: admin_socket.exists(), what="HAProxy's runtime API socket")
    front = Front("haproxy", satellite, port, map_file, tmp_path)
    front.socket = admin_socket
    front.proc = proc
    return front


def stop_front(front):
    front.stop()
    stop_group(front.proc, signal.SIGTERM if front.kind == "nginx" else signal.SIGUSR1)   # HAProxy: soft stop


@pytest.fixture(params=["nginx", "haproxy"])
def front(request, fresh_satellite, tmp_path, certs):
    """Each test that takes `front` runs once with nginx and once with HAProxy, both watched."""
    satellite = front_satellite(fresh_satellite, tmp_path)
    workdir = tmp_path / request.param
    workdir.mkdir()
    started = (start_nginx if request.param == "nginx" else start_haproxy)(satellite, workdir, certs)
    yield started
    stop_front(started)


def started_alone(start, fresh_satellite, tmp_path, certs):
    started = start(front_satellite(fresh_satellite, tmp_path), tmp_path, certs)
    yield started
    stop_front(started)


@pytest.fixture
def nginx_alone(fresh_satellite, tmp_path, certs):
    """nginx alone, not watched (the tests of plain `export`)."""
    yield from started_alone(start_nginx, fresh_satellite, tmp_path, certs)


@pytest.fixture
def haproxy_alone(fresh_satellite, tmp_path, certs):
    """HAProxy alone (the tests of the runtime-API push: nginx reads the file itself)."""
    yield from started_alone(start_haproxy, fresh_satellite, tmp_path, certs)


def satellite_lines(satellite, alias):
    """satellite's access-log lines for one session's host."""
    logged = re.compile(rf'" \d{{3}} \d+ "{re.escape(alias)}\.')
    return [line for line in satellite.log_text().splitlines() if logged.search(line)]


def settle_satellite_log(front):
    """Everything satellite has answered so far is in its log: a request it answers (an unknown alias,
    through the front) is logged after all earlier ones."""
    marker = f"zz-marker-{os.urandom(4).hex()}"
    front.request(marker, "/")
    wait_for(lambda: satellite_lines(front.satellite, marker), what="satellite's access log")


"""Fixtures: a real satellite process with real TLS (test CA), real apps behind it.

Everything listens on loopback only. Distinct loopback addresses play distinct hosts:
127.0.0.1 is the login node and the browser, 127.0.0.2/.3 are "compute nodes".
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "sat.test"
LOGIN = "127.0.0.1"
NODE = "127.0.0.2"
OTHER_NODE = "127.0.0.3"


# No silent skips --------------------------------------------------------------------
# A skipped test proves nothing, and a missing test dependency or system tool would otherwise turn a
# part of the suite off without anyone noticing: any skip fails the session (exit status 1) and is
# listed, unless SATELLITE_ALLOW_SKIPS=1 (a developer on a machine without Slurm, root or Chromium).

SKIPPED: list = []


def skips_allowed():
    return os.environ.get("SATELLITE_ALLOW_SKIPS") == "1"


def skip_reason(report):
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def pytest_collectreport(report):
    if report.skipped:                            # a whole module skipped while being collected
        SKIPPED.append((report.nodeid, skip_reason(report)))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        SKIPPED.append((report.nodeid, skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    if SKIPPED and not skips_allowed() and session.exitstatus in (pytest.ExitCode.OK,
                                                                  pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if SKIPPED and not skips_allowed():
        terminalreporter.section("skipped tests fail the run (SATELLITE_ALLOW_SKIPS=1 allows them)", red=True)
        for nodeid, reason in SKIPPED:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)


def wait_for(predicate, timeout=20.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def build_zipapps(directory):
    """dist/satellite.pyz and dist/satellite-client.pyz as `make` builds them, into `directory`."""
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output-dir", str(directory)], check=True,
                   capture_output=True, timeout=60)
    return Path(directory)


def parse_fields(text):
    """key=value lines -> dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


class LoopbackHTTPS(http.client.HTTPSConnection):
    """HTTPS to satellite's loopback port, with SNI and Host for any name under the test domain."""

    def __init__(self, host, port, context, source=None, timeout=30):
        super().__init__(host, port, context=context, timeout=timeout,
                         source_address=(source, 0) if source else None)

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout, self.source_address)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class SatelliteServer:
    """A satellite process; restartable on the same port and database."""
    listen_host = "127.0.0.1"

    def __init__(self, certs, workdir, extra_args=()):
        self.certs = certs
        self.workdir = Path(workdir)
        self.db = self.workdir / "satellite.db"
        self.log_path = self.workdir / "satellite.log"
        self.extra_args = list(extra_args)
        self.port = 0
        self.control_port = None
        self.proc = None
        self.context = ssl.create_default_context(cafile=str(certs / "ca.pem"))

    def command(self):
        # One process unless a test asks for workers (tests/test_workers.py) or SATELLITE_TEST_WORKERS says
        # otherwise (e.g. 0: one per core, the default of `satellite serve`, for a whole run of the suite).
        workers = [] if "--workers" in self.extra_args else ["--workers", os.environ.get("SATELLITE_TEST_WORKERS", "1")]
        return [sys.executable, str(ROOT / "satellite.py"), "serve", "--domain", DOMAIN, *workers,
                "--listen", f"127.0.0.1:{self.port}", "--cert", str(self.certs / "cert.pem"),
                "--key", str(self.certs / "key.pem"), "--db", str(self.db),
                "--issue-from", "127.0.0.1/32", "--redeem-from", "127.0.0.2/31",
                "--getlink-rate", "10000/1m", "--token-failures", "10000/1m", *self.extra_args]

    def start(self):
        log = open(self.log_path, "a")
        start_at = self.log_path.stat().st_size
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, cwd=self.workdir)
        log.close()

        def serving():
            if self.proc.poll() is not None:
                raise AssertionError("satellite exited:\n" + self.log_text())
            text = self.log_path.read_text()[start_at:]
            return re.search(r"serving .* on " + re.escape(self.listen_host) + r":(\d+)", text)
        self.port = int(wait_for(serving, what="satellite to listen").group(1))
        control = re.search(r"control plane .* on 127\.0\.0\.1:(\d+)", self.log_path.read_text()[start_at:])
        self.control_port = int(control.group(1)) if control else None     # --control-listen: the API is there
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self):
        self.stop()
        return self.start()

    def log_text(self):
        return self.log_path.read_text()

    def host(self, alias):
        return f"{alias}.{DOMAIN}"

    def connection(self, host=LOGIN, source=None, timeout=30):
        """http.client connection; host is an alias host name or an address (management)."""
        return LoopbackHTTPS(host, self.port, self.context, source, timeout)

    def request(self, host, target, method="GET", headers=None, body=None, source=None, port=None):
        conn = LoopbackHTTPS(host, port or self.port, self.context, source) if port else self.connection(host, source)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def api(self, endpoint, source=LOGIN, method="GET", **params):
        """Call /api/<endpoint>; returns (status, fields)."""
        query = "&".join(f"{k}={v}" for k, v in params.items())
        target = f"/api/{endpoint}" + (f"?{query}" if query and method == "GET" else "")
        body = query.encode() if method == "POST" else None
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        status, _, data = self.request(LOGIN, target, method, headers, body, source, self.control_port)
        return status, parse_fields(data.decode())

    def getlink(self, **params):
        status, fields = self.api("getlink", **params)
        assert status == 201, fields
        return fields

    def mapped_session(self, app):
        """A link redeemed by `app` (which listens on its own address and port)."""
        link = self.getlink()
        status, fields = self.api("redeem", source=app.host, key=link["key"], port=app.port)
        assert status == 200, fields
        return link

    def tls_socket(self, host, source=None):
        raw = socket.create_connection(("127.0.0.1", self.port), 10, (source, 0) if source else None)
        return self.context.wrap_socket(raw, server_hostname=host)

    def curl(self, *args, host=None):
        """Real curl, trusting the test CA; host names under the test domain resolve to loopback."""
        resolve = ["--resolve", f"{host}:{self.port}:127.0.0.1"] if host else []
        return subprocess.run(["curl", "-sS", "--cacert", str(self.certs / "ca.pem"), *resolve, *args],
                              capture_output=True, text=True, timeout=120)

    def url(self, host, target="/"):
        return f"https://{host}:{self.port}{target}"

    def rows(self):
        with sqlite3.connect(self.db) as db:
            return db.execute("SELECT * FROM sessions").fetchall()


def open_raw_tunnel(satellite, key, attach, source="127.0.0.1"):
    """The agent's handshake by hand: (status, head, TLS socket)."""
    sock = satellite.tls_socket("127.0.0.1", source=source)
    sock.sendall((f"GET /api/tunnel HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
                  f"Upgrade: satellite-tunnel/1\r\nAuthorization: Bearer {key}\r\n"
                  f"Satellite-Tunnel-Attach: {attach}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    status = int(head.split(b" ")[1]) if head else 0
    return status, head.decode("latin-1"), sock


class App:
    """tests/apps/echo_app.py as a separate process on a "compute node" address."""

    def __init__(self, workdir, host=NODE, env=None, port=0):
        self.host = host
        self.request_log = Path(workdir) / f"app-{host}-{time.monotonic_ns()}.log"
        self.request_log.touch()
        environ = dict(os.environ, APP_REQUEST_LOG=str(self.request_log), **(env or {}))
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests/apps/echo_app.py"), "--host", host,
                                      "--port", str(port)],
                                     stdout=subprocess.PIPE, text=True, env=environ)
        line = self.proc.stdout.readline()
        assert line.startswith("listening"), line
        self.port = int(line.split()[2])

    def seen(self):
        """Requests the app has received, as 'METHOD target' lines."""
        return self.request_log.read_text().splitlines()

    def direct(self, target):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request("GET", target)
        return conn.getresponse().read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(directory), DOMAIN], check=True)
    return directory


@pytest.fixture(scope="module")
def satellite(certs, tmp_path_factory):
    """The shared satellite. The tests' login address stands for the scheduler's controller too (the job-state
    feed is off by default: fresh_satellite() shows the defaults)."""
    server = SatelliteServer(certs, tmp_path_factory.mktemp("satellite"), ("--jobstates-from", "127.0.0.1/32")).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_satellite(certs, tmp_path):
    """A satellite of its own, for tests that restart it or read its whole log."""
    servers = []

    def make(*extra_args):
        workdir = tmp_path / f"satellite{len(servers)}"
        workdir.mkdir()
        server = SatelliteServer(certs, workdir, extra_args)
        servers.append(server)                    # before start: a start that fails leaves its name taken
        return server.start()
    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    application = App(tmp_path_factory.mktemp("app"))
    yield application
    application.stop()


@pytest.fixture
def new_app(tmp_path):
    apps = []

    def make(host=NODE, **env):
        application = App(tmp_path, host, env)
        apps.append(application)
        return application
    yield make
    for application in apps:
        application.stop()


def follow_events(resp, count, release_next):
    """Read an event stream one event at a time: event i must arrive before release_next() lets the app send
    event i+1, so a proxy that buffers the stream would never deliver it. resp: an http.client response."""
    for i in range(count):
        line = resp.fp.readline()             # raw stream: chunk-size lines, then the event's lines
        while not line.startswith(b"data"):
            line = resp.fp.readline()
            assert line, "stream ended early"
        assert line == f"data: event {i}\n".encode()
        if i < count - 1:
            release_next()


def json_body(data):
    return json.loads(data.decode())


# Slurm ---------------------------------------------------------------------------

SLURM_CONF = """ClusterName=satellitetest
SlurmctldHost=localhost
SlurmUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=localhost CPUs={cpus} RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start_munge():
    """A running munged (Debian's munge), started if none answers; True if this call started it."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return False
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    wait_for(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, what="munge")
    return True


class Slurm:
    """A real single-node Slurm (Debian's slurm-wlm + munge), started for the test session."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.conf = self.dir / "slurm.conf"
        self.started_munge = False

    @staticmethod
    def available():
        return os.geteuid() == 0 and all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged"))

    def start(self):
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.cpus = min(os.cpu_count() or 1, 2)
        self.conf.write_text(SLURM_CONF.format(dir=self.dir, cpus=self.cpus))
        self.started_munge = start_munge()
        env = self.env()
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=env, check=True)
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", "localhost"], env=env, check=True)

        def idle():
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            return out.strip() == "idle"
        wait_for(idle, timeout=60, interval=0.5, what="the Slurm node to be idle")
        return self

    def env(self):
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def stop(self):
        """Cancel what is left and let it finish first: stopped daemons would orphan running jobs."""
        subprocess.run(["scancel", "--user", "root"], env=self.env(), capture_output=True)
        try:
            self.wait_until_empty(timeout=60)
        except AssertionError:
            pass
        for name in ("slurmd", "slurmctld"):
            pid_file = self.dir / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        def stopped(pid_file):
            try:
                return not Path(f"/proc/{pid_file.read_text().strip()}").exists()
            except FileNotFoundError:                # the daemon removed it as it exited
                return True
        for name in ("slurmd", "slurmctld"):
            pid_file = self.dir / f"{name}.pid"
            wait_for(lambda: stopped(pid_file), timeout=20, what=f"{name} to stop")
        if self.started_munge:
            subprocess.run(["pkill", "-x", "munged"])

    def wait_until_empty(self, timeout=120):
        """No job queued, running or completing: the node is all free."""
        wait_for(lambda: not subprocess.run(["squeue", "-h"], env=self.env(), capture_output=True,
                                            text=True).stdout.strip(), timeout=timeout, interval=0.5,
                 what="the Slurm queue to empty")

    def job_state(self, jobid):
        out = subprocess.run(["scontrol", "show", "job", jobid], env=self.env(), capture_output=True, text=True)
        match = re.search(r"JobState=(\S+)", out.stdout)
        return match.group(1) if match else None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if not Slurm.available():
        if os.environ.get("CI"):
            raise AssertionError("CI must run the real-Slurm tests: slurm-wlm and munge are missing or not root")
        pytest.skip("real Slurm needs root and slurm-wlm + munge (tests/setup-system.sh installs them)")
    cluster = Slurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


class Client:
    """satellite-client run as a user would run it, with a home directory of its own.
    `command`: how it is run (default: python3 satellite_client.py from this checkout)."""
    created: list = []

    def cancel_all(self):
        """Leave nothing running: cancel every session this client launched."""
        for alias in self.sessions():
            self.run("cancel", alias, timeout=60)

    def __init__(self, home, satellite, env=None, command=None):
        self.home = Path(home)
        self.command = list(command or [sys.executable, str(ROOT / "satellite_client.py")])
        self.home.mkdir(parents=True, exist_ok=True)
        self.satellite = satellite
        self.env = dict(os.environ, HOME=str(self.home), SATELLITE_URL=f"https://127.0.0.1:{satellite.port}",
                        SATELLITE_CACERT=str(satellite.certs / "ca.pem"))
        self.env.pop("SATELLITE_CLIENT_CONFIG", None)
        self.env.update(env or {})
        Client.created.append(self)

    def run(self, *args, timeout=180, check=False, cwd=None):
        result = subprocess.run([*self.command, *args], env=self.env,
                                capture_output=True, text=True, timeout=timeout, cwd=cwd or self.home)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def launch_json(self, *args, timeout=180):
        result = self.run("launch", "--json", *args, timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    def sessions(self):
        root = self.home / ".satellite/sessions"
        return sorted(p.name for p in root.iterdir()) if root.exists() else []

    def session_dir(self, alias):
        return self.home / ".satellite/sessions" / alias


@pytest.fixture(scope="module")
def job_satellite(certs, tmp_path_factory):
    """A satellite that accepts redeems from 127.0.0.1, where Slurm and local jobs run."""
    server = SatelliteServer(certs, tmp_path_factory.mktemp("job-satellite"), ["--redeem-from", "127.0.0.0/8"]).start()
    yield server
    server.stop()


ECHO_APP = f"{sys.executable} {ROOT}/tests/apps/echo_app.py --host {{host}} --port {{port}}"


@pytest.fixture(autouse=True)
def cancel_client_sessions():
    """After each test, cancel whatever sessions its clients left (a failed test included)."""
    yield
    while Client.created:
        Client.created.pop().cancel_all()

"""Fixtures: a real satellite process with real TLS (test CA), real apps behind it.

Everything listens on loopback only. Distinct loopback addresses play distinct hosts:
127.0.0.1 is the login node and the browser, 127.0.0.2/.3 are "compute nodes".
"""
import contextlib
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import satellite_client  # noqa: E402

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


@pytest.hookimpl(trylast=True)               # after the fixtures' teardown, also when a run is interrupted
def pytest_sessionfinish(session, exitstatus):
    LEFTOVERS[:] = wait_for_no_leftovers(os.environ[RUN_MARKER], leftover_paths())
    kill_leftovers(LEFTOVERS)
    failed = (SKIPPED and not skips_allowed()) or LEFTOVERS
    if failed and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if SKIPPED and not skips_allowed():
        terminalreporter.section("skipped tests fail the run (SATELLITE_ALLOW_SKIPS=1 allows them)", red=True)
        for nodeid, reason in SKIPPED:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
    if LEFTOVERS:
        terminalreporter.section("processes the run left running fail the run (killed now)", red=True)
        for process in LEFTOVERS:
            terminalreporter.line(f"LEFT RUNNING pid {process['pid']} user {process['user']} "
                                  f"cwd {process['cwd']}: {process['cmdline']}", red=True)


# No process left behind -------------------------------------------------------------
# A test that stops only the process it started can leave that process's children running: runuser forks
# the command and waits for it (killing runuser leaves the command), and a relay or a shell may end on
# SIGTERM while the app under it ignores SIGTERM. So a test starts a process that may have children with
# start_group() (a session of its own) and stops it with stop_group(), which makes sure the whole group
# ends. And when the run ends nothing it started may still be running: the run fails and lists what is
# (pid, user, command line), then kills it.
#
# What the run started: every child inherits RUN_MARKER=<this run's id> in its environment (runuser and
# setpriv keep the environment). A batch job's does not (satellite-client passes a job only its
# JOB_ENVIRONMENT), and once its parent ended it is no descendant of this process either: it is found by
# its command line or working directory naming the run's temporary directory or this checkout's tests/,
# if it started after this run did. Then every descendant of what was found, too. The daemons the suite
# starts for a whole module or session (slurmctld, slurmd, munged, sge_qmaster, sge_execd, nginx, HAProxy)
# are stopped by their fixtures before this check runs, so none is excluded: a daemon found here is one
# a fixture failed to stop. Daemons that predate the run (a munged the suite did not start) carry no
# marker and started before it, so they are never taken for the run's.

RUN_MARKER = "SATELLITE_TEST_RUN"
LEFTOVER_GRACE = float(os.environ.get("SATELLITE_LEFTOVER_GRACE", "20"))  # for stops already under way
BASETEMP: list = []                           # the run's temporary directory, once a test asked for it
LEFTOVERS: list = []


def pytest_sessionstart(session):
    os.environ[RUN_MARKER] = uuid.uuid4().hex            # every process the run starts inherits it


@pytest.fixture(scope="session", autouse=True)
def record_basetemp(tmp_path_factory):
    """Where the run's temporary files are: the leftover check looks for processes that name it."""
    BASETEMP[:] = [tmp_path_factory.getbasetemp()]


def leftover_paths():
    return [ROOT / "tests", *BASETEMP]


def read_process(pid):
    """One process as /proc shows it, None once it is gone: pid, ppid, pgid, state (Z: a zombie, ended and
    not yet collected), start (clock ticks after boot), user, cmdline, cwd, and the RUN_MARKER in the
    environment it was started with ("" if it has none, None if that cannot be read)."""
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/stat") as f:
            comm, fields = f.read().rsplit(")", 1)
        uid = os.stat(base).st_uid
        with open(f"{base}/cmdline", "rb") as f:
            cmdline = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = fields.split()
    try:
        cwd = os.readlink(f"{base}/cwd")
    except OSError:
        cwd = ""
    try:
        with open(f"{base}/environ", "rb") as f:
            variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        marker = variables.get(RUN_MARKER.encode(), b"").decode(errors="replace")
    except OSError:
        marker = None
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return {"pid": pid, "ppid": int(fields[1]), "pgid": int(fields[2]), "state": fields[0],
            "start": int(fields[19]), "user": user, "cmdline": cmdline or "[" + comm.split("(", 1)[1] + "]",
            "cwd": cwd, "marker": marker}


def all_processes():
    """Every process now, by pid."""
    found = (read_process(int(name)) for name in os.listdir("/proc") if name.isdigit())
    return {process["pid"]: process for process in found if process}


def names_a_path(process, paths):
    """Does the process's command line or working directory name one of `paths` (or a file under one)?"""
    for path in map(str, paths):
        if process["cwd"] == path or process["cwd"].startswith(path + "/") or \
                re.search(re.escape(path) + r"(/|\s|$)", process["cmdline"]):
            return True
    return False


def leftover_processes(marker, paths=(), since=None):
    """The processes of the run marked `marker` still running, as read_process() dicts by pid: those whose
    environment carries the marker, those started since `since` (clock ticks after boot; default: when this
    process started) whose command line or working directory names one of `paths`, this process's
    descendants, and every descendant of those. Never this process or its ancestors, nor zombies, nor a
    process that carries another run's marker (a run in another checkout, or one a test started)."""
    processes = all_processes()
    me = os.getpid()
    since = processes[me]["start"] if since is None else since
    ancestors, pid = set(), me
    while pid in processes and pid not in ancestors:
        ancestors.add(pid)
        pid = processes[pid]["ppid"]

    def another_runs(process):
        return process["marker"] not in (None, "", marker)
    found = {pid for pid, process in processes.items()
             if process["marker"] == marker or
             (not another_runs(process) and process["start"] >= since and names_a_path(process, paths))}
    children = {}
    for pid, process in processes.items():
        children.setdefault(process["ppid"], []).append(pid)
    todo = list(found | {me})
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found and not another_runs(processes[child]):
                found.add(child)
                todo.append(child)
    return {pid: processes[pid] for pid in sorted(found - ancestors) if processes[pid]["state"] != "Z"}


def wait_for_no_leftovers(marker, paths, since=None, grace=None):
    """leftover_processes(), after up to `grace` seconds for them to end: a job cancelled by the last test
    may still be stopping its app. Returns what is still running then, as a list."""
    deadline = time.monotonic() + (LEFTOVER_GRACE if grace is None else grace)
    while True:
        left = leftover_processes(marker, paths, since)
        if not left or time.monotonic() >= deadline:
            return list(left.values())
        time.sleep(0.2)


def kill_leftovers(processes):
    """SIGKILL each, if its pid still names the same process (same start time): a failed run leaves
    nothing running either."""
    for process in processes:
        now = read_process(process["pid"])
        if now and now["start"] == process["start"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process["pid"], signal.SIGKILL)


def start_group(argv, **kwargs):
    """subprocess.Popen in a session (so a process group) of its own: stop_group() reaches its children."""
    return subprocess.Popen(argv, start_new_session=True, **kwargs)


group_members = satellite_client.process_group_members     # the agent's own way to see a group: one copy



def stop_group(proc, first=signal.SIGTERM, grace=10):
    """Stop `proc` (from start_group) and all of its process group: `first` to `proc` alone (None: the caller
    has signalled already), up to `grace` seconds for the group to end, then SIGKILL to what is left of it;
    `proc` collected. What the members do on `first` (satellite stopping its workers, HAProxy's soft stop)
    is for the tests to see; this makes sure none outlives them. `proc` is collected last: until then its
    pid, the group's id, cannot be given to another process."""
    if first is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
    deadline = time.monotonic() + grace
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: not group_members(proc.pid), timeout=10, what=f"process group {proc.pid} to end")


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
        self.proc = start_group(self.command(), stdout=log, stderr=log, cwd=self.workdir)      # and its workers
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
        """`sig` to satellite; its workers too are gone when this returns (a killed satellite's included)."""
        if self.proc:
            stop_group(self.proc, sig)

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
        self.proc = start_group([sys.executable, str(ROOT / "tests/apps/echo_app.py"), "--host", host,
                                 "--port", str(port)], stdout=subprocess.PIPE, text=True, env=environ)
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
        stop_group(self.proc)


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

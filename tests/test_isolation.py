"""Only the link reaches the app (README, "Security model"): jobs launched through the real Slurm, attacked as
another Unix user on the same machine (`nobody`) and from another network namespace (another node).

The satellite here listens on the host's side of a veth pair (10.251.7.1), so the job's agent sees the node's
"cluster address" as 10.251.7.1, and a process in the namespace (10.251.7.2) is another node of the cluster."""
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time

from pathlib import Path

import pytest
import websocket

import satellite_client
from conftest import DOMAIN, ROOT, Client, SatelliteServer, start_group, stop_group, wait_for
from test_jupyter import execute

NETNS = f"satiso{os.getpid()}"
HOST_SIDE, NODE_SIDE = "10.251.7.1", "10.251.7.2"
APP = f"{sys.executable} {ROOT}/tests/apps/echo_app.py"
APPS = {
    "socket app": f"{APP} --unix {{socket}}",                        # serves on a Unix socket, as code-server can
    "loopback app": f"{APP} --host {{host}} --port {{port}}",        # no login, TCP only: http.server-like
}


@pytest.fixture(scope="module")
def other_node():
    """A network namespace with a veth pair: the host is 10.251.7.1, the other node 10.251.7.2."""
    steps = [f"ip netns add {NETNS}", f"ip link add vi{os.getpid()} type veth peer name vn{os.getpid()}",
             f"ip link set vn{os.getpid()} netns {NETNS}", f"ip addr add {HOST_SIDE}/24 dev vi{os.getpid()}",
             f"ip link set vi{os.getpid()} up", f"ip netns exec {NETNS} ip addr add {NODE_SIDE}/24 dev vn{os.getpid()}",
             f"ip netns exec {NETNS} ip link set vn{os.getpid()} up", f"ip netns exec {NETNS} ip link set lo up"]
    try:
        for step in steps:
            subprocess.run(step.split(), check=True)
        yield NETNS
    finally:
        subprocess.run(["ip", "link", "del", f"vi{os.getpid()}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


class NetSatellite(SatelliteServer):
    """A satellite on the cluster network's host address (a certificate with that IP in it)."""
    listen_host = HOST_SIDE

    def command(self):
        command = super().command()
        command[command.index("--listen") + 1] = f"{HOST_SIDE}:{self.port}"
        return command + ["--redeem-from", "10.251.7.0/24", "--issue-from", "10.251.7.0/24"]

    def link(self, url, target="/", method="GET", body=None, headers=None):
        host = url.split("/")[2].split(":")[0]
        token = url.split("token=")[1]
        conn = http.client.HTTPSConnection(host, self.port, context=self.context, timeout=120)
        conn.sock = self.context.wrap_socket(socket.create_connection((HOST_SIDE, self.port), 30),
                                             server_hostname=host)
        conn.request(method, target, body=body, headers=dict(headers or {}, Authorization=f"token {token}"))
        return conn, conn.getresponse()


@pytest.fixture(scope="module")
def net_satellite(other_node, tmp_path_factory):
    certs = tmp_path_factory.mktemp("net-certs")
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(certs), DOMAIN, HOST_SIDE], check=True)
    server = NetSatellite(certs, tmp_path_factory.mktemp("net-satellite")).start()
    yield server
    server.stop()


@pytest.fixture
def net_client(tmp_path, net_satellite, slurm):
    client = Client(tmp_path / "home", net_satellite, env={"SLURM_CONF": str(slurm.conf),
                                                            "SATELLITE_URL": f"https://{HOST_SIDE}:{net_satellite.port}"})
    os.chmod(tmp_path, 0o755)                     # nobody may look around: only the session directory is closed
    return client


def job_tree(client, alias):
    """Pids of the job's agent and everything it started."""
    session = client.session_dir(alias)
    found = subprocess.run(["pgrep", "-f", f"agent {session}"], capture_output=True, text=True).stdout.split()
    assert found, "no agent running"
    children = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [int(pid) for pid in found]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(children.get(pid, ()))
    return tree


def listeners(tree):
    """(address, port) of every TCP listener of the job's processes, and the Unix socket paths they listen on."""
    tcp, paths = set(), set()
    for line in subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout.splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & tree:
            address, port = line.split()[3].rsplit(":", 1)
            tcp.add((address.strip("[]"), int(port)))
    for line in subprocess.run(["ss", "-Hlxp"], capture_output=True, text=True).stdout.splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & tree and line.split()[4].startswith("/"):
            paths.add(line.split()[4])
    return tcp, paths


def curl_as(prefix, *args):
    result = subprocess.run([*prefix, "curl", "-sk", "-m", "8", "-o", "-", "-w", "\n%{http_code}", *args],
                            capture_output=True, text=True, timeout=30)
    return result.stdout.rsplit("\n", 1)[-1], result.stdout


def attempts(prefix, tcp, paths):
    """Every way in a user can try: plain HTTP and HTTPS on every listening address and port (with the
    unspecified address as the node's own), and every Unix socket path. Returns what answered (code, where)."""
    answered = []
    for address, port in tcp:
        for target in ({HOST_SIDE, "127.0.0.1"} if address in ("0.0.0.0", "*", "::") else {address}):
            for scheme in ("http", "https"):
                code, out = curl_as(prefix, f"{scheme}://{target}:{port}/")
                if code not in ("000",):
                    answered.append((code, f"{scheme}://{target}:{port}", out[:200]))
    for path in paths:
        code, out = curl_as(prefix, "--unix-socket", path, "http://x/")
        if code != "000":
            answered.append((code, path, out[:200]))
    return answered


NOBODY = ["runuser", "-u", "nobody", "--"]


def test_other_users_and_other_nodes_get_nothing_from_the_app(net_client, net_satellite, other_node, tmp_path):
    """Direct mode (the default), an app that serves on {socket}: the job's only network listener is the agent's
    gate. `nobody` on the same machine and a process on another node try every address, port and socket path
    the job listens on: none gets an answer from the app (its request log proves it saw none of them). Through
    the link: a page, a 200 MB download, an event stream and a WebSocket."""
    log = tmp_path / "requests.log"             # the job's environment is filtered: the command names it
    result = net_client.launch_json("--command", f"env APP_REQUEST_LOG={log} " + APPS["socket app"],
                                    "--time-limit", "10", "--wait")
    assert result["state"] == "proxied"
    tree = job_tree(net_client, result["alias"])
    tcp, paths = listeners(tree)
    assert tcp and all(address == HOST_SIDE for address, _ in tcp), tcp      # the gate only, on the node address
    (path,) = paths                                   # the session's directory, or /tmp/satellite-*/ if too long
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    wait_for(log.exists, what="the app's request log")     # launch --wait's own probe through the link
    log.write_text("")
    assert attempts(NOBODY, tcp, paths) == []
    assert attempts(["ip", "netns", "exec", other_node], tcp, set()) == []
    # TLS to the gate, then no proof, a wrong one, or the right prefix and a guess: closed before the app
    (address, port), = tcp
    context = ssl._create_unverified_context()
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"satellite-upstream/1 " + b"0" * 64 + b"\r\nGET / HTTP/1.1\r\n\r\n"):
        with context.wrap_socket(socket.create_connection((address, port), 10)) as sock:
            sock.sendall(junk)
            assert sock.recv(100) == b""
    assert log.read_text() == ""                                  # the app saw none of it

    conn, resp = net_satellite.link(result["url"])
    assert resp.status == 200 and b"Hello from the compute node" in resp.read()
    conn, resp = net_satellite.link(result["url"], "/download?size=" + str(200 * 1024 * 1024))
    digest, size = hashlib.sha256(), 0
    while chunk := resp.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    assert resp.status == 200 and size == 200 * 1024 * 1024
    conn.close()
    conn, resp = net_satellite.link(result["url"], "/events?n=2")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    first = resp.fp.readline()
    assert first.startswith(b"data:") or first.strip(), first
    conn.close()
    host = result["url"].split("/")[2].split(":")[0]
    raw = net_satellite.context.wrap_socket(socket.create_connection((HOST_SIDE, net_satellite.port), 10),
                                            server_hostname=host)
    ws = websocket.create_connection(f"wss://{host}:{net_satellite.port}/ws", socket=raw, timeout=30,
                                     header=[f"Authorization: token {result['url'].split('token=')[1]}"])
    ws.send("round trip")
    assert ws.recv() == "round trip"
    ws.close()
    assert "GET /download" in log.read_text()

    # the proof: never in the job's log, satellite's log, the app's command line or environment
    key = bytes.fromhex((net_satellite.workdir / "satellite.upstream-key").read_text().strip())
    key_hash = net_satellite.rows()[-1][2]
    proof = hmac.new(key, f"upstream\0{result['alias']}\0{key_hash}".encode(), hashlib.sha256).hexdigest()
    assert proof not in (net_client.session_dir(result["alias"]) / "job.log").read_text()
    assert proof not in net_satellite.log_text()
    for pid in tree:
        for name in ("cmdline", "environ"):
            try:
                assert proof.encode() not in open(f"/proc/{pid}/{name}", "rb").read()
            except FileNotFoundError:
                pass
    assert "upstream=tls, pinned sha256:" in subprocess.run(
        [sys.executable, str(ROOT / "satellite.py"), "show", result["alias"], "--db", str(net_satellite.db)],
        capture_output=True, text=True).stdout


def test_an_app_without_a_socket_is_on_a_private_loopback(net_client, net_satellite, other_node, tmp_path):
    """An app with no login that can only take a TCP port: it listens on 127.0.0.1 in a network namespace of its
    own (unprivileged user namespaces work here: checked first), relayed to a Unix socket, so neither another node
    nor another user on the same node gets an answer."""
    assert subprocess.run(NOBODY + ["unshare", "-Urn", "true"]).returncode == 0
    out = net_client.run("launch", "--command", APPS["loopback app"], "--time-limit", "10", "--wait")
    assert out.returncode == 0, out.stderr
    alias = re.search(r"for session ([a-z-]+) ", out.stdout).group(1)
    tcp, paths = listeners(job_tree(net_client, alias))
    assert attempts(["ip", "netns", "exec", other_node], tcp, set()) == []
    job_log = (net_client.session_dir(alias) / "job.log").read_text()
    assert "in a private network namespace" in job_log
    relayed = re.search(r"relayed to the Unix socket (\S+):", job_log).group(1)     # ss shows it only in its netns
    assert {address for address, _ in tcp} == {HOST_SIDE} and os.path.exists(relayed)
    assert attempts(NOBODY, tcp, paths | {relayed}) == []
    assert "in a network namespace of its own" in out.stdout
    conn, resp = net_satellite.link(re.search(r"https://\S+", out.stdout).group(0))
    assert resp.status == 200 and b"Hello from the compute node" in resp.read()


def test_without_user_namespaces_an_app_without_a_socket_is_on_verified_loopback(tmp_path, monkeypatch):
    """Where the node gives no private network namespace, the agent falls back to the node's loopback, checks that
    the listener is the app's own, and says that other users on the node could connect."""
    monkeypatch.setattr(satellite_client, "private_network", lambda: False)
    stop = satellite_client.StopFlag()
    proc, where = satellite_client.start_app(APPS["loopback app"], "127.0.0.1", dict(os.environ), 30, stop)
    try:
        assert where.path == "" and where.host == "127.0.0.1"
        assert satellite_client.listener_is_ours(where.port, proc.pid) is True
        code, out = curl_as(NOBODY, f"http://127.0.0.1:{where.port}/")
        assert code == "200"                         # the documented exception: same node, no namespace
    finally:
        satellite_client.stop_process_group(proc)


def test_jupyter_on_its_socket_through_slurm(net_client, net_satellite, other_node):
    """Real jupyter_server (Lab) on --ServerApp.sock: no one but the link's holder gets an answer; the kernel
    executes code over the WebSocket through the link."""
    result = net_client.launch_json("--jupyter", "lab", "--venv", str(ROOT / ".venv"), "--time-limit", "10",
                                    "--wait", timeout=240)
    tcp, paths = listeners(job_tree(net_client, result["alias"]))
    assert all(address == HOST_SIDE for address, _ in tcp) and len(paths) == 1
    assert attempts(NOBODY, tcp, paths) == []
    assert attempts(["ip", "netns", "exec", other_node], tcp, set()) == []
    token = result["url"].split("token=")[1]
    conn, resp = net_satellite.link(result["url"], "/api/kernels", "POST", b"{}")
    assert resp.status == 201
    kernel = json.loads(resp.read())["id"]
    host = result["url"].split("/")[2].split(":")[0]
    raw = net_satellite.context.wrap_socket(socket.create_connection((HOST_SIDE, net_satellite.port), 10),
                                            server_hostname=host)
    ws = websocket.create_connection(f"wss://{host}:{net_satellite.port}/api/kernels/{kernel}/channels",
                                     socket=raw, timeout=60, header=[f"Authorization: token {token}"])
    assert execute(ws, "6*7") == "42"
    # a running kernel talks to the server over Unix sockets in a private runtime directory: before, its five
    # channels (and ipykernel's output port) listened on the node's shared 127.0.0.1, and nobody got answers
    tcp, paths = listeners(job_tree(net_client, result["alias"]))
    on_loopback = sorted(port for address, port in tcp if address.startswith("127."))
    assert len(on_loopback) <= 1, tcp              # left: ipykernel's output port (drops what lacks its random key)
    assert attempts(NOBODY, tcp, paths) == []
    ws.close()


SQUATTER = textwrap.dedent("""
    import http.server, os, socket, sys, threading
    control = socket.socket(socket.AF_UNIX)
    control.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777); control.listen(1)
    while True:
        conn, _ = control.accept()
        port = int(conn.recv(10))
        server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        conn.sendall(b"ok")
""")


def test_a_squatter_on_the_apps_port_is_never_taken_for_the_app(monkeypatch):
    """Another user binds the port the agent picked for the app before the app does (here: told it by the app's
    own command, which then does not listen: the race, made certain). The agent must not take the squatter's
    listener for the app's."""
    directory = Path(tempfile.mkdtemp(prefix="squat-"))         # under /tmp: nobody may enter
    os.chmod(directory, 0o777)
    script = directory / "squatter.py"
    script.write_text(SQUATTER)
    control = directory / "control"
    squatter = start_group(NOBODY + ["/usr/bin/python3", str(script), str(control)])   # runuser forks: stop both
    try:
        wait_for(control.exists, what="the squatter")
        tell = (f"python3 -c 'import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                f"s.sendall(sys.argv[2].encode()); s.recv(2); time.sleep(60)' {control} {{port}}")
        monkeypatch.setattr(satellite_client, "private_network", lambda: False, raising=False)   # the shared loopback
        stop = satellite_client.StopFlag()
        with pytest.raises(satellite_client.Failure, match="something other than the app listens"):
            satellite_client.start_app(tell, "127.0.0.1", dict(os.environ), 20, stop)
    finally:
        stop_group(squatter)
        shutil.rmtree(directory)


def test_the_old_behaviour_is_only_the_sites_explicit_setting(tmp_path, monkeypatch, capsys):
    """app-listens = cluster-network-unprotected only from /etc/satellite/client.ini's [enforced]; not from a
    profile, the user's config or the command line. By default Jupyter serves on its socket."""
    for name in ("SATELLITE_CLIENT_CONFIG", "SATELLITE_URL", "SATELLITE_CACERT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.ini").write_text(f"[client]\napp-listens = {satellite_client.UNPROTECTED}\n")
    launch = ["launch", "--dry-run", "--scheduler", "local", "--satellite", "https://manage.sat.test",
              "--jupyter", "lab"]
    monkeypatch.setenv("SATELLITE_CLIENT_CONFIG", str(tmp_path / "mine.ini"))
    assert satellite_client.main(launch) == 2 and "app-listens is the site's alone" in capsys.readouterr().err
    monkeypatch.delenv("SATELLITE_CLIENT_CONFIG")
    monkeypatch.setattr(satellite_client, "SITE_CONFIG", str(tmp_path / "none.ini"))
    assert satellite_client.main(launch) == 0
    script = capsys.readouterr().out
    assert "--ServerApp.sock=" in script and "--port" not in script
    (tmp_path / "site.ini").write_text(f"[enforced]\napp-listens = {satellite_client.UNPROTECTED}\n")
    monkeypatch.setattr(satellite_client, "SITE_CONFIG", str(tmp_path / "site.ini"))
    assert satellite_client.main(launch) == 0
    assert "--ip={host} --port={port}" in capsys.readouterr().out


def test_the_gate_holds_few_unproven_connections_and_relays_only_proven_ones(tmp_path):
    """The agent's gate, on its own (a real app on a Unix socket, real TLS): GATE_PENDING connections that say
    nothing are held, one more is closed at once while they still are; a wrong proof is closed and the app sees
    nothing; the right proof is relayed to the app."""
    session = satellite_client.SessionDir(tmp_path)
    certificate, fingerprint = satellite_client.make_certificate(session)
    sock_path, log = str(tmp_path / "app.sock"), tmp_path / "requests.log"
    app = subprocess.Popen([sys.executable, str(ROOT / "tests/apps/echo_app.py"), "--unix", sock_path],
                           env=dict(os.environ, APP_REQUEST_LOG=str(log)), stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(sock_path), what="the app's socket")
        gate = satellite_client.Gate("127.0.0.1", certificate, satellite_client.AppAddress(path=sock_path))
        gate.proof = satellite_client.upstream_preamble("ab" * 32)
        share, sources = satellite_client.GATE_PENDING_PER_SOURCE, attackers()
        one_source = [socket.create_connection(("127.0.0.1", gate.port), 10, source_address=(sources[0], 0))
                      for _ in range(share + 1)]
        assert one_source[-1].recv(10) == b""                        # one address holds its share, no more
        idle = one_source[:-1] + [socket.create_connection(("127.0.0.1", gate.port), 10, source_address=(source, 0))
                                  for source in sources[1:] for _ in range(share)]
        wait_for(lambda: gate.pending._value == 0, what="the gate to hold them all")
        extra = socket.create_connection(("127.0.0.1", gate.port), 10, source_address=("127.0.0.99", 0))
        assert extra.recv(10) == b""                                 # closed: the gate holds no more
        held = select_readable(idle)
        assert held == [], "the idle connections were closed before their deadline"
        for sock in one_source + idle + [extra]:
            sock.close()
        wait_for(lambda: gate.pending._value == satellite_client.GATE_PENDING, what="the slots to come back")
        context = ssl._create_unverified_context()
        with context.wrap_socket(socket.create_connection(("127.0.0.1", gate.port), 10)) as wrong:
            presented = hashlib.sha256(wrong.getpeercert(binary_form=True)).hexdigest()
            assert presented == fingerprint                             # what satellite pins
            wrong.sendall(satellite_client.upstream_preamble("cd" * 32) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wrong.recv(100) == b""
        assert not log.exists() or log.read_text() == ""
        with context.wrap_socket(socket.create_connection(("127.0.0.1", gate.port), 10)) as right:
            right.sendall(gate.proof + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := right.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b"Hello from the compute node" in answer
        assert log.read_text() == "GET /\n"
        gate.close()
    finally:
        app.kill()
        app.wait()


def test_silent_connections_from_other_addresses_do_not_keep_satellite_out(tmp_path):
    """Other users fill the gate's small pool with connections that say nothing; satellite's connections (from
    the address its name resolves to, or from one it has proved itself from) still get in with their proof."""
    session = satellite_client.SessionDir(tmp_path)
    certificate, _ = satellite_client.make_certificate(session)
    sock_path = str(tmp_path / "app.sock")
    app = subprocess.Popen([sys.executable, str(ROOT / "tests/apps/echo_app.py"), "--unix", sock_path],
                           stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(sock_path), what="the app's socket")
        gate = satellite_client.Gate("127.0.0.1", certificate, satellite_client.AppAddress(path=sock_path),
                                     satellite_addresses=["127.0.0.2"])
        gate.proof = satellite_client.upstream_preamble("ab" * 32)
        # satellite's name resolves to 127.0.0.2, but it connects from 127.0.0.9 (another interface): its
        # first connection, made before the attack, proves that address
        assert proven_get(gate, "127.0.0.9").startswith(b"HTTP/1.1 200")
        idle = [socket.create_connection(("127.0.0.1", gate.port), 10, source_address=(source, 0))
                for source in attackers() for _ in range(satellite_client.GATE_PENDING_PER_SOURCE)]
        wait_for(lambda: gate.pending._value == 0, what="the attackers to fill the small pool")
        assert proven_get(gate, "127.0.0.2").startswith(b"HTTP/1.1 200")
        assert proven_get(gate, "127.0.0.9").startswith(b"HTTP/1.1 200")
        for sock in idle:
            sock.close()
        gate.close()
    finally:
        app.kill()
        app.wait()


def attackers():
    """Source addresses enough to fill the gate's small pool, each to its share."""
    count = satellite_client.GATE_PENDING // satellite_client.GATE_PENDING_PER_SOURCE
    return [f"127.0.0.{30 + n}" for n in range(count)]


def proven_get(gate, source):
    raw = socket.create_connection(("127.0.0.1", gate.port), 10, source_address=(source, 0))
    with ssl._create_unverified_context().wrap_socket(raw) as sat:
        sat.sendall(gate.proof + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sat.recv(65536):
            answer += chunk
    return answer


def select_readable(socks):
    import select
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    return poller.poll(0)


def test_the_proof_is_given_only_with_a_pin_and_stored_nowhere(satellite):
    """redeem proof=1 needs a fingerprint (the proof travels only inside pinned TLS); the reply's proof is the
    HMAC of the upstream key file, and neither the database nor `satellite show` nor the log holds it."""
    link = satellite.getlink()
    status, fields = satellite.api("redeem", source="127.0.0.2", method="POST", key=link["key"], port=4000, proof=1)
    assert status == 400 and "fingerprint" in fields.get("error", str(fields))
    status, fields = satellite.api("redeem", source="127.0.0.2", method="POST", key=link["key"], port=4000, proof=1,
                                   fingerprint="ab" * 32)
    assert status == 200 and re.fullmatch(r"[0-9a-f]{64}", fields["upstream_proof"])
    key = bytes.fromhex((satellite.workdir / "satellite.upstream-key").read_text().strip())
    row = [r for r in satellite.rows() if r[0] == link["alias"]][0]
    assert fields["upstream_proof"] == hmac.new(key, f"upstream\0{link['alias']}\0{row[2]}".encode(),
                                                hashlib.sha256).hexdigest()
    assert fields["upstream_proof"] not in repr(satellite.rows()) and fields["upstream_proof"] not in satellite.log_text()
    shown = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "show", link["alias"], "--db", str(satellite.db)],
                           capture_output=True, text=True).stdout
    assert "pinned sha256:" + "ab" * 32 + ", proof" in shown and fields["upstream_proof"] not in shown

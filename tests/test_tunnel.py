"""The reverse tunnel: a job whose node takes no inbound connections opens one to satellite.

Most tests run the agent with the local scheduler and the app on loopback; the last ones put
the "compute node" in a network namespace of its own, launched through the real Slurm, that
satellite cannot connect to at all (see `node_namespace`).
"""
import ctypes
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import websocket

from conftest import ECHO_APP, ROOT, Client, build_zipapps, follow_events, json_body, open_raw_tunnel, wait_for
from test_jupyter import execute

FRAME = struct.Struct("!BII")
OPEN, DATA, CREDIT, EOF, RESET, PING, PONG = range(1, 8)

# Imports the client with only `path` (the source tree or the client's .pyz) to import from: which copy of
# the protocol does it speak?
WHOSE_PROTOCOL = """import sys
sys.path[:0] = [sys.argv[1]]
import satellite, satellite_client
assert satellite_client.Tunnel is satellite.Tunnel and satellite_client.TUNNEL_PROTOCOL is satellite.TUNNEL_PROTOCOL
print(satellite.__file__)
"""


def test_the_client_speaks_the_protocol_from_satellites_one_copy(tmp_path):
    client_source = (ROOT / "satellite_client.py").read_text()
    assert not re.search(r"^(class (Tunnel|TunnelStream|TunnelError)\b|[A-Z_]+ = struct\.Struct)", client_source, re.M)
    pyz = build_zipapps(tmp_path) / "satellite-client.pyz"
    for path, copy in [(ROOT, ROOT / "satellite.py"), (pyz, pyz / "satellite.py")]:
        result = subprocess.run([sys.executable, "-I", "-S", "-c", WHOSE_PROTOCOL, str(path)], capture_output=True,
                                text=True, cwd=tmp_path, timeout=30)
        assert result.returncode == 0 and result.stdout.strip() == str(copy), result.stderr
    with zipfile.ZipFile(pyz) as archive:
        assert archive.read("satellite.py") == (ROOT / "satellite.py").read_bytes()


def test_no_text_is_copied_between_satellite_and_the_client(tmp_path):
    """No run of six identical lines (each more than a bracket or a keyword) stands in both programs.
    (The same check as the `duplicates` tool's, made here so it needs nothing outside the project.)"""
    def runs(path):
        lines = [line.strip() for line in path.read_text().splitlines()]
        return {tuple(lines[i:i + 6]) for i in range(len(lines) - 5) if all(len(line) > 12 for line in lines[i:i + 6])}
    assert runs(ROOT / "satellite.py") & runs(ROOT / "satellite_client.py") == set()
    old = subprocess.run(["git", "-C", str(ROOT), "show", "87bf04f:satellite_client.py"], capture_output=True, text=True)
    if old.returncode == 0:                      # the check sees the copy that used to be there
        (tmp_path / "old_client.py").write_text(old.stdout)
        assert runs(ROOT / "satellite.py") & runs(tmp_path / "old_client.py")


# helpers -------------------------------------------------------------------------

def launch(client, *args):
    return client.launch_json("--scheduler", "local", "--command", ECHO_APP, "--connect", "tunnel",
                              "--time-limit", "20", "--wait", *args)


def host_of(url):
    return url.split("/")[2].split(":")[0]


def get(satellite, url, target, **kwargs):
    token = url.split("token=")[1]
    sep = "&" if "?" in target else "?"
    return satellite.request(host_of(url), f"{target}{sep}token={token}", **kwargs)


def job_log(client, alias):
    return (client.session_dir(alias) / "job.log").read_text()


@pytest.fixture
def client(tmp_path, job_satellite):
    return Client(tmp_path / "home", job_satellite)


# the link through a tunnel ------------------------------------------------------------

def test_tunnel_carries_http_websocket_download_upload_and_events(client, job_satellite):
    result = launch(client)
    assert result["state"] == "proxied"
    log = job_log(client, result["alias"])
    assert "tunnel to satellite connected" in log and "127.0.0.1:" in log           # the app on loopback only
    status, fields = job_satellite.api("status", token=result["url"].split("token=")[1])
    assert fields["target"].startswith("tunnel from ")

    status, _, body = get(job_satellite, result["url"], "/")
    assert status == 200 and b"Hello from the compute node" in body
    status, _, body = get(job_satellite, result["url"], "/download?size=20000000")
    assert status == 200 and len(body) == 20_000_000
    payload = bytes(range(256)) * 40_000
    status, _, body = get(job_satellite, result["url"], "/upload", method="POST", body=payload,
                          headers={"Content-Type": "application/octet-stream"})
    assert status == 200 and json_body(body)["bytes"] == len(payload)

    host, token = host_of(result["url"]), result["url"].split("token=")[1]
    ws = websocket.create_connection(f"wss://{host}:{job_satellite.port}/ws?token={token}",
                                     socket=job_satellite.tls_socket(host), timeout=30)
    for size in (1, 1000, 200_000):
        ws.send_binary(b"x" * size)
        assert ws.recv() == b"x" * size
    ws.close()

    # an event stream flows event by event (not buffered until the end)
    conn = job_satellite.connection(host)
    conn.request("GET", f"/events?n=3&token={token}")
    resp = conn.getresponse()
    assert resp.status == 200
    follow_events(resp, 3, lambda: get(job_satellite, result["url"], "/next"))
    conn.close()


def agent_pid(client, alias):
    out = subprocess.run(["pgrep", "-f", f"agent {client.session_dir(alias)}"], capture_output=True, text=True)
    pids = out.stdout.split()
    assert len(pids) == 1, out
    return int(pids[0])


def wait_for_exit(pid):
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
             timeout=60, what="the agent to exit")


def cut_connections(satellite):
    """What a NAT box or firewall timing out does: drop every connection to satellite's port."""
    subprocess.run(["ss", "-K", "state", "established", "( sport = :%d )" % satellite.port],
                   check=True, capture_output=True)


def test_a_cut_tunnel_reconnects_by_itself_and_the_status_page_says_so(client, job_satellite):
    result = launch(client)
    alias = result["alias"]
    assert get(job_satellite, result["url"], "/")[0] == 200
    agent = agent_pid(client, alias)
    os.kill(agent, signal.SIGSTOP)                    # hold the agent so the gap can be seen
    try:
        cut_connections(job_satellite)
        wait_for(lambda: get(job_satellite, result["url"], "/")[0] == 503, what="the status page")
        status, _, body = get(job_satellite, result["url"], "/")
        assert b"reconnecting" in body
        status, _, body = get(job_satellite, result["url"], "/__satellite/status")
        assert json_body(body)["tunnel"] == "reconnecting" and json_body(body)["ready"] is False
    finally:
        os.kill(agent, signal.SIGCONT)
    wait_for(lambda: get(job_satellite, result["url"], "/")[0] == 200, timeout=60, what="the tunnel back")
    log = job_log(client, alias)
    assert "tunnel lost" in log and log.count("tunnel to satellite connected") == 2
    status, _, body = get(job_satellite, result["url"], "/download?size=3000000")
    assert status == 200 and len(body) == 3_000_000


def test_a_tunnel_gone_for_good_ends_the_session_at_refresh_and_the_agent_stops(client, job_satellite):
    result = launch(client)
    alias = result["alias"]
    agent = agent_pid(client, alias)
    os.kill(agent, signal.SIGSTOP)
    try:
        cut_connections(job_satellite)
        wait_for(lambda: get(job_satellite, result["url"], "/")[0] == 503, what="the tunnel to drop")
        refresh = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "refresh", "--db",
                                  str(job_satellite.db), "--dead-after", "0"], capture_output=True, text=True)
        assert refresh.returncode == 0 and "1 ended as gone" in refresh.stdout, refresh.stdout + refresh.stderr
        assert get(job_satellite, result["url"], "/")[0] == 410
    finally:
        os.kill(agent, signal.SIGCONT)
    # the agent's next attach is refused (the session is over): it stops the app and exits
    wait_for_exit(agent)
    log = job_log(client, alias)
    assert "the tunnel was refused: this session has ended (410)" in log and "stopping the app" in log


# who may attach -------------------------------------------------------------------------

def test_attach_needs_the_right_key_network_headers_and_a_fresh_attach_number(job_satellite, satellite):
    link = job_satellite.getlink()
    rows_before = job_satellite.rows()
    for key, attach, expected in (("wrong-key", 1, 404), ("", 1, 403), (link["key"], "x", 400)):
        status, head, sock = open_raw_tunnel(job_satellite, key, attach)
        sock.close()
        assert status == expected, head
    other = satellite.getlink()                       # a satellite that takes redeems only from 127.0.0.2/31
    status, head, sock = open_raw_tunnel(satellite, other["key"], 1, source="127.0.0.1")
    sock.close()
    assert status == 403
    assert job_satellite.rows() == rows_before        # refused attaches changed nothing

    status, head, first = open_raw_tunnel(job_satellite, link["key"], 1000)
    assert status == 101 and "Upgrade: satellite-tunnel/1" in head
    for attach in (1000, 999):                        # the same request again (a replay), or an older one
        status, head, sock = open_raw_tunnel(job_satellite, link["key"], attach)
        sock.close()
        assert status == 409 and "replayed" in head
    status, head, second = open_raw_tunnel(job_satellite, link["key"], 1001)
    assert status == 101                              # the job reconnecting: the newer connection wins
    first.settimeout(10)
    assert first.recv(100) == b""                     # the older one is closed
    second.close()


def read_frame(sock):
    head = b""
    while len(head) < FRAME.size:
        data = sock.recv(FRAME.size - len(head))
        if not data:
            return None
        head += data
    kind, stream, length = FRAME.unpack(head)
    payload = b""
    while len(payload) < length:
        payload += sock.recv(length - len(payload))
    return kind, stream, payload


def request_in_background(satellite, link, target="/"):
    """A browser request that the test answers (or not) through a raw tunnel; its outcome in the dict."""
    outcome = {}

    def run():
        try:
            outcome["answer"] = satellite.request(f"{link['alias']}.sat.test", f"{target}?token={link['token']}")
        except (OSError, http.client.HTTPException) as exc:
            outcome["error"] = exc
    threading.Thread(target=run, daemon=True).start()
    return outcome


def test_a_tunnel_serves_only_its_own_alias_and_cannot_open_streams(job_satellite):
    mine, other = job_satellite.getlink(), job_satellite.getlink()
    status, _, tunnel = open_raw_tunnel(job_satellite, mine["key"], 1)
    assert status == 101
    tunnel.settimeout(10)
    # the other alias is not served by this tunnel: no OPEN arrives, its status page answers
    status, _, _ = job_satellite.request(f"{other['alias']}.sat.test", f"/?token={other['token']}")
    assert status == 503
    # a browser request for this alias arrives as OPEN + DATA, and nothing names where to connect
    outcome = request_in_background(job_satellite, mine, "/hello")
    kind, stream, payload = read_frame(tunnel)
    assert (kind, payload) == (OPEN, b"")
    kind, stream_again, payload = read_frame(tunnel)
    assert kind == DATA and stream_again == stream and payload.startswith(b"GET /hello?token=")
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    tunnel.sendall(FRAME.pack(DATA, stream, len(reply)) + reply)
    wait_for(lambda: outcome, what="the answer through the raw tunnel")
    assert outcome["answer"][0] == 200 and outcome["answer"][2] == b"hi"
    # the agent end may not open streams: satellite closes the tunnel, and the alias shows its status page
    tunnel.sendall(FRAME.pack(OPEN, 99, 0))
    while read_frame(tunnel) is not None:
        pass
    wait_for(lambda: "protocol error: only satellite opens streams" in job_satellite.log_text(), what="the log")
    assert job_satellite.request(f"{mine['alias']}.sat.test", f"/?token={mine['token']}")[0] == 503


@pytest.mark.parametrize("frame, error, on_live_stream", [
    (FRAME.pack(DATA, 1, 70_000), "a frame of 70000 bytes", False),
    (FRAME.pack(42, 0, 0), "unknown frame kind 42", False),
    (FRAME.pack(CREDIT, 1, 3) + b"abc", "malformed CREDIT", True),     # parsed only for a live stream
    # an agent must not make satellite queue without end: credit beyond the window, EOF floods, empty DATA
    (FRAME.pack(CREDIT, 1, 4) + struct.pack("!I", 0xFFFFFFFF), "stream 1 was given credit beyond its window", True),
    (FRAME.pack(EOF, 1, 0) * 2, "stream 1 sent on after its EOF", True),
    (FRAME.pack(DATA, 1, 0), "stream 1 sent an empty DATA frame", True),
])
def test_malformed_frames_close_the_tunnel(job_satellite, frame, error, on_live_stream):
    link = job_satellite.getlink()
    status, _, tunnel = open_raw_tunnel(job_satellite, link["key"], 1)
    assert status == 101
    if on_live_stream:
        request_in_background(job_satellite, link)
        tunnel.settimeout(10)
        assert read_frame(tunnel)[0] == OPEN
    tunnel.sendall(frame)
    tunnel.settimeout(10)
    while read_frame(tunnel) is not None:
        pass
    wait_for(lambda: f"protocol error: {error}" in job_satellite.log_text(), what="the protocol error logged")


def metric(satellite, name):
    text = satellite.request("127.0.0.1", "/metrics")[2].decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_an_idle_tunnel_is_pinged_and_answers_pings(job_satellite):
    link = job_satellite.getlink()
    status, _, tunnel = open_raw_tunnel(job_satellite, link["key"], 1)
    assert status == 101 and metric(job_satellite, "satellite_tunnels_open") >= 1
    tunnel.settimeout(10)
    tunnel.sendall(FRAME.pack(PING, 0, 8) + b"12345678")
    assert read_frame(tunnel) == (PONG, 0, b"12345678")
    tunnel.settimeout(20)                             # satellite pings after 10 s of silence
    kind, _, payload = read_frame(tunnel)
    assert kind == PING and len(payload) == 8
    tunnel.close()
    wait_for(lambda: metric(job_satellite, "satellite_tunnels_open") == 0, what="the tunnel gauge to drop")


def test_revoking_a_session_closes_its_tunnel_and_the_agent_stops(client, job_satellite):
    result = launch(client)
    agent = agent_pid(client, result["alias"])
    revoke = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "revoke", "--db", str(job_satellite.db),
                             result["alias"]], capture_output=True, text=True)
    assert revoke.returncode == 0, revoke.stderr
    assert get(job_satellite, result["url"], "/")[0] == 410
    wait_for_exit(agent)
    log = job_log(client, result["alias"])
    assert "tunnel lost" in log and "this session has ended (410)" in log and "stopping the app" in log


def test_data_beyond_the_credit_closes_the_tunnel(job_satellite):
    link = job_satellite.getlink()
    status, _, tunnel = open_raw_tunnel(job_satellite, link["key"], 1)
    host = f"{link['alias']}.sat.test"
    browser = job_satellite.tls_socket(host)          # asks, then never reads: satellite cannot pass data on
    browser.sendall(f"GET /?token={link['token']} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    tunnel.settimeout(10)
    kind, stream, _ = read_frame(tunnel)
    assert kind == OPEN
    chunk = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n".ljust(65536, b"x")
    try:                                              # 64 MiB: beyond the window and every socket buffer
        for _ in range(1024):
            tunnel.sendall(FRAME.pack(DATA, stream, len(chunk)) + chunk)
    except OSError:
        pass                                          # satellite closed the tunnel while we still wrote
    browser.close()
    wait_for(lambda: f"stream {stream} sent more than its credit" in job_satellite.log_text(),
             what="the credit violation logged")


def test_a_stalled_download_does_not_hold_up_a_websocket_on_the_same_tunnel(client, job_satellite):
    result = launch(client)
    host, token = host_of(result["url"]), result["url"].split("token=")[1]
    stalled = job_satellite.tls_socket(host)
    stalled.sendall(f"GET /download?size=500000000&token={token} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    stalled.settimeout(10)
    assert stalled.recv(100).startswith(b"HTTP/1.1 200")  # the download runs, then this reader stops reading
    time.sleep(2)                                         # its stream's credit runs out; buffers fill
    ws = websocket.create_connection(f"wss://{host}:{job_satellite.port}/ws?token={token}",
                                     socket=job_satellite.tls_socket(host), timeout=30)
    for i in range(20):
        ws.send(f"message {i}")
        assert ws.recv() == f"message {i}"
    ws.close()
    status, _, body = get(job_satellite, result["url"], "/download?size=2000000")
    assert status == 200 and len(body) == 2_000_000    # other requests flow too
    received = 0
    while received < 50_000_000:                          # and the stalled one resumes where it stopped
        data = stalled.recv(1 << 20)
        assert data, "the stalled download was cut"
        received += len(data)
    stalled.close()


# a compute node satellite cannot reach, through the real Slurm ---------------------------

class NodeNamespace:
    """A network namespace standing for a compute node behind NAT: it has only its own loopback.
    The one way out is a relay (the site's gateway) that listens on the namespace's 127.0.0.1 at
    satellite's port and connects to satellite from 127.0.0.3. Satellite sees the node as
    127.0.0.3, where nothing listens, and cannot open any connection into the namespace."""

    GATEWAY = "127.0.0.3"

    def __init__(self, satellite_port):
        self.name = f"satnode{os.getpid()}"
        self.port = satellite_port
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)
        self.listener = self.socket_inside()
        self.lock = threading.Lock()
        self.relayed = []
        threading.Thread(target=self.accept, daemon=True).start()

    def socket_inside(self):
        """A listening socket created in the namespace (setns applies to the calling thread only)."""
        made = {}

        def make():
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{self.name}") as ns:
                if libc.setns(ns.fileno(), 0x40000000) != 0:            # CLONE_NEWNET
                    made["error"] = OSError(ctypes.get_errno(), "setns")
                    return
            sock = socket.socket()
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
            made["sock"] = sock
        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if "error" in made:
            raise made["error"]
        return made["sock"]

    def accept(self):
        while True:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(("127.0.0.1", self.port), 10, (self.GATEWAY, 0))
            except OSError:                               # satellite is restarting or gone
                inside.close()
                continue
            with self.lock:
                self.relayed += [inside, outside]
            for src, dst in ((inside, outside), (outside, inside)):
                threading.Thread(target=self.pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """The gateway drops every connection it carries (a NAT timeout, a firewall reload)."""
        with self.lock:
            relayed, self.relayed = self.relayed, []
        for sock in relayed:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def python(self, directory):
        """The job's python, run inside the namespace: the agent and its app live on the "node"."""
        wrapper = directory / "node-python"
        wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {self.name} {sys.executable} \"$@\"\n")
        wrapper.chmod(0o755)
        return str(wrapper)

    def close(self):
        self.listener.close()
        self.cut()
        subprocess.run(["ip", "netns", "del", self.name])


@pytest.fixture(scope="module")
def node(job_satellite):
    if os.geteuid() != 0 or not shutil.which("ip"):
        if os.environ.get("CI"):
            raise AssertionError("CI must run the network-namespace tests: needs root and iproute2")
        pytest.skip("network namespaces need root and iproute2")
    namespace = NodeNamespace(job_satellite.port)
    yield namespace
    namespace.close()


@pytest.fixture
def slurm_client(tmp_path, job_satellite, slurm):
    return Client(tmp_path / "home", job_satellite, env={"SLURM_CONF": str(slurm.conf)})


def test_jupyterlab_on_a_node_satellite_cannot_reach_works_through_the_tunnel(slurm_client, job_satellite,
                                                                              node, slurm, tmp_path):
    slurm.wait_until_empty()
    big = slurm_client.home / "results.bin"
    big.write_bytes(os.urandom(1 << 20) * 48)                      # 48 MiB to download
    result = slurm_client.launch_json("--jupyter", "lab", "--venv", str(ROOT / ".venv"), "--connect", "auto",
                                      "--python", node.python(tmp_path), "--workdir", str(slurm_client.home),
                                      "--time-limit", "15", "--wait", timeout=300)
    assert result["scheduler"] == "slurm" and result["state"] == "proxied"
    log = job_log(slurm_client, result["alias"])
    assert "satellite cannot connect to 127.0.0.3:" in log and "using a tunnel instead" in log
    token = result["url"].split("token=")[1]
    assert job_satellite.api("status", token=token)[1]["target"] == "tunnel from 127.0.0.3"
    host = host_of(result["url"])

    def run_code(code):
        auth = {"Authorization": "token " + token}
        status, _, body = job_satellite.request(host, "/api/kernels", "POST", headers=auth, body=b"{}")
        assert status == 201, body
        ws = websocket.create_connection(f"wss://{host}:{job_satellite.port}/api/kernels/{json_body(body)['id']}"
                                         "/channels", socket=job_satellite.tls_socket(host), timeout=60,
                                         header=[f"Authorization: token {token}"])
        return ws, execute(ws, code)

    status, _, body = get(job_satellite, result["url"], "/lab")
    assert status == 200 and b"JupyterLab" in body
    ws, answer = run_code("6 * 7")
    assert answer == "42"
    status, _, body = get(job_satellite, result["url"], "/files/results.bin")
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(big.read_bytes()).digest()

    node.cut()                                                    # the gateway drops the tunnel mid-session
    with pytest.raises((websocket.WebSocketException, OSError)):
        for _ in range(100):
            ws.send('{"ping": 1}')
            time.sleep(0.1)
            ws.recv()
    wait_for(lambda: get(job_satellite, result["url"], "/lab")[0] == 200, timeout=90, interval=1,
             what="the link to come back by itself")
    assert run_code("sum(range(10))")[1] == "45"
    assert "tunnel lost" in job_log(slurm_client, result["alias"])
    assert slurm_client.run("cancel", result["alias"]).returncode == 0
    wait_for(lambda: get(job_satellite, result["url"], "/")[0] == 410, timeout=60, what="the link to end")


def test_an_event_stream_from_a_node_satellite_cannot_reach(slurm_client, job_satellite, node, slurm, tmp_path):
    slurm.wait_until_empty()
    result = slurm_client.launch_json("--command", ECHO_APP, "--connect", "tunnel", "--python",
                                      node.python(tmp_path), "--time-limit", "10", "--wait", timeout=300)
    token, host = result["url"].split("token=")[1], host_of(result["url"])
    conn = job_satellite.connection(host)
    conn.request("GET", f"/events?n=5&token={token}")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    follow_events(resp, 5, lambda: get(job_satellite, result["url"], "/next"))
    conn.close()
    assert slurm_client.run("cancel", result["alias"]).returncode == 0


def test_connect_mode_is_checked_before_anything_is_contacted(client, tmp_path, job_satellite):
    issued = {row[0] for row in job_satellite.rows()}    # aliases: earlier sessions' rows may still change
    result = client.run("launch", "--scheduler", "local", "--command", ECHO_APP, "--connect", "sideways")
    assert result.returncode == 2 and "invalid choice: 'sideways'" in result.stderr
    config = tmp_path / "client.ini"
    config.write_text("[client]\nconnect = sometimes\n")
    client.env["SATELLITE_CLIENT_CONFIG"] = str(config)
    result = client.run("launch", "--scheduler", "local", "--command", ECHO_APP)
    assert result.returncode == 2 and "connect 'sometimes': choose direct, tunnel or auto" in result.stderr
    assert {row[0] for row in job_satellite.rows()} == issued and client.sessions() == []
    config.write_text("[client]\nconnect = tunnel\n")               # a site whose nodes all need the tunnel
    result = client.launch_json("--scheduler", "local", "--command", ECHO_APP, "--time-limit", "10", "--wait")
    assert "tunnel to satellite connected" in job_log(client, result["alias"])

"""The reverse tunnel: a job whose node takes no inbound connections opens one to satellite.

Most tests run the agent with the local scheduler and the app on loopback; the last ones put
the "compute node" in a network namespace of its own, launched through the real Slurm, that
satellite cannot connect to at all (see `node_namespace`).
"""
import json
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest
import websocket

from conftest import ECHO_APP, ROOT, Client, json_body, parse_fields, wait_for

SATELLITE_PY = (ROOT / "satellite.py").read_text()
CLIENT_PY = (ROOT / "satellite_client.py").read_text()
FRAME = struct.Struct("!BII")
OPEN, DATA, CREDIT, EOF, RESET, PING, PONG = range(1, 8)


def tunnel_section(source):
    """The shared protocol section: from its banner to the next one."""
    match = re.search(r"# \d+\. Tunnel protocol: .*?\n#{79}\n(.*?)\n#{79}\n", source, re.S)
    assert match, "no tunnel protocol section"
    return match.group(1)


def test_both_programs_carry_the_same_protocol_text():
    assert tunnel_section(SATELLITE_PY) == tunnel_section(CLIENT_PY)
    assert "class Tunnel:" in tunnel_section(SATELLITE_PY)


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
    for i in range(3):
        line = resp.fp.readline()             # raw stream: chunk-size lines, then the event's lines
        while not line.startswith(b"data"):
            line = resp.fp.readline()
            assert line, "stream ended early"
        assert line == f"data: event {i}\n".encode()
        if i < 2:
            get(job_satellite, result["url"], "/next")      # the app sends the next event only now
    conn.close()

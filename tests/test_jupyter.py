"""A real Jupyter server on a "compute node" (127.0.0.3), reached only through satellite."""
import json
import os
import socket
import subprocess
import sys
import uuid

import ipykernel  # noqa: F401  (a missing test dependency fails the run: tests/requirements.txt)
import jupyter_server  # noqa: F401
import pytest
import websocket

from conftest import OTHER_NODE, json_body, start_group, stop_group, wait_for


def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter(tmp_path):
    """Start jupyter_server with a given token (by environment, never on the command line)."""
    procs = []

    def start(token):
        port = free_port(OTHER_NODE)
        env = dict(os.environ, JUPYTER_TOKEN=token, HOME=str(tmp_path), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
                   JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_DATA_DIR=str(tmp_path / "data"))
        proc = start_group([sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
                            f"--ServerApp.ip={OTHER_NODE}", f"--ServerApp.port={port}",
                            "--ServerApp.port_retries=0", f"--ServerApp.root_dir={tmp_path}",
                            # bound to loopback, Jupyter would refuse the proxied Host name;
                            # on a real compute node address this is already its default
                            "--ServerApp.allow_remote_access=True"],
                           env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "jupyter.log", "w"))
        procs.append(proc)
        assert token not in " ".join(proc.args)

        def listening():
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "jupyter.log").read_text())
            try:
                socket.create_connection((OTHER_NODE, port), 1).close()
                return True
            except OSError:
                return False
        wait_for(listening, timeout=60, what="jupyter_server to listen")
        return port
    yield start
    for proc in procs:
        stop_group(proc, grace=20)                 # it shuts its kernels down (each in a session of its own)


def execute(ws, code):
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    for _ in range(200):
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "execute_result":
            return msg["content"]["data"]["text/plain"]
        if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "error":
            raise AssertionError(msg["content"])
    raise AssertionError("no execute_result")


def test_jupyter_kernel_executes_code_through_the_link(satellite, jupyter):
    link = satellite.getlink()
    port = jupyter(link["token"])                      # the link's token is Jupyter's token too
    status, fields = satellite.api("redeem", source=OTHER_NODE, key=link["key"], port=port)
    assert status == 200, fields
    host = satellite.host(link["alias"])

    # the browser's first visit: satellite and Jupyter both accept the same ?token=
    status, headers, _ = satellite.request(host, "/api/status?token=" + link["token"])
    assert status == 200
    cookie = headers["Set-Cookie"].split(";")[0]

    # without the link's token satellite answers; Jupyter never sees the request
    assert satellite.request(host, "/api/kernels")[0] == 403

    auth = {"Authorization": "token " + link["token"]}
    status, _, body = satellite.request(host, "/api/kernels", "POST", headers=auth, body=b"{}")
    assert status == 201, body
    kernel = json_body(body)["id"]

    ws = websocket.create_connection(f"wss://{host}:{satellite.port}/api/kernels/{kernel}/channels",
                                     socket=satellite.tls_socket(host), timeout=60,
                                     header=[f"Authorization: token {link['token']}", f"Cookie: {cookie}"])
    assert execute(ws, "6*7") == "42"
    ws.close()
    assert satellite.request(host, f"/api/kernels/{kernel}", "DELETE", headers=auth)[0] == 204
    assert satellite.api("status", key=link["key"])[1]["state"] == "proxied"

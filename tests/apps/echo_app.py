#!/usr/bin/env python3
"""A small web app that plays "the job's app" in tests and in `make demo`.

Stdlib only. Every request it receives is appended to $APP_REQUEST_LOG (one line,
"METHOD target"), so tests can prove that a refused request never reached it.

    GET  /                  a page (with the token it was given, if any, checked like Jupyter does)
    GET  /headers           JSON: method, target and the header fields as received
    GET  /download?size=N   N bytes of a fixed pseudo-random pattern (Content-Length)
    POST /upload            streams the body, answers {"bytes": n, "sha256": ...}
    GET  /events?n=N        text/event-stream, chunked; event i+1 waits for GET /next
    GET  /next              releases the next event of /events
    GET  /no-length         a body delimited by closing the connection
    GET  /status/NNN        an empty answer with that status
    GET  /ws                WebSocket echo (text and binary)

usage: echo_app.py [--host 127.0.0.1] [--port 0] [--unix PATH] [--certfile C --keyfile K]
(--unix: serve on that Unix socket instead, as code-server --socket does)
prints "listening HOST PORT" when ready
"""
import argparse
import base64
import hashlib
import http.server
import json
import os
import random
import socket
import socketserver
import ssl
import struct
import sys
import threading
import urllib.parse

PATTERN = random.Random(1234).randbytes(1 << 20)
EVENT_STEP = threading.Semaphore(0)
LOG_LOCK = threading.Lock()


def pattern_bytes(size):
    """The download body, in pieces: the same 1 MiB pattern repeated."""
    while size > 0:
        piece = PATTERN[:min(size, len(PATTERN))]
        size -= len(piece)
        yield piece


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True          # head and body are separate writes

    def log_message(self, *args):
        pass

    def record(self):
        path = os.environ.get("APP_REQUEST_LOG")
        if path:
            with LOG_LOCK, open(path, "a") as f:
                f.write(f"{self.command} {self.path}\n")

    def reply(self, status, body=b"", ctype="text/plain", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self.record()
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        route = url.path
        if route == "/":
            token = os.environ.get("APP_TOKEN")
            if token and query.get("token") != token and f"app-token={token}" not in (self.headers.get("Cookie") or ""):
                return self.reply(403, b"app: wrong or missing token\n")
            extra = [("Set-Cookie", f"app-token={token}; Path=/")] if token else []
            return self.reply(200, b"<!doctype html><title>demo app</title><h1>Hello from the compute node</h1>\n",
                              "text/html", extra)
        if route == "/env":                         # what the job's environment (e.g. a module) gave the app
            return self.reply(200, os.environ.get(query.get("name", ""), "").encode())
        if route == "/set-cookie":                  # the test names the cookie, attributes included
            extra = [("Set-Cookie", query.get("v", ""))] + ([("Clear-Site-Data", '"cookies"')] if "clear" in query else [])
            return self.reply(200, b"cookie set\n", "text/plain", extra)
        if route == "/headers":
            body = json.dumps({"method": self.command, "target": self.path,
                               "headers": [[k, v] for k, v in self.headers.items()]}).encode()
            return self.reply(200, body, "application/json")
        if route == "/download":
            size = int(query.get("size", "0"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command != "HEAD":
                for piece in pattern_bytes(size):
                    self.wfile.write(piece)
            return
        if route == "/events":
            return self.events(int(query.get("n", "3")))
        if route == "/next":
            EVENT_STEP.release()
            return self.reply(200, b"next\n")
        if route == "/no-length":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until-close body\n" * 1000)
            self.close_connection = True
            return
        if route.startswith("/status/"):
            status = int(route.rsplit("/", 1)[1])
            self.send_response(status)
            if status not in (204, 304):
                self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        self.reply(404, b"not found\n")

    def do_POST(self):
        self.record()
        if urllib.parse.urlsplit(self.path).path != "/upload":
            return self.reply(404, b"not found\n")
        digest, total = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data = self.rfile.read(size)
                self.rfile.readline()
                digest.update(data)
                total += len(data)
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                data = self.rfile.read(min(remaining, 1 << 20))
                if not data:
                    break
                digest.update(data)
                total += len(data)
                remaining -= len(data)
        body = json.dumps({"bytes": total, "sha256": digest.hexdigest()}).encode()
        self.reply(200, body, "application/json")

    do_PUT = do_POST

    def events(self, count):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(count):
            if i:
                EVENT_STEP.acquire(timeout=30)
            data = f"data: event {i}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def websocket(self):
        accept = base64.b64encode(hashlib.sha1(
            self.headers["Sec-WebSocket-Key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            if opcode == 9:
                opcode = 10
            if len(data) < 126:
                frame = bytes([0x80 | opcode, len(data)])
            elif len(data) < 65536:
                frame = bytes([0x80 | opcode, 126]) + struct.pack("!H", len(data))
            else:
                frame = bytes([0x80 | opcode, 127]) + struct.pack("!Q", len(data))
            self.wfile.write(frame + data)
            self.wfile.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certfile", help="serve HTTPS with this certificate (and --keyfile)")
    parser.add_argument("--keyfile")
    parser.add_argument("--unix", help="serve on this Unix socket (mode 0600) instead of host and port")
    args = parser.parse_args()
    if args.unix:
        class UnixServer(http.server.ThreadingHTTPServer):
            address_family = socket.AF_UNIX

            def server_bind(self):
                old = os.umask(0o177)
                try:
                    socketserver.TCPServer.server_bind(self)
                finally:
                    os.umask(old)
                self.server_name, self.server_port = "localhost", 0

            def get_request(self):
                sock, _ = self.socket.accept()
                return sock, ("unix", 0)
        server = UnixServer(args.unix, type("UnixHandler", (Handler,), {"disable_nagle_algorithm": False}))
        server.daemon_threads = True
        print("listening", args.unix, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    if args.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.certfile, args.keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print("listening", args.host, server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

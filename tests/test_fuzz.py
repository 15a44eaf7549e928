"""Fuzzing the request parser and the API's parameter handling (Hypothesis).

CI runs a fixed budget; `make fuzz` (HYPOTHESIS_PROFILE=long) runs many more examples. Properties:
the parser either refuses with an HttpError or returns a request that is unambiguous — exactly one
Host, never both Transfer-Encoding and Content-Length, a path target, no control characters; the
chunked decoder never accepts a body that is not well framed; the API answers ApiError or a 2xx."""
import os
import socket
import string
import sys
import tempfile
import time

from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import satellite  # noqa: E402

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def stream_of(data: bytes) -> satellite.Stream:
    """A real socket carrying `data`, then EOF."""
    reader, writer = socket.socketpair()
    writer.sendall(data)
    writer.close()
    reader.settimeout(5)
    return satellite.Stream(reader)


def parse(data: bytes):
    """Through a real socket, as the server reads it (the parser itself is pure: request_from_bytes)."""
    stream = stream_of(data)
    try:
        from_socket = satellite.read_request(stream, time.monotonic() + 5)
    except satellite.HttpError as exc:
        from_socket = exc
    finally:
        stream.sock.close()
    try:
        in_memory = satellite.request_from_bytes(data)
    except satellite.HttpError as exc:
        in_memory = exc
    assert type(from_socket) is type(in_memory)
    if isinstance(from_socket, satellite.HttpError):
        assert from_socket.status == in_memory.status
        raise from_socket
    return from_socket


def check_unambiguous(request) -> None:
    headers = request.headers
    assert len(headers.get_all("host")) == 1
    assert not (headers.get_all("transfer-encoding") and headers.get_all("content-length"))
    assert request.target.startswith("/")
    assert request.framing in ("none", "length", "chunked")
    assert request.length >= 0
    for name, value in headers.fields:
        assert satellite.TOKEN_CHARS.match(name)
        assert not any(c in value for c in "\r\n\0")
    if request.framing == "chunked":
        assert [v.strip().lower() for v in headers.get_all("transfer-encoding")] == ["chunked"]


@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_break_the_parser(data):
    try:
        request = parse(data)
    except satellite.HttpError as exc:
        assert 400 <= exc.status < 600
        return
    if request is not None:
        check_unambiguous(request)


TRICKY = ["Host", "host", "HOST", "Content-Length", "Transfer-Encoding", "Transfer_Encoding", "Content_Length",
          "Connection", "Upgrade", "X-Forwarded-For", "Cookie", "Expect", " Host", "Host ", "X-A"]
VALUES = st.text(alphabet=string.printable + "\x00\x0b\x7f\x85é", max_size=40)


@given(method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "get", "BREW", "G ET", ""]),
       target=st.sampled_from(["/", "/a?token=x", "http://a.sat.test/", "https://evil/", "*", "/%0d%0a", "//x"]),
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1"]),
       fields=st.lists(st.tuples(st.sampled_from(TRICKY), VALUES), max_size=8),
       ending=st.sampled_from(["\r\n", "\n", "\r"]),
       body=st.binary(max_size=64))
def test_structured_requests_are_refused_or_unambiguous(method, target, version, fields, ending, body):
    head = f"{method} {target} {version}\r\n" + "".join(f"{n}: {v}{ending}" for n, v in fields) + "\r\n"
    try:
        request = parse(head.encode("utf-8", "surrogateescape") + body)
    except satellite.HttpError as exc:
        assert 400 <= exc.status < 600
        return
    if request is not None:
        check_unambiguous(request)


@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
       size_text=st.sampled_from(["{:x}", "{:X}", "0x{:x}", "{:x} ", "+{:x}", "-{:x}", "{:x};ext=1", "{:08x}"]),
       trailer=st.sampled_from(["", "X-T: 1\r\n"]), corrupt=st.booleans())
def test_chunked_decoder_accepts_only_well_framed_bodies(chunks, size_text, trailer, corrupt):
    body = b"".join(size_text.format(len(c)).encode() + b"\r\n" + c + (b"\r\n" if not corrupt else b"\n")
                    for c in chunks) + b"0\r\n" + trailer.encode() + b"\r\n"
    stream = stream_of(body)
    sink_reader, sink = socket.socketpair()
    try:
        satellite.copy_chunked(stream, sink)
        accepted = True
    except (satellite.HttpError, ConnectionError):
        accepted = False
    finally:
        stream.sock.close()
        sink.close()
        sink_reader.close()
    well_framed = (not corrupt or not chunks) and (size_text in ("{:x}", "{:X}", "{:x};ext=1", "{:08x}") or not chunks)
    assert accepted == well_framed


STORE_DIR = tempfile.mkdtemp(prefix="satellite-fuzz-")
SETTINGS = satellite.Settings(domain="sat.test", cert="c", key="k", db=os.path.join(STORE_DIR, "f.db"))
STORE = satellite.Store(SETTINGS.db)
API = satellite.ManagementApi(SETTINGS, STORE, satellite.Events(STORE, ""), satellite.Metrics())
PARAM = st.text(alphabet=string.ascii_letters + string.digits + "%&=+;:/?-_.~ \x00é", max_size=60)


@given(endpoint=st.sampled_from(sorted(p for p in API.routes if p.startswith("/api/"))), query=PARAM, body=PARAM,
       peer=st.sampled_from(["127.0.0.1", "10.9.9.9", "::1", "::ffff:127.0.0.1", "not-an-ip"]))
def test_api_answers_an_error_or_success_for_any_parameters(endpoint, query, body, peer):
    headers = satellite.Headers([("Host", "manage.sat.test"), ("Content-Type", "application/x-www-form-urlencoded")])
    request = satellite.Request("POST", f"{endpoint}?{query}", "HTTP/1.1", headers, "manage.sat.test",
                                "manage.sat.test", "length", len(body.encode()))
    try:
        params = satellite.parse_params(request, body.encode())
        status, fields = API.routes[endpoint](params, peer)
    except satellite.ApiError as exc:
        assert exc.status in (400, 403, 404, 409, 410, 415, 429) and "\n" not in exc.reason
        return
    assert 200 <= status < 300 and isinstance(fields, dict)
    for value in fields.values():
        assert "\n" not in str(value)                # a key=value reply cannot be split by a parameter

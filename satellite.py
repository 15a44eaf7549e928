#!/usr/bin/env python3
"""satellite: an HTTPS reverse proxy that gives batch jobs a secure link.

A user on a login node asks satellite for a link (``/api/getlink``) and gets
``https://<three-words>.<domain>/?token=...`` plus a separate job key. The job,
once it runs on a compute node, starts its web app (Jupyter, TensorBoard, ...)
and redeems the key (``/api/redeem?key=K&port=P``); satellite maps the alias to
the caller's own address and that port (satellite-client's agent also pins its
certificate and asks for an upstream proof: section 10). From then on the link proxies HTTP/1.1
and WebSocket traffic to the app. Until then it shows a status page that turns
into the app by itself.

What it is not: a certificate manager (certificates come from the site's CA or
certbot; satellite loads them and reloads them on SIGHUP), nor a login system
(the link's token is the credential; an SSO front can sit before it).

Pure standard library, Python >= 3.9. One file, meant to be read by the admin
who deploys it. Sections, top-down:

    1. Constants             limits, states, header sets
    2. Configuration         Settings, INI file + flags, durations, networks
    3. Secrets and aliases   token/key generation, hashing, cookies and the cookie key's file
    4. Store                 SQLite (WAL) sessions table, shared with other processes
    5. Operations            audit events, metrics (summed over workers), rate limits, health probes, refresh
   A request, in the order it is handled:
    6. HTTP messages         parse a head strictly (pure), read a body within its limit; Answer
    7. Routing and access    where it goes; who asks; may they (networks, token, cookie, owner,
                             limits) -- decided on the head, before any body is read
    8. Management API        /api/getlink, redeem, state, release, status, jobstates; legacy CGIs
    9. Pages                 status page and its JSON, the session page, the ending notice,
                             403/404/410/502 pages
   10. Proxy                 forward a request, relay bodies, relay WebSockets
   11. Tunnel                frames that carry a session through a connection the job opened;
                             relays that let every worker reach a tunnel attached to one
   12. Server                listening sockets, accept (connection limits), TLS and deadlines, the
                             pipeline (route -> decide -> act), the one writer, HTTP redirect
   13. Commands              serve (one process, or a supervisor and N workers), check, refresh,
                             list, show, revoke, stats, export; main()
   14. Word list             aliases are three words from this list

Handlers return an Answer (status, fields, body or a streaming body); errors are answers
too; `Connection.send` is the one place that writes them.

Why not BaseHTTPRequestHandler: it parses headers with ``email.parser``, which
silently ends the header block at a malformed line (so ``Transfer-Encoding :
chunked`` vanishes into the body: a request-smuggling hole) and allows ~6 MB of
headers. A proxy that is a security boundary parses strictly itself (RFC 9112).
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import configparser
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import mmap
import os
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
from http import HTTPStatus
from pathlib import Path
from typing import Callable, Iterable, Optional

__version__ = "0.1.0"
__all__ = ["Settings", "Store", "Satellite", "main",
           "TUNNEL_PROTOCOL", "Tunnel", "ALIAS_SHAPE", "SESSION_STATES"]     # the last four: the client's too

log = logging.getLogger("satellite")
access_log = logging.getLogger("satellite.access")


###############################################################################
# 1. Constants
###############################################################################

SESSION_STATES = ("queued", "running", "mapped", "proxied", "ended")
USER_PROOFS = ("claim", "munge")                  # what getlink takes as the asking user's identity
REPORTABLE_STATES = ("queued", "running")          # what a job may report via /api/state

# The scheduler's word for a job that is over -> Session.end_reason. A session whose job the scheduler
# reports in one of these ends at once, however the word arrives (/api/jobstates, update-jobs.cgi,
# jobstate-command). Slurm (squeue %T and %t), PBS Pro / Torque (job_state F, C, X), LSF (bjobs DONE,
# EXIT), HTCondor (the words for JobStatus 3 and 4), Grid Engine (d*: being deleted; its finished jobs
# simply leave qstat, which a full snapshot notices: see take_jobstates). Slurm's F (FAILED) and PBS's F
# (finished) share a letter: it says only that the job ended.
JOB_ENDED = {
    "COMPLETED": "job completed", "CD": "job completed", "C": "job completed", "X": "job completed",
    "DONE": "job completed", "F": "job ended",
    "CANCELLED": "job cancelled", "CA": "job cancelled", "REMOVED": "job cancelled",
    "DR": "job cancelled", "DT": "job cancelled", "D": "job cancelled",
    "FAILED": "job failed", "EXIT": "job failed", "BOOT_FAIL": "job failed", "BF": "job failed",
    "TIMEOUT": "job hit its time limit", "TO": "job hit its time limit",
    "DEADLINE": "job hit its deadline", "DL": "job hit its deadline",
    "NODE_FAIL": "job's node failed", "NF": "job's node failed",
    "PREEMPTED": "job preempted", "PR": "job preempted",
    "OUT_OF_MEMORY": "job ran out of memory", "OOM": "job ran out of memory",
}
JOB_NOT_LISTED = "job ended (no longer listed by the scheduler)"

COOKIE_NAME = "__Host-satellite"                   # host-only, Secure, Path=/ by the prefix's rules
NOTICE_COOKIE = "__Host-notice-satellite"          # the session's ending notice was shown (never the app's)
INTERNAL_PREFIX = "/__satellite/"                  # satellite's own paths on a session host
STATUS_PATH = INTERNAL_PREFIX + "status"           # what satellite's pages poll (JSON, in every state)
ENDING_NOTICE = 10 * 60                            # seconds before the end: the notice, the banner, a notification

MAX_REQUEST_LINE = 8192                            # bytes; longer -> 414
MAX_HEADER_BYTES = 32 * 1024                       # all request header lines together; more -> 431
MAX_HEADER_COUNT = 100
MAX_UPSTREAM_HEADER_BYTES = 64 * 1024              # apps may send big cookies or CSPs
COPY_BUFFER = 256 * 1024                           # bulk body relay buffer
RECV_SIZE = 64 * 1024
TLS_RECORD = 16 * 1024                             # the most one TLS record (one SSL_read) carries
MAX_WORKERS = 256                                  # serving processes at most (workers =)
MUNGE_AT_ONCE = 4                                  # unmunge processes one worker runs at once, at most

HOP_BY_HOP = frozenset((
    "connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate",
))
# Headers satellite sets itself when forwarding; the client's values are discarded.
FORWARDING_HEADERS = frozenset((
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
    "x-real-ip", "forwarded", "x-satellite-front",
))
# Names apps behind CGI/WSGI-style gateways may fold '_' into '-': refused in either spelling.
FRAMING_LOOKALIKES = HOP_BY_HOP | FORWARDING_HEADERS | frozenset(("content-length", "host"))
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"))
IDEMPOTENT_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))

TOKEN_CHARS = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")      # RFC 9110 token
FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")        # CTLs except HTAB
CHUNK_SIZE_LINE = re.compile(rb"^([0-9A-Fa-f]{1,16})(;[\t !#-~\x80-\xff]*)?\r\n$")
CONTENT_LENGTH = re.compile(r"^[0-9]{1,18}\Z")
HOST_VALUE = re.compile(r"^(?:[a-z0-9._~!$&'()*+,;=%-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?\Z")
ALIAS_SHAPE = re.compile(r"^[a-z]{3,7}-[a-z]{3,7}-[a-z]{3,7}\Z")
JOBID_SHAPE = re.compile(r"^[A-Za-z0-9._\-\[\]@:+]{1,64}\Z")
TARGET_SAFE = re.compile(r"^[\x21-\x7e]+\Z")                       # visible ASCII, no spaces
REDACT_PARAMS = re.compile(r"(?i)([?&;](?:token|key)=)[^&;#\s]*")

# The upstream proof (section 10): a line satellite sends first on every connection it opens to an isolating
# agent (satellite-client's direct mode), inside the TLS the agent's pinned certificate ends. The agent relays
# nothing to its app before it has read exactly UPSTREAM_PREAMBLE_SIZE bytes equal to the session's line.
UPSTREAM_PREAMBLE_PREFIX = b"satellite-upstream/1 "
UPSTREAM_PREAMBLE_SIZE = len(UPSTREAM_PREAMBLE_PREFIX) + 64 + 2           # prefix, 64 hex digits, CRLF

# Sent with every page and API answer satellite writes itself (not with the apps' answers).
PAGE_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                "script-src 'unsafe-inline'; connect-src 'self'"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


###############################################################################
# 2. Configuration
###############################################################################

def parse_duration(text: str) -> int:
    """'90' or '90s', '30m', '12h', '2d' -> seconds."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([smhd]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 12h, 2d)")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def parse_networks(text: str) -> tuple:
    """'10.0.0.0/8, 127.0.0.1' -> tuple of ip_network; empty string -> no network."""
    nets = []
    for part in str(text).replace(" ", "").split(","):
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"not a network: {part!r} (use CIDR, e.g. 10.1.0.0/16)") from None
    return tuple(nets)


def parse_listen(text: str) -> tuple:
    """'127.0.0.1:8443' or '[::1]:8443' -> (host, port)."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:([0-9]+)|([^:\[\]]*):([0-9]+)", str(text).strip())
    if not match:
        raise ValueError(f"not HOST:PORT: {text!r} (e.g. 0.0.0.0:443 or [::]:443)")
    host = match.group(1) if match.group(1) is not None else match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host or "0.0.0.0", port


def parse_rate(text: str) -> tuple:
    """'30/1m' -> (30, 60): at most 30 in any 60 seconds. '0' switches the limit off."""
    if str(text).strip() == "0":
        return (0, 1)
    count, _, window = str(text).partition("/")
    if not count.strip().isdigit() or not window:
        raise ValueError(f"not a rate: {text!r} (use COUNT/DURATION, e.g. 30/1m, or 0 for no limit)")
    return int(count), parse_duration(window)


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in ("1", "0", "yes", "no", "true", "false", "on", "off"):
        raise ValueError(f"not yes or no: {text!r}")
    return value in ("1", "yes", "true", "on")


def parse_optional_listen(text: str) -> Optional[tuple]:
    return parse_listen(text) if str(text).strip() else None


def parse_port_range(text: str) -> tuple:
    match = re.fullmatch(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*", str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)) <= 65535:
        raise ValueError(f"not a port range: {text!r} (e.g. 1024-65535)")
    return int(match.group(1)), int(match.group(2))


@dataclasses.dataclass
class Settings:
    """Everything `satellite serve` can be told, by INI file ([satellite] section) or flag."""
    domain: str = ""
    listen: tuple = ("127.0.0.1", 8443)
    cert: str = ""
    key: str = ""
    db: str = "satellite.db"
    cookie_key: str = ""                    # file with the key that signs cookies; '' = beside db (cookie_key_path)
    issue_from: tuple = parse_networks("127.0.0.0/8,::1")
    redeem_from: tuple = parse_networks("127.0.0.0/8,::1")
    port_range: tuple = (1024, 65535)
    redeem_within: int = 12 * 3600          # an unredeemed link waits this long for its job
    session_lifetime: int = 12 * 3600       # after redeem, unless getlink asked for another lifetime
    max_session_lifetime: int = 7 * 86400
    public_port: int = 0                    # port shown in links; 0 = the listen port
    access_log: str = "-"                   # file, or '-' for stderr, or 'off'
    log_level: str = "info"
    handshake_timeout: float = 10.0
    idle_timeout: float = 75.0              # keep-alive wait for the next request
    header_timeout: float = 30.0            # deadline to receive a whole request head
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 600.0         # silence allowed from the app mid-response
    max_connections: int = 4096
    max_connections_per_address: int = 256  # one address cannot take every slot (trusted fronts: no cap)
    # operations (refresh, audit, metrics, limits)
    audit_log: str = ""                     # JSON lines file; '' = off, '-' = stderr
    metrics_from: tuple = parse_networks("127.0.0.0/8,::1")
    admin_from: tuple = parse_networks("127.0.0.0/8,::1")     # a front's auth_request is answered for these
    jobstates_from: tuple = ()              # may feed scheduler states (which end sessions): none until named
    getlink_rate: tuple = (120, 60)         # getlink calls per user (per address if no user is named) per window
    max_live_per_source: int = 500          # live sessions per issuing address: a login node's ceiling
    max_live_per_user: int = 20             # live sessions per user: one user cannot fill the node's ceiling
    user_proof: str = "claim"               # how getlink learns the user: 'claim' (user=, believed as a label)
                                            # or 'munge' (a MUNGE credential, checked with unmunge)
    token_failures: tuple = (20, 60)        # wrong tokens per source address per window, then 429
    dead_after: int = 600                   # refresh ends a session whose app has been gone this long
    retention: int = 30 * 86400             # refresh deletes ended sessions this old (their aliases then free)
    jobstate_command: str = ""              # refresh runs it: lines "JOBID STATE [REASON]" (squeue -h -t all -o '%i %T %r')
    job_gone_after: int = 120               # a job a full snapshot has not listed this long after it was seen ends
    hsts: int = 365 * 86400                 # Strict-Transport-Security max-age; 0 = off
    redirect_listen: Optional[tuple] = None # plain-HTTP listener that only redirects to HTTPS
    control_listen: Optional[tuple] = None  # the API, tunnels, metrics, front auth on their own listener
    front_secret: str = ""                  # file with the secret a front on this host sends (X-Satellite-Front)
    trusted_user_header: str = ""           # e.g. X-Remote-User, set by an authenticating front (SSO)
    trusted_fronts: tuple = ()              # the only addresses whose user header is believed
    legacy_api: bool = False                # SDSC Satellite's *.cgi endpoints (weaker: see README)
    workers: int = 0                        # serving processes; 0 = one per core this process may run on

    # name -> parser for values that come as text (INI or flags)
    PARSERS = {
        "listen": parse_listen, "issue_from": parse_networks, "redeem_from": parse_networks,
        "port_range": parse_port_range, "redeem_within": parse_duration,
        "session_lifetime": parse_duration, "max_session_lifetime": parse_duration,
        "public_port": int, "handshake_timeout": float, "idle_timeout": float,
        "header_timeout": float, "upstream_connect_timeout": float, "upstream_timeout": float,
        "max_connections": int, "max_connections_per_address": int, "metrics_from": parse_networks, "admin_from": parse_networks,
        "jobstates_from": parse_networks,
        "getlink_rate": parse_rate, "max_live_per_source": int, "token_failures": parse_rate,
        "max_live_per_user": int,
        "dead_after": parse_duration, "retention": parse_duration, "hsts": parse_duration,
        "job_gone_after": parse_duration,
        "redirect_listen": parse_optional_listen,
        "control_listen": parse_optional_listen, "trusted_fronts": parse_networks, "legacy_api": parse_bool,
        "workers": int,
    }

    @classmethod
    def from_sources(cls, ini_path: Optional[str], overrides: dict, serving: bool = True) -> "Settings":
        """Defaults, then the INI file, then flags (overrides with None values are ignored).
        Admin commands (serving=False) need only the database."""
        values = {}
        if ini_path:
            parser = configparser.ConfigParser(interpolation=None)
            try:
                if not parser.read(ini_path):
                    raise ValueError(f"cannot read config file {ini_path}")
            except configparser.MissingSectionHeaderError as exc:
                raise ValueError(f"{ini_path}: line {exc.lineno}: no [satellite] line before the settings: put "
                                 f"[satellite] on the first line, as in contrib/satellite.ini") from None
            except configparser.Error as exc:
                raise ValueError(f"{ini_path}: {exc.message.splitlines()[0]} (see contrib/satellite.ini for "
                                 f"the form: [satellite], then one NAME = VALUE a line)") from None
            if not parser.has_section("satellite"):
                raise ValueError(f"{ini_path}: no [satellite] section")
            for name, value in parser.items("satellite"):
                values[name.replace("-", "_")] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls()
        settings.given = dict(values)           # the text as written, for `satellite check` (e.g. host bits)
        known = {f.name for f in dataclasses.fields(cls)}
        for name, value in values.items():
            if name not in known:
                raise ValueError(f"unknown setting {name!r}")
            parser = cls.PARSERS.get(name)
            if parser and isinstance(value, str):
                try:
                    value = parser(value)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
            setattr(settings, name, value)
        if serving:
            settings.validate()
        return settings

    def validate(self) -> None:
        self.domain = self.domain.strip().lower().strip(".")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", self.domain):
            raise ValueError("domain: give the DNS domain whose wildcard *.DOMAIN points here, "
                             "e.g. --domain satellite.example.edu")
        if not self.cert or not self.key:
            raise ValueError("cert/key: give the wildcard certificate and its key (--cert, --key)")
        if self.trusted_user_header and not self.trusted_fronts:
            raise ValueError("trusted_user_header needs trusted_fronts: the addresses of the fronts that set it")
        if self.trusted_user_header and not TOKEN_CHARS.match(self.trusted_user_header):
            raise ValueError("trusted_user_header: give a header name, e.g. X-Remote-User")
        if self.max_session_lifetime < self.session_lifetime:
            raise ValueError("max_session_lifetime is shorter than session_lifetime")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers: give 1 to {MAX_WORKERS} serving processes, or 0 for one per core")
        if self.user_proof not in USER_PROOFS:
            raise ValueError(f"user_proof: choose {' or '.join(USER_PROOFS)}")
        for name in ("issue_from", "redeem_from"):
            overlap = [str(n) for n in getattr(self, name) for f in self.trusted_fronts
                       if n.version == f.version and n.overlaps(f)]
            if overlap:
                raise ValueError(f"{name} ({', '.join(overlap)}) includes a trusted front: requests through a front "
                                 "count as the client the front names, so a front's own address must not issue or "
                                 f"redeem links. Give {name.replace('_', '-')} your nodes' own networks (a front on "
                                 "this host is loopback: leave loopback out)")
        if any(net.is_loopback for net in self.trusted_fronts) and not self.front_secret:
            raise ValueError("trusted_fronts includes loopback, which every local user can connect from: give "
                             "front_secret (a file with a secret the front sends as X-Satellite-Front; see "
                             "contrib/nginx-satellite.conf) so satellite can tell the front from them")

    @property
    def worker_count(self) -> int:
        """How many serving processes: `workers`, or one per core satellite may run on (at most MAX_WORKERS).
        The limits are counted once for all of them (Limits), so any number admits what is configured."""
        if self.workers:
            return self.workers
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:                          # not Linux
            cores = os.cpu_count() or 1
        return max(1, min(MAX_WORKERS, cores))

    @property
    def link_port(self) -> int:
        return self.public_port or self.listen[1]

    @property
    def port_suffix(self) -> str:
        """':PORT' for links and redirects, '' for HTTPS's own 443."""
        return "" if self.link_port == 443 else f":{self.link_port}"

    def session_url(self, alias: str) -> str:
        return f"https://{alias}.{self.domain}{self.port_suffix}/"

    @property
    def cookie_key_path(self) -> str:
        """`cookie-key`, or beside the database: /var/lib/satellite/satellite.db -> .../satellite.cookie-key."""
        return self.cookie_key or os.path.splitext(self.db)[0] + ".cookie-key"

    @property
    def upstream_key_path(self) -> str:
        """Beside the cookie key: .../satellite.cookie-key -> .../satellite.upstream-key (same rules, own file:
        rotating the cookie key must not cut running sessions off their agents)."""
        base = self.cookie_key_path
        return (base[:-len(".cookie-key")] if base.endswith(".cookie-key") else base) + ".upstream-key"


def address_in(address: str, networks: Iterable) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


def host_port(host: str, port: int) -> str:
    """'10.0.0.5:8888', or '[fd00::5]:8888' for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def plain_address(address: str) -> str:
    """'::ffff:10.0.0.5' (IPv4-mapped, from a dual-stack socket) -> '10.0.0.5'."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


###############################################################################
# 3. Secrets and aliases
###############################################################################

def new_secret() -> str:
    return secrets.token_urlsafe(32)            # 256 bits


def hash_secret(secret: str) -> str:
    """Secrets are stored only as SHA-256 digests. They are 256 random bits, so a slow
    password hash adds nothing; lookups by digest leak nothing useful about the secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def new_alias() -> str:
    return "-".join(secrets.choice(WORDS) for _ in range(3))


def cookie_value(server_secret: bytes, alias: str, token_hash: str) -> str:
    """The browser cookie is derived from the token, never the token itself, and is bound
    to one alias: a cookie of one session is worthless on another."""
    return hmac.new(server_secret, f"{alias}\0{token_hash}".encode(), hashlib.sha256).hexdigest()


def upstream_proof(upstream_key: bytes, alias: str, key_hash: str) -> str:
    """What proves a connection to the job's agent comes from satellite, for this session: derived from
    the upstream key (a file of its own, like the cookie key) and never stored. It is given to the agent
    once, in the redeem reply over TLS the agent verified, and sent as `upstream_preamble` on every
    connection satellite opens to that session. A reader of the database (which holds key_hash) cannot
    compute it; rotating the cookie key does not change it."""
    return hmac.new(upstream_key, f"upstream\0{alias}\0{key_hash}".encode(), hashlib.sha256).hexdigest()


def upstream_preamble(proof: str) -> bytes:
    return UPSTREAM_PREAMBLE_PREFIX + proof.encode() + b"\r\n"


class CookieKeyError(ValueError):
    """The cookie key's file cannot be used; the message says which file and what to do."""


def file_signature(path: str) -> Optional[tuple]:
    """What changes when a file is written, replaced or chmod'ed; None if it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_cookie_key(path: str) -> bytes:
    """The key in `path`: only from a file of this user's that no one else may read or change."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            text = f.read(100)
    except OSError as exc:
        raise CookieKeyError(f"cookie-key: cannot read {path}: {exc.strerror}") from None
    if st.st_uid != os.geteuid():
        raise CookieKeyError(f"cookie-key: {path} is owned by uid {st.st_uid}, not by the user satellite runs as "
                             f"(uid {os.geteuid()}), so that user could replace it: remove it and satellite makes a "
                             f"new one at start (browsers then open their links again)")
    if st.st_mode & 0o077:
        raise CookieKeyError(f"cookie-key: {path} can be read or changed by other users "
                             f"(mode {st.st_mode & 0o777:04o}), so anyone may hold a copy that forges cookies: "
                             f"make a new key with satellite rotate-cookie-key -c FILE, as the user satellite runs as")
    match = re.fullmatch(rb"([0-9a-f]{64})\n?", text)
    if not match:
        raise CookieKeyError(f"cookie-key: {path} is not a cookie key (64 hex digits): make a new one with "
                             f"satellite rotate-cookie-key -c FILE, as the user satellite runs as")
    return bytes.fromhex(match.group(1).decode())


def write_cookie_key(path: str, replace: bool) -> None:
    """A new random key in `path`, whole or not at all: written to a 0600 file beside it and synced,
    then renamed over the old key (`replace`) or linked in where there is none (a key another
    process made meanwhile is kept). The directory is synced: a rotation survives a power cut."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".cookie-key.")        # 0600, O_EXCL
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, path)
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise CookieKeyError(f"cookie-key: cannot write {path}: {exc.strerror} (give a file in a directory "
                             f"satellite's user may write: cookie-key = FILE)") from None


class CookieKey:
    """The key that signs browser cookies (`cookie_value`). It lives in a file of its own, never in
    the database: the database holds every token's digest, so whoever read both could forge any
    session's cookie. `serve` makes the file (0600) when there is none and refuses one that other
    users may read or change. `rotate-cookie-key` replaces it whole; every process using it notices
    within CHECK_SECONDS, and cookies made with the old key are refused from then on (browsers open
    their link again; links, tokens, job keys and sessions are untouched). A replacement that cannot
    be used is logged once and the key in use kept, as a broken certificate is on reload."""

    CHECK_SECONDS = 1.0

    def __init__(self, path: str, name: str = "cookie-key"):
        self.path = path
        self.name = name                          # "upstream-key": the same rules for the upstream proofs' key
        self._lock = threading.Lock()
        if not os.path.lexists(path):
            write_cookie_key(path, replace=False)
            log.info("%s: made a new key in %s", name, path)
        self._signature = file_signature(path)
        self.key = read_cookie_key(path)
        self._checked = time.monotonic()

    def current(self) -> bytes:
        """The key, read again if its file changed (looked at no more than every CHECK_SECONDS)."""
        now = time.monotonic()
        if now - self._checked >= self.CHECK_SECONDS:
            with self._lock:
                if now - self._checked >= self.CHECK_SECONDS:
                    self._checked = now
                    self._reload_if_changed()
        return self.key

    def _reload_if_changed(self) -> None:
        signature = file_signature(self.path)
        if signature == self._signature:
            return
        self._signature = signature               # a file that cannot be used is reported once, not every second
        try:
            key = read_cookie_key(self.path)
        except CookieKeyError as exc:
            log.error("%s; keeping the key in use", exc)
            return
        if key != self.key:
            self.key = key
            log.info("%s reloaded from %s: what the old key signed no longer works", self.name, self.path)


def iso_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def redact(target: str) -> str:
    """Access logs never show secrets: token=... and key=... become token=REDACTED."""
    return REDACT_PARAMS.sub(r"\1REDACTED", target)


def logged_alias(session: "Session") -> str:
    """What logs call a session. A legacy session's alias is its redeem secret (SDSC's design), so no log
    holds it: it is 'legacy-' and the first 12 hex digits of its token's SHA-256 (a token drawn at random
    and handed to no one, so the name reveals nothing; any digest of the alias itself could be reversed
    by trying all 36 bits of aliases). The database's token_hash column finds the session again."""
    return f"legacy-{session.token_hash[:12]}" if session.legacy else session.alias


###############################################################################
# 4. Store
###############################################################################

class ApiError(Exception):
    """An error answered with a real status code and a one-line reason."""

    def __init__(self, status: int, reason: str, retry_after: int = 0):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


@dataclasses.dataclass
class Session:
    alias: str
    token_hash: str
    key_hash: str
    state: str
    created: float
    expires: float
    lifetime: int
    issued_to: str
    jobid: Optional[str]
    target_host: Optional[str]
    target_port: Optional[int]
    redeemed: Optional[float]
    ended: Optional[float]
    end_reason: Optional[str]
    backend_gone: Optional[float] = None
    jobstate: Optional[str] = None
    user: Optional[str] = None
    tls_pin: Optional[str] = None
    legacy: Optional[int] = None
    tunnel_attach: Optional[int] = None
    issued_for: Optional[str] = None
    user_proof: Optional[str] = None
    job_seen: Optional[float] = None
    pending_reason: Optional[str] = None
    upstream_proof: Optional[int] = None       # 1: the app is behind an agent that wants satellite's proof
    tunnel_pid: Optional[int] = None           # the serving process that holds the tunnel (with workers)

    @property
    def target(self) -> Optional[tuple]:
        return (self.target_host, self.target_port) if self.target_host else None

    @property
    def tunneled(self) -> bool:
        """Reached through the job's tunnel, not by connecting to target."""
        return self.tunnel_attach is not None

    def is_over(self, now: float) -> bool:
        return self.state == "ended" or now >= self.expires

    def describe(self) -> dict:
        """What /api/status shows: no secret, not even a hash."""
        info = {"alias": self.alias, "state": "ended" if self.is_over(time.time()) else self.state,
                "created": iso_time(self.created), "expires": iso_time(self.expires)}
        if self.jobid:
            info["jobid"] = self.jobid
        if self.tunneled:
            info["target"] = f"tunnel from {self.target_host}"
        elif self.target:
            info["target"] = host_port(self.target_host, self.target_port)
        if self.jobstate:
            info["jobstate"] = self.jobstate
        if self.pending_reason:
            info["pending_reason"] = self.pending_reason
        if self.user:
            info["user"] = self.user
        if self.issued_for:
            info["issued_for"] = f"{self.issued_for} ({self.user_proof})"
        if self.tls_pin:
            info["upstream"] = "tls, pinned sha256:" + self.tls_pin + (", proof" if self.upstream_proof else "")
        if self.end_reason:
            info["ended_because"] = self.end_reason
        return info


SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    alias       TEXT PRIMARY KEY,          -- three words; never reissued while the row exists
    token_hash  TEXT NOT NULL UNIQUE,      -- sha256 of the browser/app token
    key_hash    TEXT NOT NULL UNIQUE,      -- sha256 of the job's redeem/control key
    state       TEXT NOT NULL,             -- queued running mapped proxied ended
    created     REAL NOT NULL,
    expires     REAL NOT NULL,             -- redeem deadline, then end of the session
    lifetime    INTEGER NOT NULL,          -- seconds granted from redeem on
    issued_to   TEXT NOT NULL,             -- address that asked for the link
    jobid       TEXT,
    target_host TEXT,                      -- decided by satellite: the redeemer's address
    target_port INTEGER,
    redeemed    REAL,
    ended       REAL,
    end_reason  TEXT
);
CREATE INDEX IF NOT EXISTS sessions_state ON sessions(state);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Columns added after the first release: (name, declaration), added to older databases on open.
ADDED_COLUMNS = [
    ("backend_gone", "REAL"),              # first failed health probe of the mapped app, if failing
    ("jobstate", "TEXT"),                  # the scheduler's word for the job, from the feed
    ("user", "TEXT"),                      # with SSO: the first signed-in user who opened it owns it
    ("tls_pin", "TEXT"),                   # sha256 of the app's own certificate: satellite speaks TLS to it
    ("legacy", "INTEGER"),                 # issued by the legacy API: the alias redeems, no proxy token check
    ("tunnel_attach", "INTEGER"),          # reached through the job's tunnel: its last attach number
    ("issued_for", "TEXT"),                # the user who asked for the link, if named
    ("user_proof", "TEXT"),                # how that was known: 'sso', 'munge' (verified) or 'claim' (not)
    ("job_seen", "REAL"),                  # when a job-state feed last listed the session's job
    ("pending_reason", "TEXT"),            # why the scheduler keeps the job pending (squeue %r), from the feed
    ("upstream_proof", "INTEGER"),         # 1: send the upstream proof first (a flag: the proof is never stored)
    ("tunnel_pid", "INTEGER"),             # the process that holds the tunnel: its death marks it gone
]


NOT_CACHED = object()


class Store:
    """Sessions in SQLite (WAL), one connection per thread.

    Other processes (cron refresh, admin commands) open the same file; WAL lets them
    read while satellite writes. synchronous=NORMAL in WAL mode survives a crash of the
    process (kill -9), which is what matters here; it may lose the last commits on power loss.

    The proxy's per-request lookup (`cached_session`) is served from memory: this process's
    writes clear the cache at once, and so do other workers' (a shared write counter); other processes'
    writes are noticed by the database and
    WAL files changing (stat, at most every CACHE_CHECK_SECONDS: every commit appends to the
    WAL), and nothing is kept longer than CACHE_MAX_AGE. So a revoke or refresh elsewhere takes
    effect within a tenth of a second, without a query per request. (Not PRAGMA data_version:
    that needs a connection kept open, and an idle open connection makes SQLite defer closing
    other connections' files.)
    """

    CACHE_CHECK_SECONDS = 0.1
    CACHE_MAX_AGE = 2.0
    STALE_SWEEP_SECONDS = 60.0

    def __init__(self, path: str, workers_writes: Optional[memoryview] = None):
        """`workers_writes`: with several workers, one shared word each bumps after every write, so a
        write in one worker clears the others' caches at once (a memory read per request, no syscall)."""
        self.path = path
        self._workers_writes = workers_writes
        self._workers_seen = workers_writes[0] if workers_writes is not None else 0
        self._local = threading.local()
        self._cache: dict = {}
        self._stale: dict = {}                    # what the cache held before: served only if the database fails
        self._cache_lock = threading.Lock()
        self._generation = 0                      # bumped by every write of this process
        self._signature = None                    # the database files as last seen
        self._checked = self._cleared = 0.0
        self._swept = 0.0
        db = self.db
        db.executescript(SCHEMA)
        present = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
        for name, declaration in ADDED_COLUMNS:
            if name not in present:
                db.execute(f"ALTER TABLE sessions ADD COLUMN {name} {declaration}")
        if db.execute("SELECT 1 FROM meta WHERE name = 'cookie_secret'").fetchone():
            # Older versions kept the cookie key here, beside every token's digest: whoever read the
            # database could forge cookies. The key has its own file now (CookieKey); browsers sign in once more.
            db.execute("DELETE FROM meta WHERE name = 'cookie_secret'")
        self.close_thread_connection()      # an idle connection's locks would keep closed ones' descriptors open

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=15, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def close_thread_connection(self) -> None:
        """Close this thread's connection. A connection and its statement cache refer to each other,
        so without this only a cyclic GC pass would free a finished thread's file descriptors."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            del self._local.conn

    @contextlib.contextmanager
    def immediate_transaction(self):
        """BEGIN IMMEDIATE .. COMMIT, ROLLBACK on any error: a check-then-write no other process can interleave."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            self.invalidate()

    def _write(self, sql: str, params: tuple = ()) -> int:
        rowcount = self.db.execute(sql, params).rowcount
        self.invalidate()
        return rowcount

    def invalidate(self) -> None:
        with self._cache_lock:
            self._clear_cache(time.monotonic())
            if self._workers_writes is not None:        # a lost increment (two at once) still changes it
                self._workers_writes[0] += 1
                self._workers_seen = self._workers_writes[0]

    def _clear_cache(self, now: float) -> None:
        self._generation += 1
        self._keep_for_failures(self._cache, time.time())
        self._cache = {}
        self._cleared = now

    def _keep_for_failures(self, cached: dict, wall: float) -> None:
        """Keep what `cached_session` may serve if the database fails: the last known state of live
        sessions, nothing else. An unknown alias or an ended or expired session is dropped as the cache
        is cleared; once every STALE_SWEEP_SECONDS the database says which of the rest are still live
        (a session released elsewhere and never looked up again), so this holds at most the live
        sessions, not every session this process has ever served."""
        stale = self._stale
        for alias, session in cached.items():
            if session is None or session.is_over(wall):
                stale.pop(alias, None)
            else:
                stale[alias] = session
        if stale and wall - self._swept >= self.STALE_SWEEP_SECONDS:
            self._swept = wall
            try:
                live = {row[0] for row in self.db.execute("SELECT alias FROM sessions WHERE state != 'ended'")}
            except sqlite3.Error:
                live = set(stale)                 # the database is failing: this is exactly when it is needed
            self._stale = {a: s for a, s in stale.items() if a in live and not s.is_over(wall)}

    def _files_signature(self) -> tuple:
        return file_signature(self.path + "-wal"), file_signature(self.path)

    def cached_session(self, alias: str) -> Optional[Session]:
        """session(alias), from memory while nothing has changed (see the class docstring)."""
        now = time.monotonic()
        if self._workers_writes is not None and self._workers_writes[0] != self._workers_seen:
            with self._cache_lock:
                self._workers_seen = self._workers_writes[0]
                self._clear_cache(now)
        if now - self._checked >= self.CACHE_CHECK_SECONDS:
            with self._cache_lock:
                if now - self._checked >= self.CACHE_CHECK_SECONDS:
                    self._checked = now
                    signature = self._files_signature()
                    if signature != self._signature or now - self._cleared >= self.CACHE_MAX_AGE:
                        self._signature = signature
                        self._clear_cache(now)
        # The hit path takes no lock: one dict lookup is atomic, and the dict is replaced, never
        # emptied in place, when cleared. (A lock here made every request queue behind it.)
        generation = self._generation
        cached = self._cache.get(alias, NOT_CACHED)
        if cached is not NOT_CACHED:
            return cached
        try:
            session = self.session(alias)
        except sqlite3.Error as exc:
            with self._cache_lock:
                if alias not in self._stale:
                    raise
            log.warning("database unreadable (%s); serving %s from its last known state", exc,
                        logged_alias(self._stale[alias]))
            return self._stale[alias]
        with self._cache_lock:
            if generation == self._generation:    # nothing was written meanwhile: safe to keep
                if len(self._cache) >= 100_000:
                    self._cache = {}
                self._cache[alias] = session
        return session

    def _session(self, where: str, value: str) -> Optional[Session]:
        row = self.db.execute(f"SELECT * FROM sessions WHERE {where} = ?", (value,)).fetchone()
        return Session(**dict(row)) if row else None

    # lookups ---------------------------------------------------------------
    def session(self, alias: str) -> Optional[Session]:
        return self._session("alias", alias)

    def session_by_key(self, key: str) -> Optional[Session]:
        found = self._session("key_hash", hash_secret(key))
        return found if found and secret_matches(key, found.key_hash) else None

    def session_by_token(self, token: str) -> Optional[Session]:
        found = self._session("token_hash", hash_secret(token))
        return found if found and secret_matches(token, found.token_hash) else None

    def live_session_by_key(self, key: str) -> Session:
        """The session a job key controls, or ApiError 404 / 410."""
        session = self.session_by_key(key) if key else None
        if session is None:
            raise ApiError(404, "unknown key")
        if session.is_over(time.time()):
            self.end(session.alias, "expired")
            raise ApiError(410, "this session has ended")
        return session

    # changes ---------------------------------------------------------------
    def create_link(self, issued_to: str, lifetime: int, redeem_within: int, legacy: bool = False,
                    user: Optional[tuple] = None) -> tuple:
        """A new session; returns (Session, token, key). Aliases are never reused.
        A legacy session's key is its alias, as in SDSC's Satellite. `user`: (name, how it is known)."""
        token = new_secret()
        now = time.time()
        for _ in range(20):
            alias = new_alias()
            key = alias if legacy else new_secret()
            try:
                self._write("INSERT INTO sessions (alias, token_hash, key_hash, state, created, expires,"
                            " lifetime, issued_to, legacy, issued_for, user_proof)"
                            " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                            (alias, hash_secret(token), hash_secret(key), now, now + redeem_within,
                             lifetime, issued_to, 1 if legacy else None, *(user or (None, None))))
            except sqlite3.IntegrityError:
                continue                       # alias taken (or retained): draw again
            return self.session(alias), token, key
        raise ApiError(503, "could not find an unused alias; the word list is exhausted")

    def redeem(self, key: str, host: str, port: int, tls_pin: Optional[str] = None, once: bool = False,
               proof: bool = False) -> Session:
        """Map a session to host:port. `once` (the legacy API, whose key is the alias): a redeemed session
        keeps its target; the same host and port again is a retry and changes nothing."""
        with self.immediate_transaction() as db:
            session = self.live_session_by_key(key)
            if once and session.target:
                if session.target == (host, port) and not session.tunneled:
                    return session
                raise ApiError(409, "nonce already used: this link was redeemed already")
            if session.tunneled:
                raise ApiError(409, "this session is reached through its tunnel")
            if session.target_host and session.target_host != host:
                raise ApiError(409, "already redeemed from another host")
            state = "proxied" if session.state == "proxied" and session.target == (host, port) else "mapped"
            db.execute("UPDATE sessions SET state = ?, target_host = ?, target_port = ?, redeemed = ?,"
                       " expires = ?, tls_pin = ?, upstream_proof = ? WHERE alias = ?",
                       (state, host, port, time.time(), time.time() + session.lifetime, tls_pin,
                        1 if proof else None, session.alias))
        return self.session(session.alias)

    def attach_tunnel(self, key: str, host: str, attach: int) -> Session:
        """Map a session to the tunnel its job opened from `host` to this process (tunnel_pid: if it dies,
        the supervisor marks the tunnel gone). Attach numbers only grow, so a recorded or replayed attach
        request is refused; the lifetime starts at the first."""
        with self.immediate_transaction() as db:
            session = self.live_session_by_key(key)
            if session.target and not session.tunneled:
                raise ApiError(409, "already redeemed for direct connections")
            if session.tunneled and attach <= session.tunnel_attach:
                raise ApiError(409, "stale attach number: a replayed or out-of-order tunnel connection")
            now = time.time()
            db.execute("UPDATE sessions SET state = ?, target_host = ?, target_port = 0, tunnel_attach = ?,"
                       " tunnel_pid = ?, redeemed = ?, expires = ?, backend_gone = NULL WHERE alias = ?",
                       ("proxied" if session.state == "proxied" else "mapped", host, attach, os.getpid(),
                        session.redeemed or now, session.expires if session.redeemed else now + session.lifetime,
                        session.alias))
        return self.session(session.alias)

    def mark_tunnels_down(self, since: float) -> None:
        """At start: no tunnel is attached to a fresh process, so refresh may count their absence."""
        self._write("UPDATE sessions SET backend_gone = ? WHERE tunnel_attach IS NOT NULL AND state != 'ended'"
                    " AND backend_gone IS NULL", (since,))

    def mark_tunnels_of_process_down(self, pid: int, since: float) -> int:
        """A worker died (kill -9, the OOM killer) with its tunnels: refresh may count their absence. A tunnel
        attached since to another worker has that worker's pid, and is left alone."""
        return self._write("UPDATE sessions SET backend_gone = ? WHERE tunnel_pid = ? AND state != 'ended'"
                           " AND backend_gone IS NULL", (since, pid))

    def report_state(self, key: str, state: str, jobid: Optional[str]) -> Session:
        session = self.live_session_by_key(key)
        if jobid:
            self._write("UPDATE sessions SET jobid = ? WHERE alias = ?", (jobid, session.alias))
        # Reports only move a session forward: 'queued' after 'running', or either after redeem, is stale.
        order = SESSION_STATES.index
        if order(state) > order(session.state):
            self._write("UPDATE sessions SET state = ? WHERE alias = ? AND state = ?",
                        (state, session.alias, session.state))
        return self.session(session.alias)

    def bind_user(self, alias: str, user: str) -> Optional[str]:
        """Give an unowned session to `user`; returns the owner (who may be someone else)."""
        self._write("UPDATE sessions SET user = ? WHERE alias = ? AND user IS NULL", (user, alias))
        return self.session(alias).user

    def mark_proxied(self, session: Session) -> None:
        """Best effort: a full or read-only disk must not stop the proxy from serving."""
        try:
            self._write("UPDATE sessions SET state = 'proxied' WHERE alias = ? AND state = 'mapped'",
                        (session.alias,))
        except sqlite3.Error as exc:
            log.warning("could not mark %s proxied: %s", logged_alias(session), exc)

    def end(self, alias: str, reason: str) -> bool:
        """End a session; True if this call ended it (so one of two racing callers records it)."""
        return self._write("UPDATE sessions SET state = 'ended', ended = ?, end_reason = ?"
                           " WHERE alias = ? AND state != 'ended'", (time.time(), reason, alias)) == 1

    # operations ------------------------------------------------------------
    def sessions(self, states: Iterable = SESSION_STATES) -> list:
        states = tuple(states)
        rows = self.db.execute(f"SELECT * FROM sessions WHERE state IN ({','.join('?' * len(states))})"
                               " ORDER BY created", states).fetchall()
        return [Session(**dict(row)) for row in rows]

    def live_count_from(self, source: str) -> int:
        return self.db.execute("SELECT count(*) FROM sessions WHERE issued_to = ? AND state != 'ended'"
                               " AND expires > ?", (source, time.time())).fetchone()[0]

    def live_count_for(self, user: str) -> int:
        return self.db.execute("SELECT count(*) FROM sessions WHERE issued_for = ? AND state != 'ended'"
                               " AND expires > ?", (user, time.time())).fetchone()[0]

    def live_by_user(self) -> dict:
        """Live sessions per named user ('' for links nobody was named for)."""
        return dict(self.db.execute("SELECT coalesce(issued_for, ''), count(*) FROM sessions WHERE state != 'ended'"
                                    " AND expires > ? GROUP BY 1 ORDER BY 2 DESC", (time.time(),)).fetchall())

    def count_by_state(self) -> dict:
        counts = dict.fromkeys(SESSION_STATES, 0)
        counts.update(self.db.execute("SELECT state, count(*) FROM sessions GROUP BY state").fetchall())
        return counts

    def set_backend_gone(self, alias: str, since: Optional[float], attach: Optional[int] = None) -> None:
        """`attach`: only while that tunnel is the session's last (not replaced in another worker meanwhile)."""
        if attach is None:
            self._write("UPDATE sessions SET backend_gone = ? WHERE alias = ? AND state != 'ended'", (since, alias))
        else:
            self._write("UPDATE sessions SET backend_gone = ? WHERE alias = ? AND state != 'ended'"
                        " AND tunnel_attach = ?", (since, alias, attach))

    def set_jobstates(self, states: dict, now: float) -> int:
        """Scheduler states by job id (from a feed), and that the feed listed them `now`;
        returns how many sessions they named."""
        changed = 0
        for jobid, state in states.items():
            changed += self._write("UPDATE sessions SET jobstate = ?, job_seen = ? WHERE jobid = ?"
                                   " AND state != 'ended'", (state, now, jobid))
        return changed

    def sessions_with_jobs(self) -> list:
        """Live sessions whose job id is known."""
        rows = self.db.execute("SELECT * FROM sessions WHERE state != 'ended' AND jobid IS NOT NULL").fetchall()
        return [Session(**dict(row)) for row in rows]

    def set_pending_reasons(self, reasons: dict) -> None:
        """Why the scheduler keeps each job pending (None: no reason given, or not pending)."""
        for jobid, reason in reasons.items():
            self._write("UPDATE sessions SET pending_reason = ? WHERE jobid = ? AND state != 'ended'", (reason, jobid))

    def prune(self, ended_before: float, dry_run: bool = False) -> int:
        where = "FROM sessions WHERE state = 'ended' AND ended < ?"
        if dry_run:
            return self.db.execute(f"SELECT count(*) {where}", (ended_before,)).fetchone()[0]
        return self._write(f"DELETE {where}", (ended_before,))

    def bump(self, name: str) -> None:
        self._write("INSERT INTO counters VALUES (?, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1", (name,))

    def counters(self) -> dict:
        return dict(self.db.execute("SELECT name, value FROM counters").fetchall())

    def set_meta(self, name: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def meta(self, name: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None


###############################################################################
# 5. Operations: events, metrics, limits, refresh
###############################################################################

LIFECYCLE_EVENTS = ("issue", "redeem", "state", "release", "revoke", "expire", "dead", "job_ended")


class Events:
    """What happened, for people and for usage reports: one JSON object a line in the audit
    log (never a secret), and a count per lifecycle event in the database, shared by the
    server, refresh and admin commands."""

    def __init__(self, store: Store, audit_path: str):
        self.store = store
        self.lock = threading.Lock()
        self.audit = None
        if audit_path == "-":
            self.audit = sys.stderr
        elif audit_path:
            try:
                # O_APPEND and one write per line: every worker appends whole lines, never into each other's
                self.audit = open(audit_path, "ab", buffering=0)
            except OSError as exc:
                raise ValueError(
                    f"audit-log: cannot open {audit_path}: {exc.strerror}. Its directory must exist and be writable "
                    f"by the user satellite runs as (install -d -m 0750 -o satellite -g satellite "
                    f"{os.path.dirname(os.path.abspath(audit_path))}; the systemd unit's LogsDirectory= makes "
                    f"/var/log/satellite), or set audit-log to another file") from None

    def record(self, event: str, alias: Optional[str] = None, source: Optional[str] = None, **fields) -> None:
        if event in LIFECYCLE_EVENTS:
            try:
                self.store.bump(f"events_{event}")
            except sqlite3.Error as exc:
                log.warning("could not count %s: %s", event, exc)
        if self.audit is None:
            return
        line = {"time": iso_time(time.time()), "event": event, "alias": alias, "source": source}
        if alias is not None:
            line.update(self.naming(alias))
        line.update((k, v) for k, v in fields.items() if v is not None)
        text = json.dumps(line) + "\n"
        with self.lock:
            if self.audit is sys.stderr:
                self.audit.write(text)
            else:
                self.audit.write(text.encode())

    def close(self) -> None:
        if self.audit is not None and self.audit is not sys.stderr:
            self.audit.close()

    def naming(self, alias: str) -> dict:
        """How an audit line names a session: by its alias, or a legacy session by `legacy_session`
        (logged_alias) and no alias, whoever records it (the API, the proxy, refresh, revoke)."""
        try:
            session = self.store.cached_session(alias)
        except sqlite3.Error:
            return {"alias": None, "legacy_session": "unknown (database unreadable)"}
        if session is not None and session.legacy:
            return {"alias": None, "legacy_session": logged_alias(session)}
        return {}


class SharedLock:
    """A lock that holds across the workers' processes and their threads: a thread lock, then a POSIX record
    lock (lockf) on one byte of a private, unlinked file opened before the fork. The kernel drops a record
    lock when its holder dies, so a worker killed in the middle of an update never wedges the others (a
    semaphore would stay taken).

    Record locks belong to a process, not a thread, and the kernel's deadlock check follows processes: if
    one thread of worker A held byte 0 while another waited for byte 1, held by worker B, B's wait for byte 0
    would be refused at once (EDEADLK) though nothing is stuck. So every SharedLock of a process takes the
    same thread lock (`process_lock`) first: at most one thread of a process is ever inside a record lock,
    and it waits for nothing while it holds one. They are never nested (each is held for a few table
    operations, one at a time)."""

    process_lock = threading.Lock()

    def __init__(self, fd: int, byte: int):
        self.fd, self.byte = fd, byte

    def __enter__(self) -> "SharedLock":
        self.process_lock.acquire()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.byte)
        except BaseException:
            self.process_lock.release()
            raise
        return self

    def __exit__(self, *_) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.byte)
        finally:
            self.process_lock.release()


def address_group(peer: str) -> str:
    """Whose share of a limit a caller takes: its IPv4 address, or its IPv6 /64 (one host's allocation: an
    attacker with a /64 has 2**64 addresses). Every limit kept per address is kept per group."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else peer


def key_digest(salt: bytes, key) -> int:
    """A limit's key (an address, (address, alias), ("user", name)) as a nonzero 64-bit number: keyed BLAKE2b
    with a secret made at start, so nobody can choose keys that collide or crowd one place of a table."""
    value = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8, key=salt).digest(), "little",
                           signed=True)
    return value or 1


class RateLimiter:
    """At most `count` events per key in any `window` seconds, for the whole service: the last `count` event
    times of each key, in memory shared by every worker (made before the fork), so a limit holds exactly as
    configured whichever worker a request lands on. Asking (`retry_after`) and counting (`record`) are
    separate, so a refusal is not itself counted.

    The table cannot grow: a key's place is one of WAYS in its set (key_digest picks the set); a new key
    takes a free place, or one whose events are all older than the window, or else the one whose last event
    is oldest. So pushing one key out (and its count with it) takes about as many new keys, each a counted
    event, as the table has places: 16,384 for counts up to 32 (the defaults), fewer for larger counts (each
    place keeps `count` event times within BUDGET; 8 at least, so above 65,534 a table outgrows BUDGET)."""

    WAYS = 8
    BUDGET = 4 << 20                     # bytes of shared memory at most per limiter

    def __init__(self, limit: tuple, lock: Optional[SharedLock] = None, salt: bytes = b""):
        self.count, self.window = limit
        self.lock = lock or SharedLock(private_lock_file(), 0)
        self.salt = salt or os.urandom(16)
        places = max(self.WAYS, min(16384, self.BUDGET // (16 + 8 * max(self.count, 1))))
        self.sets = places // self.WAYS
        places = self.sets * self.WAYS
        self.area = mmap.mmap(-1, places * 16 + places * 8 * max(self.count, 1))
        self.keys = memoryview(self.area)[:places * 16].cast("q")         # (digest, next event's index) a place
        self.times = memoryview(self.area)[places * 16:].cast("d")        # `count` event times a place; 0: none

    def retry_after(self, key, now: Optional[float] = None) -> int:
        """0 if one more event is allowed now, else the seconds until it would be. Records nothing."""
        if not self.count:
            return 0
        now = time.monotonic() if now is None else now
        with self.lock:
            return self._wait(self._find(key_digest(self.salt, key)), now)

    def take(self, key, now: Optional[float] = None) -> int:
        """Count one event of `key` if the limit allows it now (0), else count nothing and say how many
        seconds until it would (as retry_after). One lock hold: callers racing in any workers for the
        limit's last event cannot both have it."""
        if not self.count:
            return 0
        now = time.monotonic() if now is None else now
        digest = key_digest(self.salt, key)
        with self.lock:
            place = self._find(digest)
            wait = self._wait(place, now)
            if not wait:
                self._add(place if place is not None else self._place_for(digest, now), now)
            return wait

    def record(self, key, now: Optional[float] = None) -> None:
        """Count one event of `key`, allowed or not (the limit is asked separately: retry_after)."""
        if not self.count:
            return
        now = time.monotonic() if now is None else now
        digest = key_digest(self.salt, key)
        with self.lock:
            place = self._find(digest)
            self._add(place if place is not None else self._place_for(digest, now), now)

    def _wait(self, place: Optional[int], now: float) -> int:
        if place is None:
            return 0
        oldest = self.times[place * self.count + self.keys[place * 2 + 1]]
        if not oldest or oldest <= now - self.window:          # fewer than `count` events in the window
            return 0
        return max(1, int(oldest + self.window - now + 0.999))

    def _add(self, place: int, now: float) -> None:
        head = self.keys[place * 2 + 1]
        self.times[place * self.count + head] = now
        self.keys[place * 2 + 1] = (head + 1) % self.count

    def _find(self, digest: int) -> Optional[int]:
        first = (digest % self.sets) * self.WAYS
        for place in range(first, first + self.WAYS):
            if self.keys[place * 2] == digest:
                return place
        return None

    def _last_event(self, place: int) -> float:
        return self.times[place * self.count + (self.keys[place * 2 + 1] - 1) % self.count]

    def _place_for(self, digest: int, now: float) -> int:
        """A place in the key's set: free, or expired, or the one quiet longest (see the class docstring)."""
        first = (digest % self.sets) * self.WAYS
        place = min(range(first, first + self.WAYS),
                    key=lambda p: -math.inf if self.keys[p * 2] == 0 else self._last_event(p))
        self.keys[place * 2], self.keys[place * 2 + 1] = digest, 0
        for i in range(place * self.count, (place + 1) * self.count):
            self.times[i] = 0.0
        return place


def private_lock_file() -> int:
    """A descriptor of a file only this process (and its forked workers) holds: the lockf locks' anchor."""
    handle = tempfile.TemporaryFile()
    fd = os.dup(handle.fileno())
    handle.close()
    return fd


class ConnectionCounts:
    """The open connections of the whole service (every listener of every worker), counted in memory shared
    by the workers, so `max-connections` and `max-connections-per-address` admit exactly what is configured
    whichever worker accepts: the limit's connection is served, the next one refused, as with one process.

    Each worker counts in a column of its own (its total, and its count per address group), and a worker
    that dies has its column zeroed by the supervisor (`forget_worker`): what it held is free again at
    once. The groups are an open-addressing table (linear probing, backward-shift deletion) of (digest, a
    count per worker), with room for twice the groups that can be open at once. `loads` tells the accept
    loop which workers hold least (ThreadedServer.get_request)."""

    GROUPS_UNCAPPED = 16384              # groups counted when max-connections is 0 (no total cap)

    def __init__(self, max_connections: int, per_address: int, workers: int = 1,
                 lock: Optional[SharedLock] = None, salt: bytes = b""):
        self.max_connections, self.per_address, self.workers = max_connections, per_address, workers
        self.lock = lock or SharedLock(private_lock_file(), 0)
        self.salt = salt or os.urandom(16)
        groups = (max_connections or self.GROUPS_UNCAPPED) if per_address else 0
        self.capacity = 1 << max(3, (2 * groups - 1).bit_length()) if groups else 0
        head = 8 * (2 * workers + 1)
        size = head + 8 * self.capacity + 4 * self.capacity * workers
        self.area = mmap.mmap(-1, size)
        view = memoryview(self.area)
        self.totals = view[:8 * workers].cast("q")                    # open connections, per worker
        self.alive = view[8 * workers:16 * workers].cast("q")         # 1 while the worker serves
        self.used = view[16 * workers:head].cast("q")                 # groups in the table
        self.digests = view[head:head + 8 * self.capacity].cast("q")
        self.counts = view[head + 8 * self.capacity:size].cast("i")   # capacity x workers

    # the accept path ----------------------------------------------------------------------------------
    def admit(self, group: str, worker: int) -> Optional[str]:
        """Count one more connection of `group` in `worker`, or say why not. Every connection is counted
        against its group's cap at accept, before anything is known of it; a trusted front's connection
        leaves the group once it has shown the front secret (`uncap`)."""
        with self.lock:
            total = sum(self.totals)
            if self.max_connections and total >= self.max_connections:
                return f"connection limit {self.max_connections} reached"
            if self.capacity:
                digest = key_digest(self.salt, group)
                slot = self._find(digest)
                held = 0 if slot is None else sum(self.counts[slot * self.workers:(slot + 1) * self.workers])
                if held >= self.per_address:
                    return f"{self.per_address} connections from {group} already"
                if slot is None:
                    slot = self._insert(digest)
                    if slot is None:
                        return f"more than {self.capacity // 2} addresses have connections open"
                self.counts[slot * self.workers + worker] += 1
            self.totals[worker] += 1
        return None

    def uncap(self, group: str, worker: int) -> None:
        """One connection of `group` in `worker` speaks for many (a trusted front that showed the front
        secret): it no longer counts against the group's cap, only against max-connections."""
        with self.lock:
            self._leave_group(group, worker)

    def release(self, group: Optional[str], worker: int) -> None:
        """A connection closed; `group` None if it had left its group (uncap)."""
        with self.lock:
            self.totals[worker] -= 1
            if group is not None:
                self._leave_group(group, worker)

    def _leave_group(self, group: str, worker: int) -> None:
        if self.capacity:
            slot = self._find(key_digest(self.salt, group))
            if slot is not None:
                self.counts[slot * self.workers + worker] -= 1
                if not any(self.counts[slot * self.workers:(slot + 1) * self.workers]):
                    self._delete(slot)

    def loads(self) -> list:
        """(open connections, worker) of each serving worker (unlocked: a hint, aligned words)."""
        return [(self.totals[w], w) for w in range(self.workers) if self.alive[w]]

    # a worker's life --------------------------------------------------------------------------------
    def worker_started(self, worker: int) -> None:
        self.alive[worker] = 1

    def forget_worker(self, worker: int) -> None:
        """A worker died: nothing it held is open any more. Its column is zeroed and the table rebuilt."""
        with self.lock:
            self.alive[worker] = 0
            self.totals[worker] = 0
            live = []
            for slot in range(self.capacity):
                if self.digests[slot]:
                    row = list(self.counts[slot * self.workers:(slot + 1) * self.workers])
                    row[worker] = 0
                    if any(row):
                        live.append((self.digests[slot], row))
                    self.digests[slot] = 0
                    for w in range(self.workers):
                        self.counts[slot * self.workers + w] = 0
            self.used[0] = 0
            for digest, row in live:
                slot = self._insert(digest)
                for w, count in enumerate(row):
                    self.counts[slot * self.workers + w] = count

    # the table ---------------------------------------------------------------------------------------
    def _home(self, digest: int) -> int:
        return digest & (self.capacity - 1)

    def _find(self, digest: int) -> Optional[int]:
        slot = self._home(digest)
        for _ in range(self.capacity):
            found = self.digests[slot]
            if found == digest:
                return slot
            if found == 0:
                return None
            slot = (slot + 1) & (self.capacity - 1)
        return None

    def _insert(self, digest: int) -> Optional[int]:
        """A free slot for `digest` (its counts zero), or None when the table is at its bound (half full)."""
        if self.used[0] >= self.capacity // 2:
            return None
        slot = self._home(digest)
        while self.digests[slot]:
            slot = (slot + 1) & (self.capacity - 1)
        self.digests[slot] = digest
        self.used[0] += 1
        return slot

    def _delete(self, slot: int) -> None:
        """Empty `slot`, moving later entries of its probe run back so every lookup still finds them."""
        mask = self.capacity - 1
        self.digests[slot] = 0
        self.used[0] -= 1
        hole, probe = slot, (slot + 1) & mask
        while self.digests[probe]:
            home = self._home(self.digests[probe])
            if (probe - home) & mask >= (probe - hole) & mask:      # its home is at or before the hole
                self.digests[hole] = self.digests[probe]
                for w in range(self.workers):
                    self.counts[hole * self.workers + w] = self.counts[probe * self.workers + w]
                    self.counts[probe * self.workers + w] = 0
                self.digests[probe] = 0
                hole = probe
            probe = (probe + 1) & mask


class ConnectionSlot:
    """One admitted connection's place in ConnectionCounts: in its address group's cap until it shows that it
    speaks for many (`uncap`), in max-connections until `release` (once, when it closes)."""

    def __init__(self, counts: ConnectionCounts, group: str, worker: int):
        self.counts, self.group, self.worker = counts, group, worker
        self.capped = True

    def uncap(self) -> None:
        if self.capped:
            self.capped = False
            self.counts.uncap(self.group, self.worker)

    def release(self) -> None:
        self.counts.release(self.group if self.capped else None, self.worker)


class Limits:
    """Every count the service keeps against its configured limits, made once before any worker is forked so
    that all of them count in the same memory (RateLimiter, ConnectionCounts): open connections, wrong tokens,
    unknown keys and tokens, links asked for, MUNGE checks. Each has its lock (a byte of one private file)."""

    def __init__(self, settings: Settings, workers: int = 1):
        fd, salt = private_lock_file(), os.urandom(16)
        self.connections = ConnectionCounts(settings.max_connections, settings.max_connections_per_address,
                                            workers, SharedLock(fd, 0), salt)
        self.token_failures = RateLimiter(settings.token_failures, SharedLock(fd, 1), salt)     # (address, alias)
        self.lookup_failures = RateLimiter(settings.token_failures, SharedLock(fd, 2), salt)    # /api/status
        self.getlink = RateLimiter(settings.getlink_rate, SharedLock(fd, 3), salt)              # user or address
        # unmunge runs a process: an address gets a few times its getlink rate of checks, before the user is known
        self.munge_checks = RateLimiter((settings.getlink_rate[0] * 5, settings.getlink_rate[1]),
                                        SharedLock(fd, 4), salt)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
DENY_LABELS = ("api_403", "api_404", "api_429", "cross_origin", "no_token", "not_owner", "rate_limited",
               "wrong_token", "other")
# One worker's counters, in this order, as 64-bit integers (latency_sum in microseconds).
METRIC_FIELDS = (tuple(f"requests_{c}" for c in STATUS_CLASSES) + tuple(f"denied_{d}" for d in DENY_LABELS)
                 + ("bytes_in", "bytes_out", "websockets_open", "tunnels_open", "upstream_errors", "latency_sum_us")
                 + tuple(f"latency_{i}" for i in range(len(LATENCY_BUCKETS) + 1)))
FIELD = {name: i for i, name in enumerate(METRIC_FIELDS)}
GAUGES = ("websockets_open", "tunnels_open")      # what a worker has open: zero again when a worker restarts


class MetricSlots:
    """Every worker's counters in one memory area shared across fork (an anonymous shared mmap the
    supervisor makes before forking): one fixed slot per worker index, written only by that worker
    (under its Metrics lock), summed by whichever worker answers /metrics. A restarted worker takes its
    index's slot as it was, so counters never go backwards; only its gauges start at zero again.
    One word more counts the workers' database writes (Store's `workers_writes`)."""

    def __init__(self, workers: int = 1):
        self.workers = workers
        size = len(METRIC_FIELDS) * workers + 1
        self.area = mmap.mmap(-1, 8 * size)          # MAP_SHARED: the children see one copy
        self.values = memoryview(self.area).cast("q")
        self.store_writes = self.values[size - 1:]      # the last word: the workers' Store writes (Store)

    def slot(self, index: int) -> memoryview:
        """Worker `index`'s counters, its gauges zeroed (a worker starting has nothing open)."""
        size = len(METRIC_FIELDS)
        slot = self.values[index * size:(index + 1) * size]
        for name in GAUGES:
            slot[FIELD[name]] = 0
        return slot

    def totals(self) -> dict:
        """Each counter summed over the workers (a torn read is impossible: aligned 8-byte words)."""
        size = len(METRIC_FIELDS)
        return {name: sum(self.values[w * size + i] for w in range(self.workers))
                for i, name in enumerate(METRIC_FIELDS)}


def label_value(text: str) -> str:
    """A Prometheus label value as the text exposition format requires: backslash, double quote and line feed
    escaped (an SSO user name is whatever the front says: unescaped, a quote forged labels and an unbalanced
    one made the whole page unreadable, so Prometheus stopped scraping)."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters of this worker (its slot of MetricSlots), rendered summed over all workers, with the
    database's counts, as Prometheus text."""

    def __init__(self, slots: Optional[MetricSlots] = None, index: int = 0):
        self.lock = threading.Lock()
        self.slots = slots or MetricSlots(1)
        self.slot = self.slots.slot(index)

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.slot[FIELD[name]] += amount

    def request_done(self, status: int, seconds: float, received: int, sent: int) -> None:
        bucket = next((i for i, edge in enumerate(LATENCY_BUCKETS) if seconds <= edge), len(LATENCY_BUCKETS))
        status_class = f"{min(max(status // 100, 1), 5)}xx"
        with self.lock:
            slot = self.slot
            slot[FIELD[f"requests_{status_class}"]] += 1
            slot[FIELD["bytes_in"]] += received
            slot[FIELD["bytes_out"]] += sent
            slot[FIELD[f"latency_{bucket}"]] += 1
            slot[FIELD["latency_sum_us"]] += int(seconds * 1e6)

    def deny(self, reason: str) -> None:
        self.add(f"denied_{reason if reason in DENY_LABELS else 'other'}")

    def upstream_error(self) -> None:
        self.add("upstream_errors")

    def websocket_opened(self, change: int) -> None:
        self.add("websockets_open", change)

    def tunnels_open(self, count: int) -> None:
        with self.lock:
            self.slot[FIELD["tunnels_open"]] = count

    def render(self, store: Store, cert_expiry: Optional[float]) -> str:
        out = []

        def metric(name, kind, help_text, samples):
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value}" for labels, value in samples)
        metric("satellite_sessions", "gauge", "Sessions by state.",
               [(f'{{state="{label_value(k)}"}}', v) for k, v in store.count_by_state().items()])
        metric("satellite_live_sessions_by_user", "gauge", "Live sessions by the user they were issued for "
               "('' = none named).", [(f'{{user="{label_value(k)}"}}', v) for k, v in store.live_by_user().items()])
        counters = store.counters()
        metric("satellite_link_events_total", "counter", "Session lifecycle events (all processes).",
               [(f'{{event="{e}"}}', counters.get(f"events_{e}", 0)) for e in LIFECYCLE_EVENTS])
        metric("satellite_refresh_runs_total", "counter", "Refresh runs by outcome.",
               [(f'{{outcome="{o}"}}', counters.get(f"refresh_{o}", 0)) for o in ("ok", "failed")])
        last = json.loads(store.meta("last_refresh") or "{}")
        metric("satellite_refresh_last_timestamp_seconds", "gauge", "When refresh last finished.",
               [("", last.get("time", 0))])
        total = self.slots.totals()
        metric("satellite_workers", "gauge", "Serving processes (the counters below are their sums).",
               [("", self.slots.workers)])
        metric("satellite_requests_total", "counter", "Requests answered, by status class.",
               [(f'{{code="{c}"}}', total[f"requests_{c}"]) for c in STATUS_CLASSES if total[f"requests_{c}"]])
        metric("satellite_denied_total", "counter", "Requests refused by access control, by reason.",
               [(f'{{reason="{d}"}}', total[f"denied_{d}"]) for d in DENY_LABELS if total[f"denied_{d}"]])
        metric("satellite_received_bytes_total", "counter", "Request body bytes from clients.",
               [("", total["bytes_in"])])
        metric("satellite_sent_bytes_total", "counter", "Response body bytes to clients.", [("", total["bytes_out"])])
        metric("satellite_websockets_open", "gauge", "WebSockets being relayed.", [("", total["websockets_open"])])
        metric("satellite_tunnels_open", "gauge", "Tunnels jobs have open to this satellite.",
               [("", total["tunnels_open"])])
        metric("satellite_upstream_errors_total", "counter", "Failures talking to apps.",
               [("", total["upstream_errors"])])
        cumulative, samples = 0, []
        for i, edge in enumerate(LATENCY_BUCKETS + ("+Inf",)):
            cumulative += total[f"latency_{i}"]
            samples.append((f'_bucket{{le="{edge}"}}', cumulative))
        samples += [("_sum", round(total["latency_sum_us"] / 1e6, 6)), ("_count", cumulative)]
        metric("satellite_request_duration_seconds", "histogram", "Time to answer a request (head to end).",
               samples)
        if cert_expiry:
            metric("satellite_certificate_expiry_timestamp_seconds", "gauge", "When the served certificate expires.",
                   [("", int(cert_expiry))])
        return "\n".join(out) + "\n"


def certificate_expiry(cert_path: str) -> Optional[float]:
    """notAfter of the certificate file, as epoch seconds (CPython's decoder; None if unavailable)."""
    try:
        decoded = ssl._ssl._test_decode_cert(cert_path)        # stdlib, private but stable since 3.x
        return ssl.cert_time_to_seconds(decoded["notAfter"])
    except (AttributeError, KeyError, ValueError, OSError, ssl.SSLError):
        return None


def probe(target: tuple, timeout: float = 3.0) -> bool:
    """Does the app still accept connections?"""
    try:
        socket.create_connection(target, timeout=timeout).close()
        return True
    except OSError:
        return False


def read_jobstates(text: str) -> dict:
    """'JOBID STATE' lines (squeue -h -o '%i %T', or SDSC's update-jobs shape) -> {jobid: state}.
    A third column (the pending reason) is read by read_pending_reasons."""
    states = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and JOBID_SHAPE.match(parts[0]) and re.fullmatch(r"[A-Za-z_]{1,32}", parts[1]):
            states[parts[0]] = parts[1].upper()
    return states


PENDING_REASON_SHAPE = re.compile(r"^[A-Za-z0-9_,:.()\[\]+\-]{1,64}\Z")
PENDING_STATES = frozenset(("PENDING", "PD", "QUEUED", "QW", "Q"))


def read_pending_reasons(text: str) -> dict:
    """The optional third column of the feed's lines, 'JOBID STATE REASON' (squeue -h -o '%i %T %r'):
    {jobid: reason, or None when the line names none, the job is not pending, or the reason is not
    one bounded word}. Only the reason's first word is kept: squeue adds details to some
    ("ReqNodeNotAvail, UnavailableNodes:n[1-2]"). A two-column line clears its job's reason."""
    reasons = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and JOBID_SHAPE.match(parts[0]) and re.fullmatch(r"[A-Za-z_]{1,32}", parts[1]):
            reason = parts[2].rstrip(",") if len(parts) >= 3 and parts[1].upper() in PENDING_STATES else None
            ok = reason is not None and PENDING_REASON_SHAPE.match(reason) and reason not in ("None", "(null)")
            reasons[parts[0]] = reason if ok else None
    return reasons


def jobs_over(sessions: Iterable, states: dict, snapshot: bool, gone_after: int, now: float) -> list:
    """(alias, end_reason, jobstate) for each live session whose job the scheduler says is over:
    its state is a terminal one (JOB_ENDED), or — only when the feed is a full snapshot — the
    snapshot does not list a job a feed listed before, and has not for `gone_after` (finished jobs
    age out of squeue). A job never listed is not ended (its submit may be newer than the snapshot);
    a partial feed (update-jobs.cgi, /api/jobstates without snapshot=1) ends only terminal states;
    'UNKNOWN' or a failed command ends nothing."""
    over = []
    for session in sessions:
        state = states.get(session.jobid)
        if state in JOB_ENDED:
            over.append((session.alias, JOB_ENDED[state], state))
        elif state is None and snapshot and session.job_seen is not None and now - session.job_seen >= gone_after:
            over.append((session.alias, JOB_NOT_LISTED, None))
    return over


def take_jobstates(store: Store, events: Events, feed: str, snapshot: bool, gone_after: int,
                   dry_run: bool = False) -> tuple:
    """Record a feed's job states and pending reasons, and end the sessions whose job is over;
    (sessions named, sessions ended). `snapshot`: the feed lists every job the scheduler knows
    (jobstate-command, /api/jobstates snapshot=1)."""
    now = time.time()
    states, live = read_jobstates(feed), store.sessions_with_jobs()
    over = jobs_over(live, states, snapshot, gone_after, now)
    if dry_run:
        return len(states), len(over)
    # a feed lists every job of the cluster: write only what names a live session (one statement each)
    ours = {session.jobid for session in live}
    named = store.set_jobstates({job: state for job, state in states.items() if job in ours}, now)
    store.set_pending_reasons({job: why for job, why in read_pending_reasons(feed).items() if job in ours})
    ended = 0
    for alias, reason, state in over:
        if store.end(alias, reason):
            ended += 1
            events.record("job_ended", alias, reason=reason, jobstate=state)
    return named, ended


def run_jobstate_command(command: str) -> subprocess.CompletedProcess:
    """The site's job-state command, with pipefail where bash is (a pipeline fails when any command in it does)."""
    shell = shutil.which("bash")
    argv = [shell, "-o", "pipefail", "-c", command] if shell else ["/bin/sh", "-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def refresh(store: Store, settings: Settings, events: Events, dry_run: bool = False) -> dict:
    """The cron job: expire what is past its time, end sessions whose app is gone, prune
    old ended sessions, take scheduler states. Safe beside `serve` and beside itself:
    each change is one conditional statement, and only the caller that ends a session records it."""
    now = time.time()
    summary = dict.fromkeys(("expired_links", "expired_sessions", "probed", "down", "dead", "pruned",
                             "jobstates", "jobs_ended"), 0)
    if settings.jobstate_command:
        result = run_jobstate_command(settings.jobstate_command)
        if result.returncode != 0 or result.stderr.strip():
            log.warning("jobstate command %s (%d): %s", "failed" if result.returncode else "complained",
                        result.returncode, result.stderr.strip()[:200])
        # its output is a full snapshot only if every command of it succeeded and none complained:
        # an unreachable controller (`qstat ... | awk ...` with qstat failing) ends nothing
        snapshot = result.returncode == 0 and not result.stderr.strip()
        summary["jobstates"], summary["jobs_ended"] = take_jobstates(
            store, events, result.stdout, snapshot, settings.job_gone_after, dry_run)
    live = store.sessions(("queued", "running", "mapped", "proxied"))
    for session in live:
        if now >= session.expires:
            kind = "expired_links" if session.target is None else "expired_sessions"
            summary[kind] += 1
            reason = "link never redeemed" if session.target is None else "session lifetime over"
            if not dry_run and store.end(session.alias, "expired"):
                events.record("expire", session.alias, reason=reason)
    mapped = [s for s in live if s.target and now < s.expires]
    direct = [s for s in mapped if not s.tunneled]
    workers = max(1, min(32, len(direct)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        answered = dict(zip((s.alias for s in direct), pool.map(probe, [s.target for s in direct])))
    summary["probed"] = len(direct)
    for session in mapped:
        # a direct app is probed; a tunnel's absence is recorded by serve when it drops (backend_gone)
        up = not session.backend_gone if session.tunneled else answered[session.alias]
        if up:
            if session.backend_gone and not dry_run:
                store.set_backend_gone(session.alias, None)
            continue
        summary["down"] += 1
        gone_since = session.backend_gone or now
        if not session.backend_gone and not dry_run:
            store.set_backend_gone(session.alias, now)
        if now - gone_since >= settings.dead_after:
            summary["dead"] += 1
            reason = "tunnel gone" if session.tunneled else "app gone"
            if not dry_run and store.end(session.alias, reason):
                events.record("dead", session.alias, gone_since=iso_time(gone_since))
    summary["pruned"] = store.prune(now - settings.retention, dry_run)
    if not dry_run:
        store.set_meta("last_refresh", json.dumps(dict(summary, time=int(time.time()))))
        store.bump("refresh_ok")
    return summary


###############################################################################
# 6. HTTP messages: strict parsing, bodies within limits, answers
#    Parsing is pure: it takes lines from a function (a socket's, or a test's bytes)
#    and returns a Request or raises HttpError. Nothing here decides who may do what.
###############################################################################

class HttpError(Exception):
    """A request (or upstream response) that must be refused; the connection is closed."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Stream:
    """A socket with a read buffer: line reads for message heads, bulk reads for bodies.
    Reads given a `deadline` (time.monotonic()) raise HttpError 408 once it has passed,
    however slowly the bytes trickle in."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def fill(self, deadline: Optional[float] = None) -> int:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HttpError(408, "request took too long")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(RECV_SIZE)
            except socket.timeout:
                raise HttpError(408, "request took too long") from None
        else:
            data = self.sock.recv(RECV_SIZE)
        self.buf += data
        return len(data)

    def readline(self, limit: int, deadline: Optional[float] = None, too_long: int = 431) -> bytes:
        """One line including its LF; what is left at EOF (b'' if nothing). A line longer than
        `limit` raises HttpError `too_long` (431, or 414 for a request line) before more is read."""
        start = 0
        while True:
            end = self.buf.find(b"\n", start)
            if end >= 0:
                if end + 1 > limit:
                    raise HttpError(too_long, "line too long")
                line = bytes(self.buf[:end + 1])
                del self.buf[:end + 1]
                return line
            if len(self.buf) > limit:
                raise HttpError(too_long, "line too long")
            start = len(self.buf)
            if not self.fill(deadline):
                line = bytes(self.buf)
                self.buf.clear()
                return line

    def read_exact(self, n: int, deadline: Optional[float] = None) -> bytes:
        """n bytes (the caller has bounded n)."""
        while len(self.buf) < n:
            if not self.fill(deadline):
                raise ConnectionError("peer closed mid-message")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_into(self, view: memoryview) -> int:
        """Up to len(view) bytes: buffered ones first, else one recv. 0 means EOF. From TLS (an isolating
        agent upstream), one recv gives one record (16 KiB at most): the records that have already arrived
        are taken too, so a bulk body is relayed in large writes, not a Python round per record."""
        if self.buf:
            n = min(len(view), len(self.buf))
            view[:n] = self.buf[:n]
            del self.buf[:n]
            return n
        n = self.sock.recv_into(view)
        if n >= TLS_RECORD and isinstance(self.sock, ssl.SSLSocket):      # a full record: more may follow
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            while n < len(view) and (self.sock.pending() or poller.poll(0)):
                more = self.sock.recv_into(view[n:])
                if not more:
                    break
                n += more
        return n

    def take_buffered(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data


class BytesLines:
    """Lines from bytes in memory, as Stream.readline gives them from a socket: for parsing a
    head without a socket (tests, fuzzing)."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def readline(self, limit: int, too_long: int = 431) -> bytes:
        end = self.data.find(b"\n", self.at)
        end = len(self.data) if end < 0 else end + 1
        if end - self.at > limit:
            raise HttpError(too_long, "line too long")
        line, self.at = self.data[self.at:end], end
        return line


class Headers:
    """Header fields in order, names as sent; lookups are case-insensitive."""

    def __init__(self, fields: list):
        self.fields = fields                       # [(name, value)]

    def get_all(self, name: str) -> list:
        name = name.lower()
        return [v for n, v in self.fields if n.lower() == name]

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self.get_all(name)
        return values[0] if values else default

    def tokens(self, name: str) -> set:
        """Comma-separated tokens of every line of a header, lower-cased (Connection, Upgrade)."""
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}


@dataclasses.dataclass
class Request:
    method: str
    target: str            # as sent, origin-form (/path?query)
    version: str           # HTTP/1.0 or HTTP/1.1
    headers: Headers
    host: str              # lower-case, without port
    host_header: str       # as sent (with port), forwarded unchanged
    framing: str           # how the body is delimited: 'none', 'length' or 'chunked'
    length: int = 0        # with framing 'length'

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.tokens("connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    @property
    def wants_websocket(self) -> bool:
        return (self.method == "GET" and "websocket" in self.headers.tokens("upgrade")
                and "upgrade" in self.headers.tokens("connection"))

    @property
    def expects_continue(self) -> bool:
        return (self.headers.get("expect") or "").lower() == "100-continue" and self.framing != "none"


LineSource = Callable[[int, int], bytes]         # (limit, status if longer) -> one line with its LF, b'' at end


def parse_request(next_line: LineSource) -> Optional[Request]:
    """The next request head, strictly (RFC 9112), or None if the peer sent nothing.
    A malformed request line is refused before any header line is read."""
    line = next_line(MAX_REQUEST_LINE, 414)
    if line == b"\r\n":                              # RFC 9112 §2.2: ignore one leading empty line
        line = next_line(MAX_REQUEST_LINE, 414)
    if not line:
        return None
    method, target, version = parse_request_line(line)
    headers = parse_header_lines(next_line, MAX_HEADER_BYTES)
    if method not in KNOWN_METHODS:
        raise HttpError(501, f"method {method} is not supported")
    return frame_request(method, target, version, headers)


def request_from_bytes(data: bytes) -> Optional[Request]:
    """parse_request over bytes in memory: the parser without a socket."""
    return parse_request(BytesLines(data).readline)


def parse_request_line(line: bytes) -> tuple:
    if line.startswith(b"PRI * HTTP/2.0"):
        raise HttpError(505, "HTTP/2 is not offered here; use HTTP/1.1")
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        raise HttpError(400, "request line not ended by CRLF")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "non-ASCII bytes in request line") from None
    parts = text.split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line (HTTP/0.9 is not supported)")
    method, target, version = parts
    if not re.fullmatch(r"HTTP/[0-9]\.[0-9]", version):
        raise HttpError(400, "malformed HTTP version")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, f"{version} is not supported; use HTTP/1.1")
    if not TOKEN_CHARS.match(method):
        raise HttpError(400, "malformed method")
    if not TARGET_SAFE.match(target):
        raise HttpError(400, "malformed request target")
    return method, target, version


def parse_header_lines(next_line: LineSource, max_bytes: int) -> Headers:
    """Header lines up to the empty line, strictly (RFC 9112 §5): no obs-fold, no space
    before the colon, names are tokens, no CR/LF/NUL in values, CRLF line ends."""
    fields, total = [], 0
    while True:
        line = next_line(max_bytes - total + 2, 431)
        total += len(line)
        if total > max_bytes:
            raise HttpError(431, "request headers too large")
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise HttpError(400, "header line not ended by CRLF (bare CR or LF)" if line else "incomplete head")
        if line == b"\r\n":
            return Headers(fields)
        if len(fields) >= MAX_HEADER_COUNT:
            raise HttpError(431, "too many header fields")
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "obsolete line folding in headers")
        name, colon, value = line[:-2].decode("latin-1").partition(":")
        if not colon or not TOKEN_CHARS.match(name):
            raise HttpError(400, "malformed header field name")
        value = value.strip(" \t")
        if FIELD_VALUE_BAD.search(value):
            raise HttpError(400, "control character in header value")
        fields.append((name, value))


def frame_request(method: str, target: str, version: str, headers: Headers) -> Request:
    """Host and body framing, refusing every ambiguous shape (RFC 9112 §3.2, §6.1, §6.3)."""
    for name, _ in headers.fields:
        if "_" in name and name.lower().replace("_", "-") in FRAMING_LOOKALIKES:
            raise HttpError(400, f"ambiguous header name {name}")
    hosts = headers.get_all("host")
    if len(hosts) != 1:
        raise HttpError(400, "exactly one Host header is required" if hosts or version == "HTTP/1.1"
                        else "a Host header is required")
    host_header = hosts[0]
    if not HOST_VALUE.match(host_header.lower()):
        raise HttpError(400, "malformed Host header")
    if target.startswith("/"):
        pass
    elif re.match(r"(?i)^https?://", target):              # absolute-form: only for this same host
        parsed = urllib.parse.urlsplit(target)
        if parsed.netloc.lower() != host_header.lower():
            raise HttpError(400, "absolute request target names another host")
        target = urllib.parse.urlunsplit(("", "", parsed.path or "/", parsed.query, ""))
    else:
        raise HttpError(400, "request target must be a path")
    transfer = headers.get_all("transfer-encoding")
    lengths = headers.get_all("content-length")
    if transfer:
        if lengths:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for v in transfer for c in v.split(",")]
        if codings.count("chunked") != 1 or codings[-1] != "chunked":
            raise HttpError(400, "Transfer-Encoding must end in chunked, once")
        if codings != ["chunked"]:
            raise HttpError(501, "only Transfer-Encoding: chunked is accepted")
        framing, length = "chunked", 0
    elif lengths:
        if len(lengths) > 1 or not CONTENT_LENGTH.match(lengths[0]):
            raise HttpError(400, "invalid or repeated Content-Length")
        length = int(lengths[0])
        framing = "length" if length else "none"
    else:
        framing, length = "none", 0
    host = host_header.lower()
    host = host[:host.rindex("]") + 1] if host.startswith("[") else host.split(":", 1)[0]
    return Request(method, target, version, headers, host.rstrip("."), host_header, framing, length)


@dataclasses.dataclass
class Response:
    status: int
    reason: str
    headers: Headers
    framing: str           # 'none', 'length', 'chunked' or 'close' (until the app closes)
    length: int = 0


def parse_response(next_line: LineSource, request_method: str) -> Response:
    """The app's response head, strictly; an ambiguous one is answered 502 by the caller."""
    line = next_line(MAX_REQUEST_LINE, 502)
    if not line:
        raise ConnectionError("app closed the connection before answering")
    match = re.fullmatch(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: ([\t -~\x80-\xff]*))?\r\n", line)
    if not match:
        raise HttpError(502, "malformed status line from the app")
    status = int(match.group(1))
    reason = (match.group(2) or b"").decode("latin-1")
    try:
        headers = parse_header_lines(next_line, MAX_UPSTREAM_HEADER_BYTES)
    except HttpError as exc:
        raise HttpError(502, f"bad response head from the app: {exc.reason}") from None
    transfer = headers.get_all("transfer-encoding")
    lengths = headers.get_all("content-length")
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return Response(status, reason, headers, "none")
    if transfer:
        if lengths:
            raise HttpError(502, "app sent both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for v in transfer for c in v.split(",")]
        return Response(status, reason, headers, "chunked" if codings[-1:] == ["chunked"] else "close")
    if lengths:
        if len(set(lengths)) > 1 or not CONTENT_LENGTH.match(lengths[0]):
            raise HttpError(502, "app sent an invalid Content-Length")
        return Response(status, reason, headers, "length", int(lengths[0]))
    return Response(status, reason, headers, "close")


def read_request(stream: Stream, deadline: float) -> Optional[Request]:
    """The next request head from a client, whole before `deadline`, or None if it closed quietly."""
    return parse_request(lambda limit, too_long: stream.readline(limit, deadline, too_long))


def read_response(stream: Stream, request_method: str) -> Response:
    return parse_response(lambda limit, too_long: stream.readline(limit, None, too_long), request_method)


def parse_chunk_size(line: bytes) -> int:
    match = CHUNK_SIZE_LINE.match(line)
    if not match:
        raise HttpError(400, "malformed chunk size")
    return int(match.group(1), 16)


def skip_trailers(stream: Stream, deadline: Optional[float] = None) -> None:
    for _ in range(MAX_HEADER_COUNT + 1):
        line = stream.readline(8192, deadline)
        if line == b"\r\n":
            return
        if not line.endswith(b"\r\n"):
            raise HttpError(400, "malformed chunked trailer")
    raise HttpError(431, "too many trailer fields")


def read_small_body(stream: Stream, request: Request, limit: int, deadline: float) -> bytes:
    """A whole request body of at most `limit` bytes (API forms), by `deadline`. Each chunk's
    size is checked against what is left of the limit before a byte of it is read: 413 at once."""
    if request.framing == "length":
        if request.length > limit:
            raise HttpError(413, "request body too large")
        return stream.read_exact(request.length, deadline)
    if request.framing != "chunked":
        return b""
    parts, left = [], limit
    while True:
        size = parse_chunk_size(stream.readline(1024, deadline))
        if size == 0:
            skip_trailers(stream, deadline)
            return b"".join(parts)
        if size > left:
            raise HttpError(413, "request body too large")
        data = stream.read_exact(size + 2, deadline)
        if data[-2:] != b"\r\n":
            raise HttpError(400, "chunk not followed by CRLF")
        parts.append(data[:-2])
        left -= size


@dataclasses.dataclass
class Answer:
    """What a handler returns, errors included; the connection's one writer sends it (section 12).

    `body` is the whole body, or `stream` sends it after the head (relayed bodies, WebSockets,
    tunnels): stream(socket) -> (bytes sent, whether the connection can carry another request).
    Unless `framed`, the writer adds Content-Length; `close` ends the connection after it."""
    status: int
    fields: list = dataclasses.field(default_factory=list)
    body: bytes = b""
    stream: Optional[Callable] = None
    reason: str = ""
    close: bool = False
    framed: bool = False


def response_head(status: int, fields: Iterable, reason: str = "") -> bytes:
    """Status line and header fields, ready to send in one write."""
    lines = [f"HTTP/1.1 {status} {reason or HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def plain_answer(status: int, body: bytes, fields: Iterable = ()) -> bytes:
    """A whole short text/plain answer that closes the connection (before TLS, or on the redirect port)."""
    return response_head(status, [*fields, ("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                                  ("Connection", "close")]) + body


@dataclasses.dataclass
class Exchange:
    """One request on its way through satellite: who sent it, what was decided about the sender,
    and what went each way. The only per-request state; the connection loop makes a new one each time."""
    peer: str                              # the client: the connection's address, or the one a trusted front names
    started: float
    via: str = ""                          # the connection's own address (a front's, if it came through one)
    front: bool = False                    # it came through a trusted front
    request: Optional[Request] = None
    user: Optional[str] = None             # the SSO user a trusted front named
    status: int = 0
    received: int = 0                      # request body bytes taken from the client
    sent: int = 0                          # response body bytes given to the client
    body_read: bool = False                # the request's body is consumed: the connection may go on
    logged_host: Optional[str] = None      # the access log's Host, if not as sent (a legacy session's alias)


###############################################################################
# 7. Routing and access: where a request goes, who is asking, what they may spend
#    Pure decisions of (request, peer, settings, session): no socket, no database
#    write. The server acts on what they return.
###############################################################################

@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A path on the management host: who may call it (Settings network fields; none = anyone),
    and the largest form body it takes. Both are checked on the head, before any body is read."""
    what: str
    networks: tuple = ()
    max_body: int = 0
    legacy: bool = False


FORM_BODY = 8 * 1024                     # an API form: a key, a port, a state
FEED_BODY = 4 * 1024 * 1024              # scheduler states for a whole cluster, from the admin network only
ISSUERS, REDEEMERS, FEEDERS = ("issue_from",), ("redeem_from",), ("jobstates_from",)

ENDPOINTS = {
    "/healthz": Endpoint("health"),
    "/metrics": Endpoint("metrics", ("metrics_from",)),
    "/api/getlink": Endpoint("getlink", ISSUERS, FORM_BODY),
    "/api/redeem": Endpoint("redeem", REDEEMERS, FORM_BODY),
    "/api/tunnel": Endpoint("a tunnel", REDEEMERS),
    "/api/state": Endpoint("state", ISSUERS + REDEEMERS, FORM_BODY),
    "/api/release": Endpoint("release", ISSUERS + REDEEMERS, FORM_BODY),
    "/api/status": Endpoint("status", (), FORM_BODY),
    "/api/jobstates": Endpoint("jobstates", FEEDERS, FEED_BODY),
    # SDSC Satellite's CGIs (legacy-api = yes)
    "/getlink.cgi": Endpoint("getlink", ISSUERS, FORM_BODY, legacy=True),
    "/redeemtoken.cgi": Endpoint("redeem", REDEEMERS, FORM_BODY, legacy=True),
    "/destroytoken.cgi": Endpoint("destroy", ISSUERS + REDEEMERS, FORM_BODY, legacy=True),
    "/linktoken.cgi": Endpoint("link", ISSUERS + REDEEMERS, FORM_BODY, legacy=True),
    "/tokenjobstate.cgi": Endpoint("jobstate", ISSUERS + REDEEMERS, FORM_BODY, legacy=True),
    "/update-jobs.cgi": Endpoint("update-jobs", FEEDERS, FEED_BODY, legacy=True),
}
API_METHODS = ("GET", "POST", "HEAD")


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a request goes: 'endpoint' (path on the management host), 'unknown' (no such
    endpoint), or on a session's host 'app', 'internal' (satellite's own page) or 'front-auth'."""
    kind: str
    path: str
    alias: str = ""


def alias_for_host(host: str, domain: str) -> Optional[str]:
    """'<w1-w2-w3>.<domain>' -> alias; any other host is the management API."""
    suffix = "." + domain
    if host.endswith(suffix) and ALIAS_SHAPE.match(host[:-len(suffix)]):
        return host[:-len(suffix)]
    return None


PLANES = ("all", "data", "control")     # which listener: the only one, sessions only, or the control plane


def route(request: Request, settings: Settings, plane: str = "all") -> Route:
    """With control-listen set, the data plane (the listener a front forwards to) serves sessions and
    /healthz only, and the control plane serves the API, tunnels, metrics and the front's auth."""
    path = request.path
    alias = alias_for_host(request.host, settings.domain)
    if alias is not None:
        if path == INTERNAL_PREFIX + "auth" and plane != "data":
            return Route("front-auth", path, alias)
        if plane == "control":
            return Route("unknown", path)
        return Route("internal" if path.startswith(INTERNAL_PREFIX) else "app", path, alias)
    endpoint = ENDPOINTS.get(path)
    if endpoint is None or (endpoint.legacy and not settings.legacy_api) or (plane == "data" and path != "/healthz"):
        return Route("unknown", path)
    return Route("endpoint", path)


FRONT_SECRET_HEADER = "X-Satellite-Front"


def speaks_for_clients(request: Request, via: str, settings: Settings, front_secret: str) -> bool:
    """Is this a trusted front: from trusted-fronts and, where a front secret is set, carrying it? A front
    on this host shares its loopback address with every local user; the secret tells nginx from them."""
    if not address_in(via, settings.trusted_fronts):
        return False
    presented = request.headers.get(FRONT_SECRET_HEADER) or ""
    return not front_secret or hmac.compare_digest(presented.encode(), front_secret.encode())


def client_address(request: Request, via: str, front: bool) -> str:
    """Who is asking: the connection's address, or — from a trusted front — the address the front
    appended last to X-Forwarded-For (what it saw; earlier entries are the client's own claims).
    A trusted front that names no client is refused: it would otherwise be taken for itself."""
    if not front:
        return via
    forwarded = ",".join(request.headers.get_all("x-forwarded-for")).split(",")[-1].strip().strip("[]")
    try:
        return plain_address(str(ipaddress.ip_address(forwarded)))
    except ValueError:
        raise HttpError(400, "a request from a trusted front must name its client in X-Forwarded-For") from None


def allowed_networks(settings: Settings, names: tuple) -> tuple:
    return sum((getattr(settings, name) for name in names), ())


def endpoint_refusal(endpoint: Endpoint, request: Request, peer: str, settings: Settings) -> Optional[ApiError]:
    """Why this caller may not call this endpoint with this head, or None. Decided before any
    byte of the body is read, so a caller from elsewhere spends one request head and no more."""
    if endpoint.networks and not address_in(peer, allowed_networks(settings, endpoint.networks)):
        return ApiError(403, f"{endpoint.what} is not allowed from {peer}")
    if endpoint.max_body and request.method not in API_METHODS:
        return ApiError(405, "Oops! Use GET or POST" if endpoint.legacy else "use GET or POST")
    if request.framing != "none" and endpoint.max_body == 0:
        return ApiError(413, f"{request.path} takes no request body")
    if request.framing == "length" and request.length > endpoint.max_body:
        return ApiError(413, f"request body too large (at most {endpoint.max_body} bytes)")
    return None


def sso_user(request: Request, front: bool, settings: Settings) -> Optional[str]:
    """The signed-in user named by the SSO front, believed only from a trusted front."""
    header = settings.trusted_user_header
    if not header or not front:
        return None
    values = request.headers.get_all(header)
    user = values[0].strip() if len(values) == 1 else ""          # two names for one request: believe neither
    return user if 0 < len(user) <= 256 else None


def session_cookie(server_secret: bytes, session: Session) -> tuple:
    """Set on the first visit with the token, so later requests need not carry it."""
    value = cookie_value(server_secret, session.alias, session.token_hash)
    return ("Set-Cookie", f"{COOKIE_NAME}={value}; Path=/; Secure; HttpOnly; SameSite=Lax")


def satellite_cookies(request: Request) -> list:
    """The values of satellite's session cookie, from every Cookie line (a browser sends one; anyone may send more)."""
    return [value for header in request.headers.get_all("cookie") for name, _, value in
            (part.strip().partition("=") for part in header.split(";")) if name == COOKIE_NAME]


def presented_credential(request: Request, session: Session, server_secret: bytes) -> Optional[str]:
    """How the request proves it holds the session's token: 'query', 'cookie', 'header' or None.
    At most one value of each is compared (a request is at most three guesses); constant-time."""
    tokens = [v for n, v in urllib.parse.parse_qsl(request.query, keep_blank_values=True) if n == "token"] \
        if "token=" in request.query else []
    if tokens and secret_matches(tokens[0], session.token_hash):       # one guess a request: the first
        return "query"
    cookies = satellite_cookies(request)
    if cookies and hmac.compare_digest(cookies[0].encode(),
                                       cookie_value(server_secret, session.alias, session.token_hash).encode()):
        return "cookie"
    scheme, _, value = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() in ("token", "bearer") and secret_matches(value.strip(), session.token_hash):
        return "header"
    return None


UNSAFE_METHODS = frozenset(("POST", "PUT", "PATCH", "DELETE"))


def foreign_origin(request: Request) -> Optional[str]:
    """Why a browser request from another site, or from another session's host (sessions share a
    domain, so browsers call them same-site), must not reach the app — or None. Only methods that
    change state and WebSocket upgrades are checked; clients that send no Origin (curl, scripts)
    and same-origin requests pass."""
    if request.method not in UNSAFE_METHODS and not request.wants_websocket:
        return None
    origin = request.headers.get("origin")
    own = "https://" + re.sub(r":443$", "", request.host_header.lower())
    if origin is not None and re.sub(r":443$", "", origin.strip().lower()) != own:
        return f"a {'WebSocket' if request.wants_websocket else request.method} from {origin[:100]}"
    if request.headers.tokens("sec-fetch-site") & {"cross-site", "same-site"}:          # any value of it
        return f"a {'WebSocket' if request.wants_websocket else request.method} from another site"
    return None


def tried_a_credential(request: Request) -> bool:
    """Whether a refused request presented something to check (it then counts against token-failures): the
    same places presented_credential looks, every Cookie line included."""
    return bool("token=" in request.query or satellite_cookies(request) or request.headers.get("authorization"))


@dataclasses.dataclass
class Verdict:
    """The access decision for one request to a session's host. Refused: `status` and `text` say
    how, `why` and `label` are for the audit log and metrics. Allowed: `credential` says how the
    caller proved it, `cookie` is set on the answer. The caller carries out `bind_owner` (SSO: the
    first signed-in user owns the session) and `end_expired` (a session past its time, not yet
    marked ended); a wrong token was counted as it was decided (decide_session_access)."""
    status: int = 200
    text: str = ""
    why: str = ""
    label: str = ""
    retry_after: int = 0
    credential: Optional[str] = None
    cookie: tuple = ()
    bind_owner: bool = False
    end_expired: bool = False

    @property
    def allowed(self) -> bool:
        return self.status == 200


ENDED_TEXT = "This session has ended. Start a new one to get a new link."

NEEDS_TOKEN_TEXT = "This link needs its token: open the full link you were given (the one ending in ?token=...)."


def decide_session_access(request: Request, session: Optional[Session], user: Optional[str], settings: Settings,
                          server_secret: bytes, take_failure: Callable[[], int], now: float) -> Verdict:
    """Who is asking and may they reach this session? A valid credential is checked first and is
    never refused for others' failures; only wrong tokens meet the limiter: `take_failure()` counts one
    for this address and alias if the limit allows it (0), else counts nothing and gives the wait."""
    if session is None:
        return Verdict(404, "There is no session at this address.")
    if session.is_over(now):      # refused to all; its holder (credential) may learn why it ended
        credential = "legacy" if session.legacy else presented_credential(request, session, server_secret)
        return Verdict(410, ENDED_TEXT, credential=credential, end_expired=session.state != "ended")
    foreign = foreign_origin(request)
    if foreign:
        return Verdict(403, "This request came from another site or another session's page, so it was not passed "
                            "on to the app. Open the app from its own link.", f"cross-origin: {foreign}", "cross_origin")
    credential = "legacy" if session.legacy else presented_credential(request, session, server_secret)
    if credential is None:
        if not tried_a_credential(request):
            return Verdict(403, NEEDS_TOKEN_TEXT, "no token", "no_token")
        wait = take_failure()
        if wait:
            return Verdict(429, "Too many attempts with wrong tokens from your address; wait a minute.",
                           "too many wrong tokens", "rate_limited", retry_after=wait)
        return Verdict(403, NEEDS_TOKEN_TEXT, "wrong token", "wrong_token")
    verdict = Verdict(credential=credential,
                      cookie=() if credential in ("cookie", "legacy") else session_cookie(server_secret, session))
    if settings.trusted_user_header:
        if user is None:
            text = "Sign in through the site's login page first; this link only works there."
            return Verdict(403, text, text, "not_owner")
        if session.user is None:
            verdict.bind_owner = True
        elif session.user != user:
            return Verdict(403, "This session belongs to another user.", "This session belongs to another user.",
                           "not_owner")
    return verdict


###############################################################################
# 8. Management API: the new API, SDSC's legacy CGIs, and the tunnel attach
#    Reached only after endpoint_refusal (section 7) let the caller in; the body is
#    read here, within the endpoint's limit.
###############################################################################

def parse_params(request: Request, body: bytes) -> dict:
    """Query and form-body parameters, each at most once."""
    pairs = urllib.parse.parse_qsl(request.query, keep_blank_values=True)
    if body:
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype not in ("application/x-www-form-urlencoded", ""):
            raise ApiError(415, "send parameters in the query or as application/x-www-form-urlencoded")
        try:
            pairs += urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise ApiError(400, "form body is not UTF-8") from None
    params = {}
    for name, value in pairs:
        if name in params:
            raise ApiError(400, f"parameter {name!r} given twice")
        params[name] = value
    return params


def require(params: dict, name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise ApiError(400, f"missing parameter {name!r}")
    return value


def check_params(params: dict, allowed: Iterable) -> None:
    unknown = sorted(set(params) - set(allowed) - {"format"})
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}")


RELEASE_REASON = re.compile(r"[ -~]{1,120}")      # printable ASCII, one short line: it reaches logs and terminals
USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")
MUNGE_CREDENTIAL = re.compile(r"^MUNGE:[A-Za-z0-9+/=]{16,4096}:\Z")


def munge_user(credential: str) -> str:
    """The user who made a MUNGE credential (`munge -n` on a login node), checked by this node's
    munged through `unmunge`: the proxy node must share the cluster's MUNGE key. A replayed,
    expired or foreign credential is refused."""
    if not MUNGE_CREDENTIAL.match(credential):
        raise ApiError(400, "munge must be a credential made by `munge -n`")
    try:      # metadata only: a payload is the maker's own text (it could say "UID: root (0)"), never read
        result = subprocess.run(["unmunge", "--output=/dev/null", "--keys=STATUS,UID,LENGTH"], input=credential,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("cannot check a MUNGE credential: %s", exc)
        raise ApiError(503, "satellite cannot check MUNGE credentials right now") from None
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in result.stdout.splitlines())}
    status = fields.get("STATUS", "") or result.stderr.strip()[:200]
    if result.returncode != 0 or not status.startswith("Success"):
        raise ApiError(403, f"MUNGE credential refused: {status}")
    if fields.get("LENGTH") != "0":
        raise ApiError(403, "a MUNGE credential for satellite carries no payload: make it with `munge -n`")
    match = re.fullmatch(r"(\S+) \((\d+)\)", fields.get("UID", ""))
    if not match:
        raise ApiError(403, "the MUNGE credential names no user")
    name, uid = match.groups()
    return name if USER_NAME.match(name) else f"uid-{uid}"


def redeemable_port(text: str, port_range: tuple) -> int:
    low, high = port_range
    if not text.isdigit() or not low <= int(text) <= high:
        raise ApiError(400, f"port must be a number from {low} to {high}")
    return int(text)


def format_fields(fields: dict, as_json: bool) -> tuple:
    """(content type, body) for an API reply: key=value lines, or JSON."""
    if as_json:
        return "application/json", (json.dumps(fields) + "\n").encode()
    return "text/plain; charset=utf-8", "".join(f"{k}={v}\n" for k, v in fields.items()).encode()


def management_answer(status: int, ctype: str, body: bytes, retry_after: int) -> Answer:
    """An answer of either API: Allow with a 405, Retry-After with a limit."""
    extra = [("Allow", ", ".join(API_METHODS))] if status == 405 else []
    if retry_after:
        extra.append(("Retry-After", str(retry_after)))
    return Answer(status, [("Content-Type", ctype)] + PAGE_HEADERS + extra, body)


def api_answer(status: int, fields: dict, as_json: bool, retry_after: int = 0) -> Answer:
    return management_answer(status, *format_fields(fields, as_json), retry_after)


def legacy_answer(status: int, text: str, retry_after: int = 0) -> Answer:
    return management_answer(status, "text/plain; charset=utf-8", text.encode(), retry_after)


class ManagementApi:
    """The curl-able API on every host that is not a session alias.

    Each endpoint takes (params, peer address) and returns (status, fields) — the legacy ones
    (status, text) — or raises ApiError. `answer` is the transport: it reads the form, calls the
    endpoint and turns the outcome, errors included, into an Answer.
    """

    def __init__(self, settings: Settings, store: Store, events: Events, metrics: Metrics,
                 limits: Optional[Limits] = None):
        self.settings = settings
        self.store = store
        self.events = events
        self.metrics = metrics
        self.upstream_key: Optional[CookieKey] = None      # set by Satellite: what upstream proofs derive from
        limits = limits or Limits(settings)
        self.getlink_limit = limits.getlink
        self.lookup_failures = limits.lookup_failures      # /api/status: open to anyone
        self.munge_checks = limits.munge_checks
        self.munge_running = threading.BoundedSemaphore(MUNGE_AT_ONCE)
        self.routes: dict = {
            "/api/getlink": self.getlink,
            "/api/redeem": self.redeem,
            "/api/state": self.state,
            "/api/release": self.release,
            "/api/status": self.status,
            "/api/jobstates": self.jobstates,
            "/getlink.cgi": self.legacy_getlink,
            "/redeemtoken.cgi": self.legacy_redeem,
            "/destroytoken.cgi": self.legacy_destroy,
            "/linktoken.cgi": self.legacy_link,
            "/tokenjobstate.cgi": self.legacy_jobstate,
            "/update-jobs.cgi": self.legacy_update_jobs,
        }

    # transport -------------------------------------------------------------------
    def answer(self, endpoint: Endpoint, path: str, request: Request, peer: str, user: Optional[str],
               read_body: Callable[[int], bytes]) -> Answer:
        """A call of a form endpoint, end to end: decide on the head, read the form within the
        endpoint's limit, call it, and turn the outcome, errors included, into an Answer."""
        as_json = "application/json" in (request.headers.get("accept") or "")
        try:
            refusal = endpoint_refusal(endpoint, request, peer, self.settings)
            if refusal is not None:
                raise refusal
            params = parse_params(request, read_body(endpoint.max_body))
            as_json = as_json or params.get("format") == "json"
            if not endpoint.legacy and params.get("key"):
                self.refuse_legacy_key(params["key"])
            if path == "/api/getlink":
                status, reply = self.getlink(params, peer, user)     # the only endpoint that asks who
            else:
                status, reply = self.routes[path](params, peer)
        except ApiError as exc:
            return self.refused(exc, path, peer, user, as_json)
        except sqlite3.Error as exc:
            log.error("database error on %s: %s", path, exc)
            return self.refused(ApiError(503, "database unavailable, try again", retry_after=5), path, peer, user,
                                as_json)
        if endpoint.legacy:
            return legacy_answer(status, reply)
        return api_answer(status, reply, as_json)

    def refused(self, exc: ApiError, path: str, peer: str, user: Optional[str], as_json: bool) -> Answer:
        """The one place an API error becomes an answer, in its transport's form (and a refusal
        becomes an audit line)."""
        endpoint = ENDPOINTS.get(path)
        legacy = endpoint is not None and endpoint.legacy
        log.info("api %s from %s: %d %s", path, peer, exc.status, exc.reason)
        if exc.status in (403, 404, 429):
            self.deny(f"{'legacy' if legacy else 'api'} {path}: {exc.reason}", peer, user, f"api_{exc.status}")
        if legacy:
            return legacy_answer(exc.status, (exc.reason if exc.reason.startswith("Oops!")
                                              else f"Oops! {exc.reason}") + "\n", exc.retry_after)
        return api_answer(exc.status, {"error": exc.reason}, as_json, exc.retry_after)

    def refuse_legacy_key(self, key: str) -> None:
        """The new API takes no legacy session's key: it is the session's alias (SDSC's design), public in
        its link, so there it would end, re-point or tunnel a mapped session from anywhere in the cluster.
        A legacy session is redeemed, destroyed and watched only through its CGIs, under their rules."""
        session = self.store.session_by_key(key)
        if session is not None and session.legacy:
            raise ApiError(404, "unknown key")

    def deny(self, why: str, peer: str, user: Optional[str], label: str, alias: Optional[str] = None) -> None:
        """A refused request: counted, and one audit line (no secret: only why)."""
        self.metrics.deny(label)
        self.events.record("denied", alias, peer, reason=why, user=user)

    # the API -----------------------------------------------------------------------
    def getlink(self, params: dict, peer: str, sso_user: Optional[str] = None) -> tuple:
        check_params(params, ("lifetime", "user", "munge"))
        user = self.asking_user(params, sso_user, peer)
        lifetime = self.settings.session_lifetime
        if params.get("lifetime"):
            try:
                lifetime = parse_duration(params["lifetime"])
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
            if not 60 <= lifetime <= self.settings.max_session_lifetime:
                raise ApiError(400, f"lifetime must be between 60s and {self.settings.max_session_lifetime}s")
        session, token, key = self.issue(peer, lifetime, user)
        self.events.record("issue", session.alias, peer, lifetime=lifetime, issued_for=user and user[0],
                           user_proof=user and user[1])
        return 201, {"alias": session.alias, "url": self.settings.session_url(session.alias) + "?token=" + token,
                     "token": token, "key": key, "state": session.state, "expires": iso_time(session.expires)}

    def asking_user(self, params: dict, sso_user: Optional[str], peer: str) -> Optional[tuple]:
        """(name, how it is known) of the user asking for a link, or None if none is named: the SSO
        front's user, the maker of a MUNGE credential (checked), or a user= claim (a label: believed,
        not checked, and refused when the site sets user-proof = munge)."""
        claimed = params.get("user") or None
        if claimed is not None and not USER_NAME.match(claimed):
            raise ApiError(400, "user must be a user name (letters, digits, '.', '_', '-')")
        if sso_user:
            return sso_user, "sso"
        if params.get("munge"):
            name = self.checked_munge_user(params["munge"], peer)
            if claimed and claimed != name:
                raise ApiError(403, f"the MUNGE credential was made by {name}, not {claimed}")
            return name, "munge"
        if self.settings.user_proof == "munge":
            raise ApiError(403, "this satellite needs proof of who asks: add munge=$(munge -n) "
                                "(satellite-client does so where munge is installed)")
        return (claimed, "claim") if claimed else None

    def checked_munge_user(self, credential: str, peer: str) -> str:
        """munge_user within the MUNGE limits: a rate per address (for all workers) and, since each check
        runs a process for up to 10 s before anyone is known, at most MUNGE_AT_ONCE checks at once in this
        worker; more are refused at once (429), not queued."""
        if not self.munge_running.acquire(blocking=False):
            raise ApiError(429, f"satellite is checking {MUNGE_AT_ONCE} MUNGE credentials already; try again in a "
                                "second", retry_after=1)
        try:
            wait = self.munge_checks.take(address_group(peer))
            if wait:
                raise ApiError(429, f"too many MUNGE credentials from {peer}; try again in {wait}s", retry_after=wait)
            return munge_user(credential)
        finally:
            self.munge_running.release()

    def issue(self, peer: str, lifetime: int, user: Optional[tuple], legacy: bool = False) -> tuple:
        """A new link within the limits: (Session, token, key). The quotas' count and the new row are one
        write transaction, so no other thread or worker counts the same live sessions in between and
        issues one more than the quota."""
        with self.store.immediate_transaction():
            self.check_issue_limits(peer, user)
            self.getlink_limit.record(("user", user[0]) if user else address_group(peer))
            return self.store.create_link(peer, lifetime, self.settings.redeem_within, legacy=legacy, user=user)

    def check_issue_limits(self, peer: str, user: Optional[tuple]) -> None:
        """Links are rationed per user where the user is named, so one user on a shared login node
        cannot use up everyone's; the address's own ceiling stays."""
        who = f"user {user[0]}" if user else peer
        wait = self.getlink_limit.retry_after(("user", user[0]) if user else address_group(peer))
        if wait:
            raise ApiError(429, f"too many links asked for by {who}; try again in {wait}s", retry_after=wait)
        quota = self.settings.max_live_per_user
        if user and quota and self.store.live_count_for(user[0]) >= quota:
            raise ApiError(429, f"{quota} live sessions for {who} already; release one first", retry_after=60)
        quota = self.settings.max_live_per_source
        if quota and self.store.live_count_from(peer) >= quota:
            raise ApiError(429, f"{quota} live sessions from {peer} already; release one first", retry_after=60)

    def redeem(self, params: dict, peer: str) -> tuple:
        """Map the session to the caller's address and `port`. With `fingerprint`, satellite speaks TLS to it
        and accepts only that certificate. With `proof=1` too (satellite-client's agent), the reply carries
        `upstream_proof`, which satellite then sends first on every connection to it (section 10)."""
        check_params(params, ("key", "port", "fingerprint", "check", "proof"))
        key = require(params, "key")
        port = redeemable_port(require(params, "port"), self.settings.port_range)
        pin = None
        if params.get("fingerprint"):
            pin = params["fingerprint"].replace(":", "").lower()
            if not re.fullmatch(r"[0-9a-f]{64}", pin):
                raise ApiError(400, "fingerprint must be the SHA-256 of the app's certificate (64 hex digits)")
        if params.get("check") == "1" and self.store.session_by_key(key) and not probe((peer, port), 2.0):
            raise ApiError(502, f"satellite cannot connect to {host_port(peer, port)}; the app is not listening "
                                "there, or the node takes no inbound connections (use a tunnel)")
        proof = params.get("proof") == "1"
        if proof and not pin:
            raise ApiError(400, "proof=1 needs fingerprint: the proof travels only inside pinned TLS")
        session = self.store.redeem(key, peer, port, pin, proof=proof)
        self.events.record("redeem", session.alias, peer, target=session.describe()["target"])
        reply = session.describe()
        if proof:
            if self.upstream_key is None:
                raise ApiError(503, "this satellite has no upstream key")
            reply["upstream_proof"] = upstream_proof(self.upstream_key.current(), session.alias, session.key_hash)
        return 200, reply

    def attach_tunnel(self, request: Request, peer: str) -> Session:
        """`GET /api/tunnel` with `Upgrade: satellite-tunnel/1`, `Authorization: Bearer <key>` (a header,
        so the key is in no URL or log) and `Satellite-Tunnel-Attach: <number>`, larger than any before
        (so a replayed request is refused). The connection then carries the session (section 11)."""
        if request.method != "GET" or TUNNEL_PROTOCOL not in request.headers.tokens("upgrade"):
            raise ApiError(400, f"ask for a tunnel with GET and Upgrade: {TUNNEL_PROTOCOL}")
        scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
        attach = request.headers.get("satellite-tunnel-attach") or ""
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(403, "a tunnel needs the session key as Authorization: Bearer <key>")
        if not attach.isdigit() or len(attach) > 18:
            raise ApiError(400, "Satellite-Tunnel-Attach must be a number")
        self.refuse_legacy_key(key.strip())
        session = self.store.attach_tunnel(key.strip(), peer, int(attach))
        self.events.record("tunnel", session.alias, peer)
        return session

    def state(self, params: dict, peer: str) -> tuple:
        check_params(params, ("key", "state", "jobid"))
        key, state = require(params, "key"), require(params, "state")
        if state not in REPORTABLE_STATES:
            raise ApiError(400, "state must be queued or running")
        jobid = params.get("jobid") or None
        if jobid and not JOBID_SHAPE.match(jobid):
            raise ApiError(400, "malformed jobid")
        session = self.store.report_state(key, state, jobid)
        self.events.record("state", session.alias, peer, state=state, jobid=jobid)
        return 200, session.describe()

    def release(self, params: dict, peer: str) -> tuple:
        """reason= (optional): the job's one line on why it ended, kept as the session's end_reason."""
        check_params(params, ("key", "reason"))
        reason = params.get("reason")
        if reason is not None and not RELEASE_REASON.fullmatch(reason):
            raise ApiError(400, "malformed reason: 1 to 120 printable ASCII characters")
        session = self.store.session_by_key(require(params, "key"))
        if session is None:
            raise ApiError(404, "unknown key")
        if self.store.end(session.alias, f"released: {reason}" if reason else "released"):   # idempotent
            self.events.record("release", session.alias, peer)
        return 200, self.store.session(session.alias).describe()

    def status(self, params: dict, peer: str) -> tuple:
        check_params(params, ("key", "token"))
        if params.get("key"):
            session = self.store.session_by_key(params["key"])
        elif params.get("token"):
            session = self.store.session_by_token(params["token"])
        else:
            raise ApiError(400, "give key= or token=")
        if session is None:
            wait = self.lookup_failures.take(address_group(peer))
            if wait:
                raise ApiError(429, f"too many unknown keys and tokens from {peer}; try again in {wait}s",
                               retry_after=wait)
            raise ApiError(404, "unknown key or token")
        return 200, session.describe()

    def jobstates(self, params: dict, peer: str) -> tuple:
        """The scheduler's view, so status pages can say "in queue" or "held": jobstates=
        lines of "JOBID STATE" (SDSC's update-jobs shape) or "JOBID STATE REASON" (squeue -h -o '%i %T %r'),
        from the admin network only."""
        check_params(params, ("jobstates", "snapshot"))
        feed = require(params, "jobstates")
        try:
            snapshot = parse_bool(params.get("snapshot") or "no")
        except ValueError:
            raise ApiError(400, "snapshot must be yes or no") from None
        named, ended = take_jobstates(self.store, self.events, feed, snapshot, self.settings.job_gone_after)
        return 200, {"jobs": len(read_jobstates(feed)), "sessions": named, "ended": ended}

    # SDSC Satellite's API (--legacy-api) -------------------------------------------
    # Same endpoints, parameters and reply texts as the Perl CGIs, so galyleo and start-jupyter work
    # unchanged; but errors carry real status codes (the body still starts "Oops!", which they look for).
    # The alias is a legacy session's only secret, so: it redeems once (as SDSC's "nonce already used"),
    # only the new API's limits issue it, only these endpoints take it, and no log shows it (logged_alias).

    def legacy_session(self, params: dict) -> Session:
        alias = params.get("token", "").strip().lower().split(".")[0]
        session = self.store.session(alias) if ALIAS_SHAPE.match(alias) else None
        if session is None or not session.legacy:
            raise ApiError(404, "Oops! Invalid token")
        return session

    def legacy_getlink(self, params: dict, peer: str) -> tuple:
        # SDSC's client names no user: the address's limits
        session, _, _ = self.issue(peer, self.settings.session_lifetime, None, legacy=True)
        self.events.record("issue", session.alias, peer, legacy=True)
        return 200, f"Your token is \n{session.alias}\n"

    def legacy_redeem(self, params: dict, peer: str) -> tuple:
        session = self.legacy_session(params)
        try:
            port = redeemable_port(params.get("port", ""), self.settings.port_range)
            redeemed = self.store.redeem(session.alias, peer, port, once=True)
        except ApiError as exc:
            raise ApiError(exc.status, f"Oops! {exc.reason}") from None
        if redeemed.redeemed != session.redeemed:          # a retry changed nothing: nothing to record
            self.events.record("redeem", session.alias, peer, target=host_port(peer, port), legacy=True)
        return 200, "Success!\n"

    def legacy_destroy(self, params: dict, peer: str) -> tuple:
        session = self.legacy_session(params)
        if session.target_host and session.target_host != peer:
            raise ApiError(403, "Oops! Only the mapped host may destroy a mapped token")
        if self.store.end(session.alias, "released"):
            self.events.record("release", session.alias, peer, legacy=True)
        return 200, "Success! Token destroyed.\n"

    def legacy_link(self, params: dict, peer: str) -> tuple:
        session = self.legacy_session(params)
        jobid = params.get("jobid", "")
        if not JOBID_SHAPE.match(jobid):
            raise ApiError(400, "Oops! Invalid jobid")
        if session.jobid:
            raise ApiError(409, "Oops! Token already linked to a job")
        if session.target and session.target_host != peer:
            # a job named for a redeemed session is one whose end ends it: only its mapped host may name it
            # (else any node attaches a job of its own and its end destroys the session, as destroytoken.cgi
            # refuses to anyone but that host)
            raise ApiError(403, "Oops! Only the mapped host may link a redeemed token to a job")
        self.store.report_state(session.alias, "queued", jobid)
        return 200, "Success!\n"

    def legacy_jobstate(self, params: dict, peer: str) -> tuple:
        """One code, and nothing after it (SDSC's status page compares the reply exactly): U unknown (or not
        a legacy session), PE pending, Q in queue, R running (not redeemed), M mapped, PR proxied, D dead."""
        try:
            session = self.legacy_session(params)
        except ApiError:
            return 200, "U"
        if session.is_over(time.time()):
            return 200, "D"
        code = {"mapped": "M", "proxied": "PR", "running": "R"}.get(session.state)
        if code is None:
            job = (session.jobstate or "").upper()
            code = "R" if job in ("RUNNING", "R") else "Q" if job else "PE"
        return 200, code

    def legacy_update_jobs(self, params: dict, peer: str) -> tuple:
        take_jobstates(self.store, self.events, params.get("jobstates", ""), False,
                       self.settings.job_gone_after)
        return 200, "Success!\n"


###############################################################################
# 9. Pages: satellite's own answers on a session's host
###############################################################################

PAGE_STYLE = ("body{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#222}"
              "h1{font-size:1.4em}code{background:#eee;padding:0 .3em}ol{padding-left:1.2em}"
              "li{color:#999}li.done{color:#222}li.now{color:#222;font-weight:bold}"
              "#left.soon{background:#fff3cd;border-left:4px solid #c90;padding:.5em 1em}")

STATE_STEPS = [
    ("queued", "Job waiting in the queue"),
    ("running", "Job running, starting the app"),
    ("mapped", "App registered, waiting for it to answer"),
    ("proxied", "Connected"),
]

# Polls satellite's status endpoint (STATUS_PATH, JSON in every state). On an app's path the page
# reloads into the app once it answers; satellite's own session page (INTERNAL_PREFIX) stays, links
# to the app and keeps watching. Both show the time left, ask for notifications (ready; ENDING_NOTICE
# before the end) and, once the session ended, why, and stop. A refusal stops them too (an answer
# that is not satellite's JSON reloads the status page once: a front sent the poll on to the app);
# network failures and 5xx (satellite restarting) are retried.
STATUS_SCRIPT = """
(function(){
  var steps = %s, stays = %s, notice = %d, path = '%s', seen = {};
  function $(id){ return document.getElementById(id); }
  function tell(key, text){
    if (seen[key]) return;
    seen[key] = true;
    if (window.Notification && Notification.permission === 'granted')
      try { new Notification(document.title, {body: text, tag: key}); } catch (e) {}
  }
  function left(s){
    var m = Math.floor(s / 60);
    return s < 60 ? 'less than a minute' : m < 120 ? m + (m == 1 ? ' minute' : ' minutes')
                                                   : Math.floor(m / 60) + ' hours';
  }
  var ask = $('ask');
  if (window.Notification && Notification.permission === 'default') {
    ask.hidden = false;
    ask.addEventListener('click', function(){
      Notification.requestPermission().then(function(){ ask.hidden = true; });
    });
  }
  function show(s){
    var i = s.state === 'ended' ? -1 : steps.indexOf(s.state);
    document.querySelectorAll('li').forEach(function(li, n){
      li.className = n < i || (s.ready && stays) ? 'done' : (n == i ? 'now' : '');
    });
    $('msg').textContent = s.message || '';
    var banner = $('left');
    if (s.state === 'ended') {
      document.title = 'Your session has ended';
      document.querySelector('h1').textContent = document.title;
      $('intro').hidden = $('app').hidden = banner.hidden = ask.hidden = true;
      document.querySelector('ol').hidden = true;
      return;
    }
    if (s.ready || s.state === 'mapped' || s.state === 'proxied') {
      banner.hidden = false;
      banner.className = s.seconds_left <= notice ? 'soon' : '';
      banner.textContent = 'Your session ends in ' + left(s.seconds_left) + (s.seconds_left <= notice ?
        ': save your work now. When it ends, the app stops and what is not saved is lost.' : '.');
    }
    if (s.ready && stays) { $('app').hidden = false; $('intro').hidden = true; }
  }
  function poll(){
    fetch(path, {credentials: 'same-origin', cache: 'no-store'})
      .then(function(r){
        return r.json().then(function(s){ return [r, s]; }, function(){ return [r, null]; });
      })
      .then(function(rs){
        var r = rs[0], s = rs[1];
        if (!s || !s.state) {
          if (r.status >= 500 || r.status == 429) { setTimeout(poll, 5000); return; }
          if (!s && !stays) { location.reload(); return; }    // not satellite's answer (a front sent it on)
          $('msg').textContent = (s && s.error) || 'This page can no longer follow your session: reload it.';
          return;
        }
        show(s);
        if (s.state === 'ended') return;
        if (s.ready) tell('ready', 'Your session is ready.');
        if (s.ready && s.seconds_left <= notice)
          tell('ending', 'Your session ends in ' + left(s.seconds_left) + ': save your work.');
        if (s.ready && !stays) { location.reload(); return; }
        setTimeout(poll, s.ready ? 5000 : 1000);
      })
      .catch(function(){ setTimeout(poll, 2000); });
  }
  setTimeout(poll, 1000);
})();
"""


def page(title: str, body_html: str, script: str = "") -> bytes:
    script_tag = f"<script>{script}</script>" if script else ""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body_html}{script_tag}</body></html>\n").encode()


# Scheduler pending reasons that do not clear by themselves (Slurm's squeue %r), and what to do.
STUCK_REASONS = [
    ("PartitionTimeLimit", "the time asked for is longer than the partition allows: cancel the job and ask for "
                           "less time, or another partition."),
    ("PartitionNodeLimit", "it asks for more nodes than the partition allows: cancel it and ask for fewer."),
    ("PartitionDown", "its partition is down: ask your support team, or use another partition."),
    ("PartitionInactive", "its partition is not taking jobs: ask your support team, or use another partition."),
    ("QOSMax", "it asks for more than its QOS allows: cancel it and ask for less, or another QOS."),
    ("AssocGrp", "your account or group has reached a limit: it starts only when your other jobs end or the "
                 "limit is raised; ask your support team."),
    ("AssocMax", "it asks for more than your account allows: cancel it and ask for less."),
    ("ReqNodeNotAvail", "the nodes it needs are down, drained or reserved: it may wait a long time; ask your "
                        "support team or ask for other nodes."),
    ("InvalidAccount", "its account is not valid: cancel it and submit with a valid account."),
    ("InvalidQOS", "its QOS is not valid: cancel it and submit with a valid QOS."),
    ("DependencyNeverSatisfied", "it depends on a job that failed: cancel it."),
    ("BadConstraints", "no node matches what it asks for: cancel it and ask for something that exists."),
    ("JobHeld", "it is held: release it (scontrol release JOBID) or ask your support team why."),
]


def jobstate_note(session: Session) -> str:
    if session.state != "queued" or not session.jobstate:
        return ""
    held = "HELD" in session.jobstate or session.jobstate in ("SUSPENDED", "H", "S")
    if held:
        return f"The scheduler holds job {session.jobid}: ask your support team why."
    reason = session.pending_reason
    if not reason:
        return f"The scheduler says: job {session.jobid} is {session.jobstate.lower()}."
    advice = next((text for prefix, text in STUCK_REASONS if reason.startswith(prefix)), "")
    if advice:
        return f"Job {session.jobid} will not start by itself ({reason}): {advice.replace('JOBID', session.jobid)}"
    return f"The scheduler says: job {session.jobid} is {session.jobstate.lower()} ({reason})."


# Satellite's own end reasons as sentences; any other reason (the job's, the agent's) is shown as is.
END_SENTENCES = {
    "expired": "The session reached the end of its time.",
    "app gone": "The app stopped answering, so satellite ended the session.",
    "tunnel gone": "The job's connection to satellite was lost, so satellite ended the session.",
    "released": "The job gave the link back: it finished or was cancelled.",
    "revoked": "An administrator ended the session.",
}


def end_sentence(session: Session, reason: str) -> str:
    if reason == "expired" and session.redeemed is None:
        return "The link expired before the job started its app."
    if reason in JOB_ENDED.values() or reason == JOB_NOT_LISTED:
        return f"The scheduler says: your {reason}."
    if reason.startswith("released: "):                   # the agent's words (RELEASE_REASON)
        return f"The job gave the link back: {reason[len('released: '):]}."
    return END_SENTENCES.get(reason) or f"The session ended: {reason}."


def status_page(session: Session, note: str = "", stays: bool = False) -> bytes:
    """The page that follows a session: on an app's path while the job starts (it turns into the
    app), or satellite's own session page (`stays`: it links to the app and keeps watching)."""
    current = [s for s, _ in STATE_STEPS].index(session.state) if session.state in dict(STATE_STEPS) else 0
    items = "".join(
        f"<li class={'done' if n < current else 'now' if n == current else ''}>{html.escape(text)}</li>"
        for n, (_, text) in enumerate(STATE_STEPS))
    body = (f"<p id=intro>Your session <code>{html.escape(session.alias)}</code> is on its way. "
            f"{'Its app opens from here' if stays else 'This page switches to your app by itself'}.</p>"
            f"<p id=app hidden><a href=/>Open your app</a> (<code>{html.escape(session.alias)}</code>). "
            f"Keep this page open to be warned before the session ends.</p>"
            f"<p id=left hidden></p><ol>{items}</ol>"
            f"<p id=msg>{html.escape(note or jobstate_note(session))}</p>"
            f"<p><button id=ask hidden>Notify me when it is ready and before it ends</button></p>"
            f"<noscript><p>Reload this page in a few seconds.</p></noscript>")
    script = STATUS_SCRIPT % (json.dumps([s for s, _ in STATE_STEPS]), json.dumps(stays), ENDING_NOTICE,
                              STATUS_PATH)
    return page("Your session" if stays else "Starting your session", body, script)


def message_page(status: int, text: str) -> bytes:
    return page(f"{status} {HTTPStatus(status).phrase}", f"<p>{html.escape(text)}</p>")


HTML = "text/html; charset=utf-8"
STATE_MESSAGES = {"queued": "Waiting for the batch system to start the job.",
                  "running": "The job is running; the app is starting.",
                  "mapped": "The app has registered; waiting for it to answer."}
TUNNEL_DOWN_NOTE = "The job's tunnel to satellite is reconnecting; this page moves on by itself."


def app_down_text(session: Session) -> str:
    """A proxied session's app does not answer. A job the scheduler has ended is a 410 instead
    (take_jobstates); this says whether the scheduler still runs it."""
    job = (session.jobstate or "").upper()
    if job in ("RUNNING", "R", "RUN", "COMPLETING", "CG"):
        return (f"The app behind this link stopped answering: it stopped or is restarting. Your job "
                f"{session.jobid} is still running; if the app does not come back, cancel the job and start anew.")
    return "The app behind this link is not answering. It may have stopped; check your job."


def page_answer(status: int, text: str, fields: Iterable = ()) -> Answer:
    return Answer(status, [("Content-Type", HTML), *PAGE_HEADERS, *fields], message_page(status, text))


def status_page_answer(session: Session, note: str = "") -> Answer:
    """503 with Retry-After while the job queues or starts: the page turns into the app by itself."""
    return Answer(503, [("Content-Type", HTML), *PAGE_HEADERS, ("Retry-After", "2")], status_page(session, note))


def session_page_answer(session: Session) -> Answer:
    """Satellite's own page for the session (INTERNAL_PREFIX): it stays open and watches."""
    return Answer(200, [("Content-Type", HTML), *PAGE_HEADERS], status_page(session, stays=True))


def status_info(session: Session, ready: bool, now: float) -> dict:
    """What satellite's pages poll (STATUS_PATH), in every state: no secret."""
    over = session.is_over(now)
    info = {"alias": session.alias, "state": "ended" if over else session.state, "ready": ready and not over,
            "expires": iso_time(session.expires), "seconds_left": max(0, int(session.expires - now)),
            "message": jobstate_note(session) or STATE_MESSAGES.get(session.state, "")}
    if session.jobstate:
        info["jobstate"] = session.jobstate
    if session.pending_reason and session.state == "queued":
        info["pending_reason"] = session.pending_reason
    if over:
        info["ended_because"] = session.end_reason or "expired"
        info["message"] = end_sentence(session, info["ended_because"])
        return info
    if session.state == "proxied":   # the app answered once; refresh or the tunnel's drop notes when it stops
        info["app"] = "not answering" if session.backend_gone else "answering"
        if session.backend_gone:
            info["message"] = app_down_text(session)
    if session.tunneled:
        info["tunnel"] = "connected" if ready else "reconnecting"
        if not ready:
            info["message"] = TUNNEL_DOWN_NOTE
    return info


def status_answer(session: Session, ready: bool, now: float) -> Answer:
    return Answer(200, [("Content-Type", "application/json"), *PAGE_HEADERS],
                  (json.dumps(status_info(session, ready, now)) + "\n").encode())


def refused_answer(verdict: Verdict, session: Optional[Session], path: str, now: float) -> Answer:
    """A refusal on a session's host. An ended session's holder learns why it ended; the status
    path answers JSON whatever happened, so a page polling it can say so and stop."""
    if verdict.status == 410 and verdict.credential:
        if path == STATUS_PATH:
            return status_answer(session, False, now)
        reason = end_sentence(session, session.end_reason or "expired")
        return page_answer(410, f"{reason} {ENDED_TEXT}")
    extra = [("Retry-After", str(verdict.retry_after))] if verdict.retry_after else []
    if path == STATUS_PATH:
        fields = {"state": "ended", "message": verdict.text} if verdict.status == 410 else {"error": verdict.text}
        return Answer(verdict.status, [("Content-Type", "application/json"), *PAGE_HEADERS, *extra],
                      (json.dumps(fields) + "\n").encode())
    return page_answer(verdict.status, verdict.text, extra)


def minutes_text(seconds: float) -> str:
    minutes = int(seconds // 60)
    return "less than a minute" if minutes < 1 else "1 minute" if minutes == 1 else f"{minutes} minutes"


def wants_ending_notice(request: Request, session: Session, now: float) -> bool:
    """Should this request get the ending notice instead of the app? Only a top-level page load
    (what a person sees: Sec-Fetch-Mode navigate, Sec-Fetch-Dest document, HTML accepted, GET)
    within ENDING_NOTICE of the end, once per session (NOTICE_COOKIE). The app's own fetches,
    frames, WebSockets and scripts never get it."""
    headers = request.headers
    seen = any(part.split("=", 1)[0].strip() == NOTICE_COOKIE
               for header in headers.get_all("cookie") for part in header.split(";"))
    return (request.method == "GET" and not request.wants_websocket and not seen
            and (headers.get("sec-fetch-mode") or "").lower() == "navigate"
            and (headers.get("sec-fetch-dest") or "").lower() == "document"
            and "text/html" in (headers.get("accept") or "")
            and 0 < session.expires - now <= ENDING_NOTICE)


def ending_notice_answer(request: Request, session: Session, now: float) -> Answer:
    """Satellite's short page before the app, near the end: save your work, then continue (the
    same address). Its cookie, kept until the session ends, says it was shown."""
    left = session.expires - now
    # never '//host' nor '/\\host' (browsers read a backslash as a slash): the link stays on this host
    target = "/" + request.target.lstrip("/\\").replace("\\", "%5C")
    body = (f"<p>Your session <code>{html.escape(session.alias)}</code> ends in "
            f"<strong>{minutes_text(left)}</strong>. Save your work now: when the session ends, the app "
            f"stops and what is not saved is lost.</p>"
            f"<p><a id=continue href='{html.escape(target)}'>Continue to your app</a></p>"
            f"<p>To be warned again just before the end, keep "
            f"<a href={INTERNAL_PREFIX} target=_blank rel=noopener>this session's satellite page</a> open.</p>")
    cookie = (f"{NOTICE_COOKIE}=shown; Path=/; Max-Age={int(left) + 60}; Secure; HttpOnly; SameSite=Lax")
    return Answer(200, [("Content-Type", HTML), *PAGE_HEADERS, ("Set-Cookie", cookie)],
                  page("Your session ends soon", body))


###############################################################################
# 10. Proxy: forward a request to the session's app, relay its answer and WebSockets
#     Reached only for a caller the access decision (section 7) let in.
###############################################################################

class CertificateMismatch(Exception):
    """The app presented a certificate other than the one pinned at redeem."""


class TunnelDown(Exception):
    """The session is reached through its job's tunnel, and that is not connected right now."""


def pinned_client_context() -> ssl.SSLContext:
    """TLS to an app with a self-signed certificate: no CA, no name; the pin decides."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


PINNED_CONTEXT = pinned_client_context()
Connector = Callable[[], socket.socket]           # opens a new connection to an app


class Upstream:
    """A keep-alive connection to one app, reused by one client connection. With a pin, it is
    TLS and accepted only if the app's certificate has exactly that SHA-256 fingerprint."""

    def __init__(self, target: tuple, connect: Connector, timeout: float, pin: Optional[str] = None,
                 preamble: bytes = b""):
        sock = connect()
        if pin:
            sock = PINNED_CONTEXT.wrap_socket(sock)
            presented = hashlib.sha256(sock.getpeercert(binary_form=True) or b"").hexdigest()
            if not hmac.compare_digest(presented, pin):
                sock.close()
                raise CertificateMismatch(f"the app at {host_port(*target)} presented certificate "
                                          f"sha256:{presented}, not the pinned one")
            if preamble:                            # the agent's gate: satellite's proof before any HTTP byte
                sock.sendall(preamble)
        sock.settimeout(timeout)
        self.stream = Stream(sock)
        self.reused = False
        self.key: tuple = ()

    def is_idle_and_open(self) -> bool:
        """A pooled connection the app has not closed (readable while idle = EOF or junk)."""
        if self.stream.buf or getattr(self.stream.sock, "pending", lambda: 0)():
            return False
        poller = select.poll()                      # poll, not select: descriptors may exceed 1024
        poller.register(self.stream.sock, select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        try:
            self.stream.sock.close()
        except OSError:
            pass


def direct_connector(target: tuple, connect_timeout: float) -> Connector:
    def connect() -> socket.socket:
        sock = socket.create_connection(target, timeout=connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    return connect


SATELLITE_COOKIES = frozenset((COOKIE_NAME.lower(), NOTICE_COOKIE.lower()))


def strip_satellite_cookie(value: str) -> str:
    """The Cookie header without satellite's own cookies; the app's cookies untouched."""
    return "; ".join(p for p in (c.strip() for c in value.split(";"))
                     if p and p.split("=", 1)[0].strip().lower() not in SATELLITE_COOKIES)


def forwarded_request_head(request: Request, peer: str, user_header: str = "", user: Optional[str] = None) -> bytes:
    """The head sent to the app: hop-by-hop fields dropped, forwarding fields set by satellite, and
    with SSO the user header set by satellite to the user it believes (`user`), whatever the client
    sent under that name or a look-alike (X_Remote_User: CGI and WSGI gateways fold '_' into '-')."""
    drop = HOP_BY_HOP | FORWARDING_HEADERS | request.headers.tokens("connection") | {"content-length", "expect"}
    user_name = user_header.lower().replace("_", "-")
    lines = [f"{request.method} {request.target} HTTP/1.1"]
    for name, value in request.headers.fields:
        lower = name.lower()
        if lower in drop or (user_name and lower.replace("_", "-") == user_name):
            continue
        if lower == "cookie":
            value = strip_satellite_cookie(value)
            if not value:
                continue
        lines.append(f"{name}: {value}")
    for_value = f'"[{peer}]"' if ":" in peer else peer
    lines += [f"X-Forwarded-For: {peer}", "X-Forwarded-Proto: https",
              f"X-Forwarded-Host: {request.host_header}",
              f'Forwarded: for={for_value};proto=https;host="{request.host_header}"',
              "Via: 1.1 satellite"]
    if user_name and user:
        lines.append(f"{user_header}: {user}")
    if request.wants_websocket:
        lines += ["Connection: Upgrade", "Upgrade: websocket"]
    if request.framing == "length":
        lines.append(f"Content-Length: {request.length}")
    elif request.framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    elif request.method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def host_only_cookie(set_cookie: str) -> Optional[str]:
    """An app's Set-Cookie made host-only: its Domain attribute removed, so the cookie stays on this
    session's host and never rides along to sibling sessions under the same domain (a cookie bomb,
    or cookies fixed on other users' apps). A cookie named like satellite's own is dropped (None)."""
    name, _, rest = set_cookie.partition(";")
    if name.split("=", 1)[0].strip().lower() in SATELLITE_COOKIES:
        return None
    attributes = [a for a in rest.split(";") if a.strip() and a.split("=", 1)[0].strip().lower() != "domain"]
    return ";".join([name] + attributes)


def app_answer_fields(headers: Headers, drop: Iterable) -> list:
    """The app's header fields as passed to the browser: `drop`ped names left out, cookies host-only."""
    fields = []
    for name, value in headers.fields:
        lower = name.lower()
        if lower in drop or lower == "clear-site-data":     # an app may not clear the whole domain's cookies
            continue
        if lower == "set-cookie":
            value = host_only_cookie(value)
            if value is None:
                continue
        fields.append((name, value))
    return fields


LIVE_CHECK_EVERY = 5.0          # seconds between a long relay's looks at its session (a revoke cuts it)


class SessionOver(ConnectionError):
    """The session of a relay in progress ended (revoked, released, expired, its job over)."""


def no_check() -> None:
    """A relay that answers to no session (a request body: the request was let in as it started)."""


class LiveCheck:
    """Called on every read of a long relay (a streamed answer, a WebSocket): asks `still_open()` (the
    cached session lookup) at most every `every` seconds however busy the relay is, and raises
    SessionOver once the session has ended. Between asks a call costs one monotonic clock reading."""

    def __init__(self, still_open: Callable[[], bool], every: float = LIVE_CHECK_EVERY):
        self.still_open = still_open
        self.every = every
        self.due = time.monotonic() + every

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self.due:
            self.due = now + self.every
            if not self.still_open():
                raise SessionOver("the session ended")

    def seconds_left(self) -> float:
        """Until the next ask: how long a relay may wait for data before calling again."""
        return max(0.0, self.due - time.monotonic())


def copy_exact(src: Stream, dst: socket.socket, count: int, check: Callable[[], None] = no_check) -> int:
    """Relay exactly count bytes, streaming through a bounded buffer; `check()` between each read and its
    write (so what arrives after a long silence is not passed on before the session is looked at)."""
    buffer = memoryview(bytearray(min(count, COPY_BUFFER)))
    total = count
    while count:
        got = src.read_into(buffer[:min(count, len(buffer))])
        if not got:
            raise ConnectionError("peer closed mid-body")
        check()
        dst.sendall(buffer[:got])
        count -= got
    return total


def copy_chunked(src: Stream, dst: socket.socket, error_status: int = 400, reframe: bool = True,
                 check: Callable[[], None] = no_check) -> int:
    """Relay a chunked body chunk by chunk (so event streams flow), re-validating framing; `check()` before
    each chunk's data is written. Without `reframe` only the data is passed on (to an HTTP/1.0 client: the
    close ends it)."""
    total = 0
    while True:
        try:
            size = parse_chunk_size(src.readline(1024))
        except HttpError as exc:
            raise HttpError(error_status, exc.reason) from None
        if size == 0:
            skip_trailers(src)
            if reframe:
                dst.sendall(b"0\r\n\r\n")
            return total
        total += size
        if size <= RECV_SIZE:                        # small chunk: one write with its framing
            data = src.read_exact(size + 2)
            if data[-2:] != b"\r\n":
                raise HttpError(error_status, "chunk not followed by CRLF")
            check()
            dst.sendall(b"%x\r\n" % size + data if reframe else data[:-2])
            continue
        if reframe:
            dst.sendall(b"%x\r\n" % size)
        copy_exact(src, dst, size, check)
        if src.read_exact(2) != b"\r\n":
            raise HttpError(error_status, "chunk not followed by CRLF")
        if reframe:
            dst.sendall(b"\r\n")


def copy_until_close(src: Stream, dst: socket.socket, chunked: bool, check: Callable[[], None] = no_check) -> int:
    """Relay a body delimited by the app closing its connection, as chunks to the client."""
    buffer = memoryview(bytearray(COPY_BUFFER))
    total = 0
    while True:
        got = src.read_into(buffer)
        if not got:
            if chunked:
                dst.sendall(b"0\r\n\r\n")
            return total
        check()
        total += got
        if chunked:
            dst.sendall(b"%x\r\n" % got + bytes(buffer[:got]) + b"\r\n")
        else:
            dst.sendall(buffer[:got])


def relay_websocket(client: socket.socket, upstream: socket.socket, still_open: Callable[[], bool],
                    check_every: float = LIVE_CHECK_EVERY, write_timeout: float = 120.0) -> tuple:
    """Shuttle raw bytes both ways after a 101 until either side closes.

    One thread, blocking sockets, `poll` for readiness; the client side is TLS, so
    decrypted bytes OpenSSL already holds (`pending()`) are drained before waiting.
    `still_open()` is asked every `check_every` seconds, busy or idle (LiveCheck), so a
    revoked or ended session is cut however much it carries. Returns bytes (in, out).
    """
    client.settimeout(write_timeout)
    upstream.settimeout(write_timeout)
    tls_sockets = [s for s in (client, upstream) if hasattr(s, "pending")]
    counts = {client: 0, upstream: 0}
    peers = {client: upstream, upstream: client}
    by_fd = {client.fileno(): client, upstream.fileno(): upstream}
    poller = select.poll()
    for sock in by_fd.values():
        poller.register(sock, select.POLLIN)
    check = LiveCheck(still_open, check_every)
    while True:
        try:
            check()
        except SessionOver:
            return counts[client], counts[upstream]
        ready = [s for s in tls_sockets if s.pending()]
        if not ready:
            ready = [by_fd[fd] for fd, _ in poller.poll(check.seconds_left() * 1000)]
        for sock in ready:
            try:
                data = sock.recv(RECV_SIZE)
            except ssl.SSLWantReadError:
                continue
            if not data:
                return counts[client], counts[upstream]
            peers[sock].sendall(data)
            counts[sock] += len(data)


def session_still_open(store: "Store", alias: str) -> Callable[[], bool]:
    """Is the alias's session still live (the cached lookup: a revoke elsewhere shows within 0.1 s)? A database
    that cannot be read cuts nothing (as the lookup serves the last known state when it can)."""
    def still_open() -> bool:
        try:
            current = store.cached_session(alias)
        except sqlite3.Error:
            return True
        return current is not None and not current.is_over(time.time())
    return still_open


class Forwarder:
    """Forwards the requests of one client connection to sessions' apps and turns each app's
    answer into an Answer whose body streams as it comes. Keeps one upstream connection for reuse."""

    def __init__(self, client: Stream, settings: Settings, store: Store, metrics: Metrics,
                 tunnel_for: Callable[[str], Optional[Connector]], upstream_key: Optional[Callable] = None):
        self.upstream_key = upstream_key          # () -> the key upstream proofs derive from
        self.client = client
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.tunnel_for = tunnel_for              # alias -> a connector through its tunnel, or None
        self.upstream: Optional[Upstream] = None

    def forward(self, ex: Exchange, session: Session, interim: Callable[[int], None]) -> Answer:
        """Send the request to the session's app; the app's answer (or why there is none)."""
        request = ex.request
        if request.framing == "chunked" and not request.headers.get("expect"):
            line = self.client.readline(1024)         # a malformed first chunk never reaches the app
            parse_chunk_size(line)
            self.client.buf[:0] = line
        head = forwarded_request_head(request, ex.peer, self.settings.trusted_user_header, ex.user)
        retryable = request.framing == "none" and request.method in IDEMPOTENT_METHODS
        for attempt in (1, 2):
            try:
                upstream = self.connect(session, retryable and attempt == 1)
            except TunnelDown:
                return status_page_answer(session, TUNNEL_DOWN_NOTE)
            except CertificateMismatch as exc:
                log.warning("%s: %s", logged_alias(session), exc)
                self.metrics.upstream_error()
                return page_answer(502, "The app behind this link presented the wrong certificate.")
            except OSError as exc:
                log.info("app of %s at %s not reachable: %s", logged_alias(session), session.target, exc)
                self.metrics.upstream_error()
                if session.state == "mapped":
                    return status_page_answer(session, "The app is not answering yet.")
                return page_answer(502, app_down_text(session))
            try:
                upstream.stream.sock.sendall(head)
                if request.framing != "none":
                    if request.expects_continue:
                        interim(100)
                    ex.received = self.relay_request_body(request, upstream)
                    ex.body_read = True
                response = read_response(upstream.stream, request.method)
                while 100 <= response.status < 200 and response.status != 101:
                    response = read_response(upstream.stream, request.method)   # drop interim answers
                break
            except HttpError as exc:
                self.drop_upstream()
                if exc.status == 400:                    # the client's body was malformed
                    raise
                return page_answer(502, exc.reason)
            except (ConnectionError, socket.timeout, OSError) as exc:
                retry = upstream.reused and attempt == 1 and retryable
                self.drop_upstream()
                if retry:
                    continue                             # the pooled connection had gone stale
                log.info("app of %s failed mid-request: %s", logged_alias(session), exc)
                self.metrics.upstream_error()
                return page_answer(502, "The app closed the connection.")
        if session.state == "mapped":
            self.store.mark_proxied(session)
        if response.status == 101:
            return self.websocket_answer(ex, session, response)
        return self.response_answer(request, response, session)

    def connect(self, session: Session, retryable: bool) -> Upstream:
        """The pooled upstream if it still fits, else a new one. A retryable request skips the
        staleness probe (a syscall per request): if the app had closed it, it is retried anyway."""
        through_tunnel = self.tunnel_for(session.alias) if session.tunneled else None
        if session.tunneled and through_tunnel is None:
            raise TunnelDown()
        key = (session.alias, session.target, session.tls_pin, through_tunnel)   # an upstream proves one session
        if self.upstream is not None:
            if self.upstream.key == key and (retryable or self.upstream.is_idle_and_open()):
                self.upstream.reused = True
                return self.upstream
            self.drop_upstream()
        connect = through_tunnel or direct_connector(session.target, self.settings.upstream_connect_timeout)
        preamble = b""
        if session.upstream_proof and not session.tunneled and self.upstream_key is not None:
            preamble = upstream_preamble(upstream_proof(self.upstream_key(), session.alias, session.key_hash))
        self.upstream = Upstream(session.target, connect, self.settings.upstream_timeout, session.tls_pin, preamble)
        self.upstream.key = key
        return self.upstream

    def drop_upstream(self) -> None:
        if self.upstream:
            self.upstream.close()
            self.upstream = None

    def relay_request_body(self, request: Request, upstream: Upstream) -> int:
        if request.framing == "length":
            return copy_exact(self.client, upstream.stream.sock, request.length)
        return copy_chunked(self.client, upstream.stream.sock)

    def response_answer(self, request: Request, response: Response, session: Session) -> Answer:
        """Status and headers (hop-by-hop dropped), and the body streamed in its own framing, cut (the client's
        connection closed) if the session ends meanwhile (LiveCheck: an endless event stream, a long download)."""
        fields = app_answer_fields(response.headers, HOP_BY_HOP | response.headers.tokens("connection")
                                   | {"content-length"})
        client_keep = request.keep_alive
        upstream_keep = "close" not in response.headers.tokens("connection") and response.framing != "close"
        to_http10 = request.version == "HTTP/1.0"
        if response.framing == "length":
            fields.append(("Content-Length", str(response.length)))
        elif response.framing in ("chunked", "close"):
            if to_http10:
                client_keep = False
            else:
                fields.append(("Transfer-Encoding", "chunked"))
        elif request.method == "HEAD" and response.headers.get("content-length"):
            fields.append(("Content-Length", response.headers.get("content-length")))
        source = self.upstream.stream
        if response.framing == "none" or (response.framing == "length" and len(source.buf) >= response.length):
            # no body, or a small one that came with the head: one write, one TLS record
            body = source.read_exact(response.length) if response.framing == "length" else b""
            if not upstream_keep:
                self.drop_upstream()
            return Answer(response.status, fields, body, reason=response.reason, close=not client_keep, framed=True)

        def relay(sink: socket.socket) -> tuple:
            sent = 0
            check = LiveCheck(session_still_open(self.store, session.alias))
            try:
                if response.framing == "length":
                    sent = copy_exact(source, sink, response.length, check)
                elif response.framing == "chunked":
                    sent = copy_chunked(source, sink, error_status=502, reframe=not to_http10, check=check)
                else:
                    sent = copy_until_close(source, sink, chunked=not to_http10, check=check)
            except HttpError as exc:                           # the app broke framing mid-body
                log.info("bad body from app: %s", exc.reason)
                self.drop_upstream()
                return sent, False
            except SessionOver:
                log.info("answer of %s cut: the session ended", logged_alias(session))
                self.drop_upstream()
                return sent, False
            except (ConnectionError, socket.timeout, OSError) as exc:
                log.info("relay interrupted: %s", exc)
                self.drop_upstream()
                return sent, False
            if not upstream_keep:
                self.drop_upstream()
            return sent, client_keep
        return Answer(response.status, fields, stream=relay, reason=response.reason, close=not client_keep,
                      framed=True)

    def websocket_answer(self, ex: Exchange, session: Session, response: Response) -> Answer:
        if not ex.request.wants_websocket:
            self.drop_upstream()
            return page_answer(502, "The app switched protocols unasked.")
        drop = (HOP_BY_HOP - {"upgrade"}) | response.headers.tokens("connection") - {"upgrade"}
        fields = app_answer_fields(response.headers, drop) + [("Connection", "Upgrade")]
        upstream, self.upstream = self.upstream, None
        client, still_open = self.client, session_still_open(self.store, session.alias)

        def relay(sink: socket.socket) -> tuple:
            sent = 0
            self.metrics.websocket_opened(+1)
            try:
                if client.buf:
                    upstream.stream.sock.sendall(client.take_buffered())
                if upstream.stream.buf:
                    sink.sendall(upstream.stream.take_buffered())
                ex.received, sent = relay_websocket(sink, upstream.stream.sock, still_open)
            except (ConnectionError, socket.timeout, OSError) as exc:
                log.debug("websocket of %s ended: %s", logged_alias(session), exc)
            finally:
                self.metrics.websocket_opened(-1)
                upstream.close()
            return sent, False
        return Answer(101, fields, stream=relay, reason=response.reason, close=True, framed=True)


###############################################################################
# 11. Tunnel: frames that carry a session through a connection the job opened
#     satellite-client's agent imports this section (the one copy of the protocol).
###############################################################################

# For nodes satellite cannot connect to: the job's agent connects out to satellite and asks,
# with `GET /api/tunnel`, `Upgrade: satellite-tunnel/1` and its session key, to carry the
# session's traffic. After the 101 answer both ends exchange frames on that TLS connection:
#
#     kind (1 byte) | stream (4 bytes) | payload length (4 bytes) | payload
#
#     OPEN       satellite -> agent   a browser connection starts; the agent connects it to its app
#     DATA       both ways            bytes of one stream, never more than the receiver's credit
#     CREDIT     both ways            4-byte count: the receiver has passed on that many bytes
#     EOF        both ways            the sender will send no more on this stream (half close)
#     RESET      both ways            the stream is gone; payload: a short reason
#     PING/PONG  both ways            keepalive; any frame is a sign of life
#
# Each stream starts with STREAM_WINDOW bytes of credit each way, so a browser tab that stops
# reading stops only its own stream, never the tunnel. What one end queues for the other is
# bounded: DATA by the credit, at most one PONG at a time, other frames by MAX_QUEUED_CONTROL;
# an end that takes nothing for TUNNEL_DEAD_AFTER while frames wait for it is closed. A tunnel
# carries at most MAX_STREAMS streams; credit beyond the window, an empty DATA, or anything after a
# stream's EOF breaks the protocol; a stream whose peer does not end its half within STREAM_LINGER
# of ours is reset, so no stream holds its threads for the tunnel's life. Only
# satellite opens streams, and an agent connects every stream to its own app and nowhere else:
# neither end can make the other open a connection of its choosing.

TUNNEL_PROTOCOL = "satellite-tunnel/1"
FRAME_HEAD = struct.Struct("!BII")
CREDIT_FIELD = struct.Struct("!I")
OPEN, DATA, CREDIT, EOF, RESET, PING, PONG = range(1, 8)
MAX_FRAME_PAYLOAD = 64 * 1024
STREAM_WINDOW = 1024 * 1024
TUNNEL_PING_AFTER = 10.0                # seconds of silence before a PING
TUNNEL_DEAD_AFTER = 30.0                # seconds without any frame: the peer is gone
TUNNEL_CHECK_EVERY = 5.0                # how often the owner is asked whether the tunnel is still wanted
TUNNEL_BATCH = 256 * 1024               # bytes of queued frames handed to TLS at once
MAX_STREAMS = 128                       # streams one tunnel carries at once (a browser opens a handful)
STREAM_LINGER = 30.0                    # seconds a stream waits for the peer to end its half after ours
MAX_QUEUED_CONTROL = 256 * 1024         # bytes of queued frames other than DATA: a peer that lets more
                                        # pile up (it sends but does not read) is closed


class TunnelError(Exception):
    """The peer broke the protocol; the tunnel closes."""


class TunnelStream:
    """One connection carried by a tunnel, bridged to a local socket by two threads: one reads
    the socket into DATA frames (within the peer's credit), the other writes the peer's DATA
    to the socket and then gives the credit back. The tunnel's thread only hands over bytes."""

    def __init__(self, tunnel: "Tunnel", stream_id: int):
        self.tunnel = tunnel
        self.id = stream_id
        self.sock: Optional[socket.socket] = None
        self.ready = threading.Condition()
        self.credit = STREAM_WINDOW              # bytes we may still send
        self.unwritten = 0                       # bytes received and not yet passed on
        self.inbox: collections.deque = collections.deque()     # bytearrays for the socket; None = EOF
        self.peer_ended = False                  # the peer sent EOF: nothing more may come
        self.aborted = False
        self.pumps_running = 2

    def start(self, connect: Callable) -> None:
        """Connect the local end (`connect()` returns a socket) and pump both ways, in new threads."""
        threading.Thread(target=self.connect_and_pump, args=(connect,), daemon=True).start()

    def connect_and_pump(self, connect: Callable) -> None:
        try:
            self.sock = connect()
        except OSError as exc:
            self.tunnel.send(RESET, self.id, str(exc).encode()[:200])
            self.tunnel.forget(self.id)
            return
        threading.Thread(target=self.pump_to_socket, daemon=True).start()
        self.pump_to_tunnel()

    # called from the tunnel's thread: never blocks --------------------------------
    def deliver(self, data: Optional[bytes]) -> None:
        """The peer's DATA (bytes) or EOF (None). Small frames are joined, so memory follows the
        bytes held, not the number of frames."""
        with self.ready:
            if self.peer_ended:
                raise TunnelError(f"stream {self.id} sent on after its EOF")
            if data is None:
                self.peer_ended = True
                self.inbox.append(None)
            else:
                if not data:
                    raise TunnelError(f"stream {self.id} sent an empty DATA frame")
                self.unwritten += len(data)
                if self.unwritten > STREAM_WINDOW:
                    raise TunnelError(f"stream {self.id} sent more than its credit")
                if self.inbox and self.inbox[-1] is not None and len(self.inbox[-1]) < MAX_FRAME_PAYLOAD:
                    self.inbox[-1] += data
                else:
                    self.inbox.append(bytearray(data))
            self.ready.notify_all()

    def grant(self, count: int) -> None:
        with self.ready:
            self.credit += count
            if self.credit > STREAM_WINDOW:
                raise TunnelError(f"stream {self.id} was given credit beyond its window")
            self.ready.notify_all()

    def abort(self) -> None:
        with self.ready:
            self.aborted = True
            self.ready.notify_all()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)     # wakes a pump blocked in recv
            except OSError:
                pass

    # the two pumps ---------------------------------------------------------------
    def pump_to_tunnel(self) -> None:
        try:
            while True:
                with self.ready:
                    while self.credit <= 0 and not self.aborted:
                        self.ready.wait()
                    if self.aborted:
                        return
                    room = min(self.credit, MAX_FRAME_PAYLOAD)
                data = self.sock.recv(room)
                if self.aborted:
                    return
                if not data:
                    self.tunnel.send(EOF, self.id)
                    self.linger()
                    return
                with self.ready:
                    self.credit -= len(data)
                self.tunnel.send(DATA, self.id, data)
        except OSError as exc:
            self.fail(exc)
        finally:
            self.pump_stopped()

    def pump_to_socket(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.inbox and not self.aborted:
                        self.ready.wait()
                    if self.aborted:
                        return
                    data = self.inbox.popleft()
                if data is None:
                    self.sock.shutdown(socket.SHUT_WR)
                    return
                self.sock.sendall(data)
                with self.ready:
                    self.unwritten -= len(data)
                self.tunnel.send(CREDIT, self.id, CREDIT_FIELD.pack(len(data)))
        except OSError as exc:
            self.fail(exc)
        finally:
            self.pump_stopped()

    def linger(self) -> None:
        """Our half has ended; wait (bounded) for the peer to end its half, else reset the stream."""
        deadline = time.monotonic() + STREAM_LINGER
        with self.ready:
            while self.pumps_running > 1 and not self.aborted and time.monotonic() < deadline:
                self.ready.wait(deadline - time.monotonic())
            finished = self.pumps_running <= 1 or self.aborted
        if not finished:
            self.tunnel.send(RESET, self.id, b"the other end did not finish its half")
            self.abort()

    def fail(self, exc: OSError) -> None:
        if not self.aborted:
            self.tunnel.send(RESET, self.id, str(exc).encode()[:200])
            self.abort()

    def pump_stopped(self) -> None:
        with self.ready:
            self.pumps_running -= 1
            last = self.pumps_running == 0
            self.ready.notify_all()
        if last:
            self.sock.close()
            self.tunnel.forget(self.id)


class Tunnel:
    """One TLS connection carrying many streams.

    Only the thread in `run` touches the TLS socket: OpenSSL must not read and write one
    connection from two threads at once. Other threads queue frames with `send`, which
    wakes that thread through a pipe; `stop` asks it to finish.
    """

    def __init__(self, sock: ssl.SSLSocket, connect_app: Optional[Callable] = None, early: bytes = b""):
        self.sock = sock
        self.connect_app = connect_app          # the agent's: a new socket to its app. satellite: None
        self.inbound = bytearray(early)
        self.outbox: collections.deque = collections.deque()     # (kind, frame) in sending order
        self.queued_control = 0                 # bytes of non-DATA frames in the outbox
        self.pong_queued = False
        self.lock = threading.Lock()
        self.streams: dict = {}
        self.next_id = 1
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)
        self.closed = False
        self.stop_reason = ""

    # any thread --------------------------------------------------------------------
    def send(self, kind: int, stream_id: int = 0, payload: bytes = b"") -> None:
        """Queue a frame. DATA is bounded by the peer's credit; a PONG is dropped while one waits;
        when other frames pile up beyond MAX_QUEUED_CONTROL the peer is not reading: stop."""
        frame = FRAME_HEAD.pack(kind, stream_id, len(payload)) + payload
        with self.lock:
            if self.closed or (kind == PONG and self.pong_queued):
                return
            if kind != DATA:
                if self.queued_control + len(frame) > MAX_QUEUED_CONTROL:
                    self.stop_reason = self.stop_reason or "the other end does not read what it is sent"
                    self.wake()
                    return
                self.queued_control += len(frame)
                self.pong_queued = self.pong_queued or kind == PONG
            was_empty = not self.outbox
            self.outbox.append((kind, frame))
            if was_empty:
                self.wake()

    def stop(self, reason: str) -> None:
        with self.lock:
            self.stop_reason = self.stop_reason or reason
            if not self.closed:
                self.wake()

    def wake(self) -> None:
        """Caller holds the lock (so the pipe cannot be closed meanwhile)."""
        try:
            os.write(self.wake_write, b"!")
        except BlockingIOError:                 # the pipe is full: the thread is awake anyway
            pass

    def open_stream(self) -> socket.socket:
        """Satellite: a new stream to the agent's app; returns this end of a socket pair."""
        ours, theirs = socket.socketpair()
        try:
            self.carry(theirs)
        except ConnectionError:
            ours.close()
            raise
        return ours

    def carry(self, sock: socket.socket) -> None:
        """Satellite: relay `sock` (a socket pair's end, or another worker's connection: TunnelRelay) as a new
        stream to the agent's app."""
        with self.lock:
            if self.closed or len(self.streams) >= MAX_STREAMS:
                sock.close()
                raise ConnectionError("the tunnel is closed" if self.closed
                                      else f"the tunnel carries {MAX_STREAMS} streams already")
            stream = TunnelStream(self, self.next_id)
            self.streams[stream.id] = stream
            self.next_id += 1
        self.send(OPEN, stream.id)
        stream.start(lambda: sock)

    def forget(self, stream_id: int) -> None:
        with self.lock:
            self.streams.pop(stream_id, None)

    # the tunnel's own thread --------------------------------------------------------
    def run(self, still_wanted: Callable = lambda: True) -> str:
        """Carry frames until the peer closes, breaks the protocol or falls silent, or
        `stop` is called, or `still_wanted()` (asked every few seconds) says no. Returns why."""
        sock = self.sock
        sock.setblocking(False)
        poller = select.poll()
        poller.register(self.wake_read, select.POLLIN)
        unsent = b""
        heard = pinged = checked = wrote = time.monotonic()
        try:
            self.dispatch()
            while True:
                wants_write = False
                while True:                      # write what is queued, as far as TLS takes it
                    if not unsent:
                        unsent = self.take_outbox()
                        if not unsent:
                            wrote = time.monotonic()     # nothing waits: the other end is not behind
                            break
                    try:
                        unsent = unsent[sock.send(unsent):]
                        wrote = time.monotonic()
                    except (ssl.SSLWantWriteError, BlockingIOError):
                        wants_write = True       # retried later with the same bytes, as OpenSSL needs
                        break
                    except ssl.SSLWantReadError:
                        break
                if not sock.pending():
                    poller.register(sock, select.POLLIN | (select.POLLOUT if wants_write else 0))
                    for fd, _ in poller.poll(1000):
                        if fd == self.wake_read:
                            self.drain_wake_pipe()
                got = self.read_available()
                now = time.monotonic()
                if got is None:
                    return "closed by the other end"
                if got:
                    heard = now
                if self.stop_reason:
                    return self.stop_reason
                if now - heard > TUNNEL_DEAD_AFTER:
                    return f"nothing heard for {TUNNEL_DEAD_AFTER:.0f}s"
                if wants_write and now - wrote > TUNNEL_DEAD_AFTER:
                    return f"the other end took nothing for {TUNNEL_DEAD_AFTER:.0f}s"
                if now - heard > TUNNEL_PING_AFTER and now - pinged > TUNNEL_PING_AFTER:
                    self.send(PING, 0, struct.pack("!d", now))
                    pinged = now
                if now - checked > TUNNEL_CHECK_EVERY:
                    checked = now
                    if not still_wanted():
                        return "no longer wanted"
        except TunnelError as exc:
            return f"protocol error: {exc}"
        except OSError as exc:                   # ssl.SSLError included
            return f"connection lost: {exc}"
        finally:
            self.close()

    def take_outbox(self) -> bytes:
        with self.lock:
            frames, size = [], 0
            while self.outbox and size < TUNNEL_BATCH:
                kind, frame = self.outbox.popleft()
                if kind != DATA:
                    self.queued_control -= len(frame)
                    self.pong_queued = self.pong_queued and kind != PONG
                frames.append(frame)
                size += len(frame)
        return b"".join(frames)

    def drain_wake_pipe(self) -> None:
        try:
            while os.read(self.wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def read_available(self) -> Optional[bool]:
        """Read what TLS has (bounded, so writes get their turn) and act on whole frames.
        True if anything came, False if nothing, None at end of stream."""
        got = False
        for _ in range(16):
            try:
                data = self.sock.recv(TUNNEL_BATCH)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            if not data:
                return None
            self.inbound += data
            got = True
        if got:
            self.dispatch()
        return got

    def dispatch(self) -> None:
        """Act on every whole frame in `inbound`."""
        buffer, offset = self.inbound, 0
        while len(buffer) - offset >= FRAME_HEAD.size:
            kind, stream_id, length = FRAME_HEAD.unpack_from(buffer, offset)
            if length > MAX_FRAME_PAYLOAD:
                raise TunnelError(f"a frame of {length} bytes")
            end = offset + FRAME_HEAD.size + length
            if len(buffer) < end:
                break
            self.on_frame(kind, stream_id, bytes(buffer[offset + FRAME_HEAD.size:end]))
            offset = end
        del buffer[:offset]

    def on_frame(self, kind: int, stream_id: int, payload: bytes) -> None:
        if kind == PING:
            self.send(PONG, 0, payload)
        elif kind == PONG:
            pass
        elif kind == OPEN:
            if self.connect_app is None:
                raise TunnelError("only satellite opens streams")
            with self.lock:
                if stream_id == 0 or stream_id in self.streams:
                    raise TunnelError(f"OPEN of stream {stream_id}, which is in use")
                if len(self.streams) >= MAX_STREAMS:
                    raise TunnelError(f"more than {MAX_STREAMS} streams at once")
                stream = self.streams[stream_id] = TunnelStream(self, stream_id)
            stream.start(self.connect_app)
        elif kind in (DATA, EOF, CREDIT, RESET):
            with self.lock:
                stream = self.streams.get(stream_id)
            if stream is None:                   # ended here while the peer was still sending
                return
            if kind == DATA:
                stream.deliver(payload)
            elif kind == EOF:
                stream.deliver(None)
            elif kind == CREDIT:
                if len(payload) != CREDIT_FIELD.size:
                    raise TunnelError("malformed CREDIT")
                stream.grant(CREDIT_FIELD.unpack(payload)[0])
            else:
                stream.abort()
        else:
            raise TunnelError(f"unknown frame kind {kind}")

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            streams = list(self.streams.values())
            self.streams.clear()
            self.outbox.clear()                  # nothing will send it: let go of the memory now
            self.inbound = bytearray()
            os.close(self.wake_read)
            os.close(self.wake_write)
        for stream in streams:
            stream.abort()
        try:
            self.sock.close()
        except OSError:
            pass


def private_directory_problem(path: str) -> Optional[str]:
    """Why `path` is not a directory only satellite's user may enter, or None: it must be a directory (lstat:
    not a symlink), owned by this process's effective user, mode 0700 exactly. A directory another local user
    made (or may write) could hold their sockets in place of ours (TunnelRelay)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory (a symlink or a file)"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to satellite's user (uid {os.geteuid()})"
    if stat.S_IMODE(st.st_mode) != 0o700:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    return None


def peer_is_us(sock: socket.socket) -> bool:
    """Is the process at the other end of a Unix socket running as our effective user (SO_PEERCRED)? Where
    the system cannot tell (not Linux), the relay directory's 0700 is the only guard."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return uid == os.geteuid()


def relay_name(alias: str) -> str:
    """The relay socket's name for an alias, the same in every worker: 128 bits of its hash (no two aliases
    share one), short enough for AF_UNIX's 107 bytes (RELAY_NAME_ROOM, with the temporary name's pid)."""
    return hashlib.sha256(alias.encode()).hexdigest()[:32] + ".sock"


RELAY_NAME_ROOM = len("/" + relay_name("") + ".4194304")       # what a relay's path needs beyond its directory
UNIX_PATH_MAX = 107


class TunnelRelay:
    """With several workers, a tunnel lives in the worker it attached to, while a browser's connection
    for its alias may land on any worker. The owner offers the tunnel to the others on a Unix socket
    named for the alias, in a directory only satellite's user may enter (relay_dir, 0700, checked:
    relay_directory); another worker's Forwarder connects to it like an upstream, and each connection
    becomes one new stream of the tunnel. Both ends also check that the other runs as satellite's user
    (SO_PEERCRED). The socket is bound under a temporary name and renamed into place, so a newer tunnel
    (in this worker or another) atomically takes the name over; each relay removes only its own."""

    def __init__(self, path: str, tunnel: Tunnel):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        temporary = f"{path}.{os.getpid()}"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            self.listener.bind(temporary)
            self.listener.listen(64)
            os.rename(temporary, path)
            self.inode = os.stat(path).st_ino
        except OSError:
            self.listener.close()
            raise
        threading.Thread(target=self.accept_streams, args=(tunnel,), daemon=True).start()

    def accept_streams(self, tunnel: Tunnel) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:                          # closed: the tunnel is gone
                return
            try:
                ours = peer_is_us(conn)
            except OSError:
                ours = False
            if not ours:
                log.warning("refused a connection to the relay %s from a process of another user", self.path)
                conn.close()
                continue
            with contextlib.suppress(ConnectionError):
                tunnel.carry(conn)                  # refused (closed, or full): carry closed it

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:      # not taken over by a newer tunnel
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)         # wakes the accepting thread
        self.listener.close()


def relay_connector(path: str) -> Connector:
    """A connection to another worker's tunnel (TunnelRelay); TunnelDown if none is there, or if the directory
    or the process answering is not satellite's user's alone (then it is not ours: never send it a request)."""
    def connect() -> socket.socket:
        problem = private_directory_problem(os.path.dirname(path))
        if problem:
            log.warning("not using the tunnel relay %s: %s", path, problem)
            raise TunnelDown()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            ours = peer_is_us(sock)
        except (FileNotFoundError, ConnectionRefusedError) as exc:     # a worker died with it: it reconnects
            sock.close()
            raise TunnelDown() from exc
        except OSError:
            sock.close()
            raise
        if not ours:
            sock.close()
            log.warning("not using the tunnel relay %s: a process of another user answers it", path)
            raise TunnelDown()
        return sock
    return connect


class Tunnels:
    """The tunnels jobs have opened to this worker, by alias; at most one per alias. With several
    workers (`relay_dir` set), each is offered to the others (TunnelRelay) and theirs are found here."""

    def __init__(self, relay_dir: str = "", on_count: Callable[[int], None] = lambda count: None):
        self.lock = threading.Lock()
        self.by_alias: dict = {}
        self.relays: dict = {}
        self.relay_dir = relay_dir
        self.on_count = on_count                 # the number of tunnels changed (the metric)
        self.remote: dict = {}                   # alias -> connector: one object, so pooled upstreams match

    def relay_path(self, alias: str) -> str:
        return os.path.join(self.relay_dir, relay_name(alias))

    def attach(self, alias: str, tunnel: Tunnel) -> None:
        relay = None
        if self.relay_dir:
            try:
                relay = TunnelRelay(self.relay_path(alias), tunnel)
            except OSError as exc:
                log.warning("the tunnel of %s serves only the connections of worker %d: %s", alias, os.getpid(), exc)
        with self.lock:
            old, self.by_alias[alias] = self.by_alias.get(alias), tunnel
            old_relay = self.relays.pop(alias, None)
            if relay is not None:
                self.relays[alias] = relay
            count = len(self.by_alias)
        if old_relay is not None:
            old_relay.close()
        if old is not None:
            old.stop("replaced by a newer connection from the job")
        self.on_count(count)

    def detach(self, alias: str, tunnel: Tunnel) -> bool:
        """True if `tunnel` was still the alias's tunnel (not replaced meanwhile)."""
        with self.lock:
            if self.by_alias.get(alias) is not tunnel:
                return False
            del self.by_alias[alias]
            relay = self.relays.pop(alias, None)
            count = len(self.by_alias)
        if relay is not None:
            relay.close()
        self.on_count(count)
        return True

    def get(self, alias: str) -> Optional[Tunnel]:
        with self.lock:
            return self.by_alias.get(alias)

    def connector(self, alias: str) -> Optional[Connector]:
        """A way to open a stream to the alias's app through its tunnel: here, or in another worker
        (its connector raises TunnelDown if that worker's tunnel is gone), or None."""
        tunnel = self.get(alias)
        if tunnel is not None:
            return tunnel.open_stream
        if not self.relay_dir:
            return None
        path = self.relay_path(alias)
        if not os.path.exists(path):
            return None
        with self.lock:
            if alias not in self.remote:
                if len(self.remote) >= 10_000:
                    self.remote.clear()
                self.remote[alias] = relay_connector(path)
            return self.remote[alias]

    def reachable(self, alias: str) -> bool:
        """Is the alias's tunnel attached, here or in another worker (whose relay then opens a stream to the
        app and closes it: a probe, as for an app reached directly)?"""
        if self.get(alias) is not None:
            return True
        connect = self.connector(alias)
        if connect is None:
            return False
        try:
            connect().close()
        except TunnelDown:
            return False
        return True


def tunnel_answer(session: Session, peer: str, tunnels: Tunnels, store: Store, early: bytes) -> Answer:
    """101, then the connection carries the session until it drops (the agent reconnects), the session
    ends, or a newer attach (perhaps in another worker) replaces it; `early`: bytes the agent sent after
    its request head."""
    alias, attach = session.alias, session.tunnel_attach

    def still_wanted() -> bool:
        current = store.cached_session(alias)
        return current is not None and not current.is_over(time.time()) and current.tunnel_attach == attach

    def carry(sock: socket.socket) -> tuple:
        tunnel = Tunnel(sock, early=early)
        tunnels.attach(alias, tunnel)
        log.info("tunnel of %s attached from %s", alias, peer)
        reason = tunnel.run(still_wanted=still_wanted)
        if tunnels.detach(alias, tunnel):
            try:
                store.set_backend_gone(alias, time.time(), attach)     # refresh ends it if it stays away
            except sqlite3.Error as exc:
                log.warning("could not record the tunnel of %s as gone: %s", alias, exc)
        log.info("tunnel of %s closed: %s", alias, reason)
        return 0, False
    return Answer(101, [("Connection", "Upgrade"), ("Upgrade", TUNNEL_PROTOCOL)], stream=carry, close=True,
                  framed=True)


###############################################################################
# 12. Server: accept, TLS, deadlines, the request pipeline, the one writer
###############################################################################

class TLSFilesError(ValueError):
    """The certificate or key cannot be loaded; the message names the setting, the file and what to do."""


def pem_kinds(path: str) -> set:
    """The kinds of PEM blocks in a file: {'CERTIFICATE', 'PRIVATE KEY', ...}; empty if none or unreadable."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except OSError:
        return set()
    return {kind.decode() for kind in re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----", text)}


def tls_files_problem(cert: str, key: str, error: Exception) -> str:
    """Why load_cert_chain failed, in the admin's terms (OpenSSL says '[SSL] PEM lib')."""
    for name, path in (("cert", cert), ("key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            return (f"{name}: cannot read {path}: {exc.strerror} (the user satellite runs as must read it: "
                    f"e.g. chgrp satellite {path} && chmod 0640 {path}, its directory 0750 root:satellite)")
    cert_kinds, key_kinds = pem_kinds(cert), pem_kinds(key)
    if "CERTIFICATE" not in cert_kinds:
        what = "a private key" if any(k.endswith("PRIVATE KEY") for k in cert_kinds) else "no PEM certificate"
        return (f"cert: {cert} holds {what}, not a certificate: give the certificate chain "
                f"(fullchain.pem with certbot)")
    if not any(k.endswith("PRIVATE KEY") for k in key_kinds):
        what = "a certificate" if "CERTIFICATE" in key_kinds else "no PEM private key"
        return f"key: {key} holds {what}, not a private key: give the certificate's key (privkey.pem with certbot)"
    if getattr(error, "reason", "") == "KEY_VALUES_MISMATCH" or "values mismatch" in str(error):
        return (f"cert/key: the key in {key} does not belong to the certificate in {cert}: give the key the "
                f"certificate was issued for (certbot keeps them together as privkey.pem and fullchain.pem)")
    return f"cert/key: cannot load {cert} with {key}: {error}"


def load_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server context; a pair that cannot be loaded raises TLSFilesError saying why."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSFilesError(tls_files_problem(cert, key, exc)) from None
    context.set_alpn_protocols(["http/1.1"])
    return context


TEXT = "text/plain; charset=utf-8"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_ENDPOINT = "no such endpoint {}; see /api/getlink, /api/redeem, /api/state, /api/release, /api/status, /healthz"


def front_secret_problem(path: str, st: os.stat_result, uid: int, gid: int) -> Optional[str]:
    """Why the front secret's file would let someone other than satellite's user (`uid`, group `gid`) and root
    hold or change it, or None. Whoever holds the secret speaks for clients from a trusted front's address
    (every local user can connect from loopback): links as if from a login node, redeems naming any node.
    Allowed: owned by satellite's user or root, mode 0600, or 0640 with satellite's own group."""
    mode = st.st_mode & 0o777
    if st.st_uid not in (uid, 0):
        return (f"{path} is owned by uid {st.st_uid}, not by root or the user satellite runs as (uid {uid}), "
                f"so that user could replace it")
    if mode & 0o027 or (mode & 0o040 and st.st_gid != gid):
        return (f"{path} can be read or changed by other users (mode {mode:04o}, group {st.st_gid}), and whoever "
                f"reads it speaks for clients as the front: make a new secret and write it with "
                f"openssl rand -hex 32 | install -m 0640 -o root -g <satellite's group> /dev/stdin {path} "
                f"(and give the front the new value)")
    return None


def read_front_secret(path: str) -> str:
    if not path:
        return ""
    try:
        with open(path) as f:
            problem = front_secret_problem(path, os.fstat(f.fileno()), os.geteuid(), os.getegid())
            secret = f.read(4096).strip()
    except OSError as exc:
        raise ValueError(f"front_secret: cannot read {path}: {exc}") from None
    if problem:
        raise ValueError(f"front_secret: {problem}")
    if len(secret) < 32 or not TOKEN_CHARS.match(secret):
        raise ValueError(f"front_secret: {path} must hold one line of 32 or more letters, digits or -._~ "
                         "(e.g. from: openssl rand -hex 32)")
    return secret


class Satellite:
    """The running service, shared by all connections: settings, store, limits, TLS, tunnels —
    and `respond`, the request pipeline: route -> decide -> act, returning an Answer."""

    def __init__(self, settings: Settings, slots: Optional[MetricSlots] = None, worker: int = 0,
                 relay_dir: str = "", limits: Optional[Limits] = None):
        """`slots`, `worker`: where this worker's counters go (Metrics); `relay_dir`: with several workers,
        where their tunnels meet (TunnelRelay); `limits`: the counts all workers share (made before the fork)."""
        self.settings = settings
        self.worker = worker
        self.limits = limits or Limits(settings)
        self.store = Store(settings.db, slots.store_writes if slots else None)
        self.cookie_key = CookieKey(settings.cookie_key_path)
        self.upstream_key = CookieKey(settings.upstream_key_path, "upstream-key")
        self.events = Events(self.store, settings.audit_log)
        self.metrics = Metrics(slots, worker)
        self.token_failures = self.limits.token_failures           # (address, alias)
        self.api = ManagementApi(settings, self.store, self.events, self.metrics, self.limits)
        self.api.upstream_key = self.upstream_key
        self.tls = load_tls_context(settings.cert, settings.key)
        self.cert_expiry = certificate_expiry(settings.cert)
        self.tunnels = Tunnels(relay_dir, self.metrics.tunnels_open)
        self.front_secret = read_front_secret(settings.front_secret)

    def reload_certificate(self) -> bool:
        """Swap in a freshly loaded context; connections already open keep theirs."""
        try:
            self.tls = load_tls_context(self.settings.cert, self.settings.key)
        except TLSFilesError as exc:
            log.error("certificate reload failed, keeping the old certificate: %s", exc)
            return False
        self.cert_expiry = certificate_expiry(self.settings.cert)
        log.info("certificate reloaded from %s", self.settings.cert)
        return True

    # the pipeline ------------------------------------------------------------------
    def respond(self, conn: "Connection", ex: Exchange) -> Answer:
        """One request whose head has been read: where it goes, whether the caller may, the answer."""
        ex.via = conn.peer
        front = speaks_for_clients(ex.request, conn.peer, self.settings, self.front_secret)
        if front and conn.slot is not None:
            conn.slot.uncap()                   # a front speaks for many: out of its address's cap from now on
        ex.peer = client_address(ex.request, conn.peer, front)
        ex.user = sso_user(ex.request, front, self.settings)
        ex.front = front
        where = route(ex.request, self.settings, conn.plane)
        if where.kind in ("endpoint", "unknown"):
            return self.serve_management(conn, ex, where)
        return self.serve_session(conn, ex, where)

    def serve_management(self, conn: "Connection", ex: Exchange, where: Route) -> Answer:
        request, peer = ex.request, ex.peer
        as_json = "application/json" in (request.headers.get("accept") or "")
        if where.kind == "unknown":
            return self.api.refused(ApiError(404, NO_ENDPOINT.format(where.path)), where.path, peer, ex.user, as_json)
        endpoint = ENDPOINTS[where.path]
        if endpoint.max_body:
            return self.api.answer(endpoint, where.path, request, peer, ex.user,
                                   lambda limit: conn.read_form_body(ex, limit))
        refusal = endpoint_refusal(endpoint, request, peer, self.settings)
        if refusal is not None:
            return self.api.refused(refusal, where.path, peer, ex.user, as_json or where.path == "/api/tunnel")
        if where.path == "/healthz":
            return Answer(200, [("Content-Type", TEXT)], b"ok\n")
        if where.path == "/metrics":
            text = self.metrics.render(self.store, self.cert_expiry)
            return Answer(200, [("Content-Type", METRICS_TYPE)], text.encode())
        try:
            session = self.api.attach_tunnel(request, peer)
        except ApiError as exc:
            log.info("tunnel from %s refused: %d %s", peer, exc.status, exc.reason)
            return self.api.refused(exc, where.path, peer, ex.user, True)
        return tunnel_answer(session, peer, self.tunnels, self.store, conn.stream.take_buffered())

    def serve_session(self, conn: "Connection", ex: Exchange, where: Route) -> Answer:
        request, alias = ex.request, where.alias
        session = self.store.cached_session(alias)
        if session is not None and session.legacy:
            ex.logged_host = f"{logged_alias(session)}.{self.settings.domain}"
        if where.kind == "front-auth" and address_in(ex.via, self.settings.admin_from) \
                and (ex.front or not self.front_secret):
            return self.answer_front(ex, session, alias)
        verdict = self.decide(request, ex, session, alias)
        if not verdict.allowed:
            return refused_answer(verdict, session, where.path, time.time())
        if where.kind != "app":
            answer = self.internal_page(ex, session, where.path)
        elif session.target is None:
            answer = status_page_answer(session)
        elif wants_ending_notice(request, session, time.time()):
            answer = ending_notice_answer(request, session, time.time())
        else:
            answer = conn.forwarder.forward(ex, session, conn.send_interim)
        if verdict.cookie:
            answer.fields.append(verdict.cookie)
        return answer

    def decide(self, request: Request, ex: Exchange, session: Optional[Session], alias: str) -> Verdict:
        """The access decision for a session's host, and what it asks to be done."""
        verdict = decide_session_access(request, session, ex.user, self.settings, self.cookie_key.current(),
                                        lambda: self.token_failures.take((address_group(ex.peer), alias)),
                                        time.time())
        self.carry_out(verdict, ex, session, alias)
        if verdict.bind_owner and self.store.bind_user(alias, ex.user) != ex.user:
            verdict = Verdict(403, "This session belongs to another user.", "This session belongs to another user.",
                              "not_owner")
            self.carry_out(verdict, ex, session, alias)
        return verdict

    def carry_out(self, verdict: Verdict, ex: Exchange, session: Optional[Session], alias: str) -> None:
        """What an access decision asks to be done: audit a refusal, end an expired session (best
        effort: refresh records it otherwise; the answer is 410 anyway)."""
        if verdict.why:
            self.api.deny(verdict.why, ex.peer, ex.user, verdict.label, alias)
        if verdict.end_expired:
            try:
                if self.store.end(alias, "expired"):
                    self.events.record("expire", alias, reason="lifetime over")
            except sqlite3.Error as exc:
                log.warning("could not end expired %s: %s", logged_alias(session), exc)

    def internal_page(self, ex: Exchange, session: Session, path: str) -> Answer:
        if path == STATUS_PATH:
            return status_answer(session, self.app_ready(session), time.time())
        if path == INTERNAL_PREFIX:
            return session_page_answer(session)
        return page_answer(404, "No such satellite page.")

    def app_ready(self, session: Session) -> bool:
        if session.tunneled:
            return self.tunnels.reachable(session.alias)
        return session.target is not None and probe(session.target, 0.5)

    def answer_front(self, ex: Exchange, session: Optional[Session], alias: str) -> Answer:
        """nginx's auth_request (see `export`): may the original request (X-Original-URI, with the
        same method, cookies, Authorization and Origin) reach the app? The same decision as for a
        request to satellite itself — token, owner, origin, failure limit — answered 204 (with the
        cookie to set on a first visit) or 403, the only refusal auth_request passes on."""
        verdict = self.decide(front_asked(ex.request), ex, session, alias)
        if not verdict.allowed:
            return Answer(403, [("Content-Type", "text/plain")])
        if session.state == "mapped":
            self.store.mark_proxied(session)
        cookie = [verdict.cookie] if verdict.credential == "query" else []
        return Answer(204, [("Content-Type", "text/plain"), *cookie])


TOO_MANY_COOKIES = ("Your browser sent more header data than satellite accepts, most likely too many or too large "
                    "cookies for this site. Clear the cookies of this site (in the browser's site settings, or a "
                    "private window), then open your link again: the link's token signs you in anew.")


def front_asked(auth_request: Request) -> Request:
    """The request a front asks about (auth_request): nginx sends a GET without Upgrade, so the original
    target, method and upgrade come in X-Original-URI, X-Original-Method and X-Original-Upgrade — the
    origin check must see a POST or a WebSocket as what it is."""
    headers = auth_request.headers
    target = headers.get("x-original-uri") or "/"
    method = headers.get("x-original-method") or auth_request.method
    if not target.startswith("/") or not TARGET_SAFE.match(target) or method not in KNOWN_METHODS:
        raise HttpError(400, "bad X-Original-URI or X-Original-Method")
    fields = [(n, v) for n, v in headers.fields if n.lower() not in ("upgrade", "connection")]
    if "websocket" in (headers.get("x-original-upgrade") or "").lower():
        fields += [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    return dataclasses.replace(auth_request, method=method, target=target, headers=Headers(fields))


def answer_for_error(exc: Exception) -> Answer:
    """The one mapping from a failure in the pipeline to what the client is told; the connection closes."""
    if isinstance(exc, HttpError) and exc.status == 431:
        answer = page_answer(431, TOO_MANY_COOKIES)
    elif isinstance(exc, HttpError):
        answer = page_answer(exc.status, exc.reason)
    else:
        log.error("database error: %s", exc)
        answer = page_answer(503, "Satellite cannot read its database right now; try again soon.",
                             [("Retry-After", "5")])
    answer.close = True
    return answer


class Connection:
    """One client's TLS connection: it reads heads and bodies within their deadlines, forwards
    through its own pooled upstream, and is the one place that writes answers."""

    def __init__(self, sock: ssl.SSLSocket, peer: str, service: Satellite, plane: str = "all",
                 slot: Optional[ConnectionSlot] = None):
        self.peer = peer
        self.plane = plane
        self.slot = slot
        self.stream = Stream(sock)
        self.settings = service.settings
        self.hsts = [("Strict-Transport-Security", f"max-age={service.settings.hsts}")] if service.settings.hsts else []
        self.forwarder = Forwarder(self.stream, service.settings, service.store, service.metrics,
                                   service.tunnels.connector, service.upstream_key.current)

    def read_form_body(self, ex: Exchange, limit: int) -> bytes:
        """An API form body (the endpoint already let the caller in), within `limit` and header-timeout."""
        if ex.request.expects_continue:
            self.send_interim(100)
        body = read_small_body(self.stream, ex.request, limit, time.monotonic() + self.settings.header_timeout)
        ex.body_read, ex.received = True, len(body)
        return body

    def send_interim(self, status: int) -> None:
        self.stream.sock.sendall(response_head(status, []))

    def send(self, ex: Exchange, answer: Answer) -> bool:
        """Write an answer: head and whole body in one write, or the head and then its stream.
        True if the connection may carry another request."""
        request = ex.request
        head_only = request is not None and request.method == "HEAD"
        close = (answer.close or request is None or not request.keep_alive
                 or (request.framing != "none" and not ex.body_read))     # an unread body ends the connection
        fields = list(answer.fields)
        names = {name.lower() for name, _ in fields}
        if not answer.framed:
            fields.append(("Content-Length", str(len(answer.body))))
        if "strict-transport-security" not in names:
            fields += self.hsts
        if close and "connection" not in names:
            fields.append(("Connection", "close"))
        body = b"" if head_only else answer.body
        ex.status = answer.status
        send_by(self.stream.sock, response_head(answer.status, fields, answer.reason) + body,
                time.monotonic() + self.settings.header_timeout)
        ex.sent = len(body)
        if answer.stream is not None and not head_only:
            self.stream.sock.settimeout(self.settings.upstream_timeout)       # a relay: silence per read/write
            ex.sent, keep = answer.stream(self.stream.sock)
            close = close or not keep
        return not close

    def close(self) -> None:
        self.forwarder.drop_upstream()
        try:
            self.stream.sock.close()
        except OSError:
            pass


def send_by(sock: socket.socket, data: bytes, deadline: float) -> None:
    """sendall, whole before `deadline`: a client that reads a byte now and then holds its
    connection no longer than one that reads nothing."""
    view = memoryview(data)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("the client did not read its answer in time")
        sock.settimeout(remaining)
        view = view[sock.send(view):]


def tls_handshake(raw: socket.socket, context: ssl.SSLContext, deadline: float, peer: str) -> Optional[ssl.SSLSocket]:
    """TLS in the connection's own thread, whole before `deadline`: a client that dribbles its
    handshake a byte at a time gets no longer than one that sends nothing. A plain-HTTP request
    gets a plain-text hint."""
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        raw.settimeout(max(0.001, deadline - time.monotonic()))
        first = raw.recv(1, socket.MSG_PEEK)
        if not first:
            return None
        if first != b"\x16":                        # not a TLS handshake record
            raw.sendall(plain_answer(400, b"This port speaks HTTPS; use https:// URLs\n"))
            return None
        sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        sock.setblocking(False)
        poller = select.poll()
        while True:
            try:
                sock.do_handshake()
                return sock
            except ssl.SSLWantReadError:
                poller.register(sock, select.POLLIN)
            except ssl.SSLWantWriteError:
                poller.register(sock, select.POLLOUT)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the TLS handshake took too long")
            poller.poll(remaining * 1000)
    except (OSError, ssl.SSLError) as exc:
        log.info("TLS handshake with %s failed: %s", peer, exc)
        return None


class SlotHandler(socketserver.BaseRequestHandler):
    """A handler of ThreadedServer: it is given the connection's slot (ConnectionSlot)."""

    server: "ThreadedServer"

    def __init__(self, request, client_address, server: "ThreadedServer", slot: ConnectionSlot):
        self.slot = slot
        super().__init__(request, client_address, server)


class ConnectionHandler(SlotHandler):
    """The connection loop: TLS, then requests until close. Each request's head must arrive
    whole by one deadline: header-timeout from accept for the first (handshake included),
    idle-timeout from the end of the previous one after that."""

    def handle(self) -> None:
        service = self.server.service
        settings = service.settings
        accepted = time.monotonic()
        peer = plain_address(self.client_address[0])
        sock = tls_handshake(self.request, service.tls, accepted + min(settings.handshake_timeout,
                                                                       settings.header_timeout), peer)
        if sock is None:
            return
        conn = Connection(sock, peer, service, self.server.plane, self.slot)
        deadline = accepted + settings.header_timeout
        try:
            while self.serve_one(service, conn, deadline):
                deadline = time.monotonic() + settings.idle_timeout
        except (ConnectionError, socket.timeout, ssl.SSLError, OSError) as exc:
            log.debug("connection from %s ended: %s", peer, exc)
        finally:
            conn.close()
            service.store.close_thread_connection()

    def serve_one(self, service: Satellite, conn: Connection, deadline: float) -> bool:
        """Read a request, have the pipeline answer it, send the answer; True to go on."""
        ex = Exchange(conn.peer, time.monotonic())
        try:
            try:
                ex.request = read_request(conn.stream, deadline)
                if ex.request is None:
                    return False
                conn.stream.sock.settimeout(service.settings.upstream_timeout)
                answer = service.respond(conn, ex)
            except (HttpError, sqlite3.Error) as exc:
                answer = answer_for_error(exc)
            return conn.send(ex, answer)
        finally:
            if ex.status:
                log_access(ex)
                service.metrics.request_done(ex.status, time.monotonic() - ex.started, ex.received, ex.sent)


def log_access(ex: Exchange) -> None:
    if not access_log.isEnabledFor(logging.INFO):          # access-log = off: no formatting per request
        return
    request = ex.request
    line = f"{request.method} {redact(request.target)} {request.version}" if request else "-"
    access_log.info('%s - - [%s] "%s" %d %d "%s" %.3f', ex.peer,
                    time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime()), line,
                    ex.status, ex.sent, ex.logged_host or (request.host_header if request else "-"),
                    time.monotonic() - ex.started)


def open_listener(address: tuple) -> socket.socket:
    """A listening socket, opened before any worker is forked (so binding port 443 needs the capability only
    here) and shared by all of them. Non-blocking: every worker waits on it, and those that lose the race for
    a connection must go back to waiting, not block in accept."""
    host, port = address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class ThreadedServer(socketserver.ThreadingTCPServer):
    """One thread per connection, within the connection limits (counted at accept), on a listening socket
    opened by open_listener."""
    daemon_threads = True
    block_on_close = False

    def __init__(self, service: Satellite, listener: socket.socket, handler=None, plane: str = "all"):
        self.service = service
        self.plane = plane
        self.address_family = listener.family
        self.counts = service.limits.connections
        self._warned = 0.0
        super().__init__(listener.getsockname()[:2], handler or ConnectionHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.server_address = listener.getsockname()

    def process_request(self, request, client_address):
        peer = plain_address(client_address[0])
        slot = ConnectionSlot(self.counts, address_group(peer), self.service.worker)
        refusal = self.counts.admit(slot.group, slot.worker)
        if refusal is not None:
            self.warn(f"{refusal}; refusing new connections from {peer}")
            self.shutdown_request(request)
            return
        try:
            threading.Thread(target=self.process_request_thread, args=(request, client_address, slot),
                             daemon=True).start()
        except Exception as exc:                        # no thread to be had (a process limit): no slot either
            slot.release()
            self.warn(f"cannot serve {peer}: {exc}")
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address, slot: ConnectionSlot):
        try:
            self.RequestHandlerClass(request, client_address, self, slot)
        except Exception:                                                 # noqa: BLE001 - logged
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slot.release()

    ACCEPT_DEFER = 0.005                # seconds a worker holding more than another waits before it accepts

    def holds_more_than_another(self) -> bool:
        loads = self.counts.loads()
        mine = self.counts.totals[self.service.worker]
        return any(load < mine for load, worker in loads if worker != self.service.worker)

    def get_request(self):
        """Accept the next connection. Every worker waits on the same listening socket (so the port stays
        served while one restarts), and the first awake would take it; a worker that holds more connections
        than another waits ACCEPT_DEFER first, so the one with fewest takes it if it is free to (connections
        spread by load, not by who wakes first), and takes it itself if the other is busy."""
        if self.counts.workers > 1 and self.holds_more_than_another():
            time.sleep(self.ACCEPT_DEFER)
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors: wait, do not spin on accept
                self.warn(f"cannot accept: {exc}")
                time.sleep(0.1)
            raise

    def warn(self, text: str) -> None:
        """One line per 10 s, not one per refused connection."""
        if time.monotonic() - self._warned > 10:
            self._warned = time.monotonic()
            log.warning("%s", text)

    def handle_error(self, request, client_address):
        log.exception("unexpected error serving %s", client_address[0])


class RedirectHandler(SlotHandler):
    """The optional plain-HTTP listener: every request, parsed as strictly as on HTTPS, gets a
    301 to the same host and path over HTTPS. Nothing else is served in the clear."""

    def handle(self) -> None:
        settings: Settings = self.server.service.settings
        stream = Stream(self.request)
        try:
            request = read_request(stream, time.monotonic() + settings.header_timeout)
            if request is None:
                return
            host = f"[{request.host}]" if ":" in request.host else request.host
            location = f"https://{host}{settings.port_suffix}{request.target}"
            answer = plain_answer(301, b"Use HTTPS.\n", [("Location", location)])
        except HttpError as exc:
            answer = plain_answer(exc.status, f"{exc.reason}\n".encode())
        except (OSError, ValueError):
            return
        try:
            self.request.sendall(answer)
        except OSError:
            pass


###############################################################################
# 13. Commands
###############################################################################

class AppendHandler(logging.StreamHandler):
    """A log file opened for appending (O_APPEND), each record one write(): the lines of several workers
    never mix, and logrotate's copytruncate needs nothing from satellite (the next line goes to the new end)."""

    def __init__(self, path: str):
        super().__init__(open(path, "ab", buffering=0))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write((self.format(record) + self.terminator).encode(errors="replace"))
        except Exception:
            self.handleError(record)


def setup_logging(settings: Settings) -> None:
    """The log (stderr; with several workers each line names its process) and the access log."""
    worker = " [pid %(process)d]" if settings.workers > 1 else ""
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s %(message)s{worker}", stream=sys.stderr)
    access_log.propagate = False
    if settings.access_log == "off":
        access_log.disabled = True
        return
    handler = (logging.StreamHandler(sys.stderr) if settings.access_log == "-"
               else AppendHandler(settings.access_log))
    handler.setFormatter(logging.Formatter("%(message)s" + (" pid=%(process)d" if settings.workers > 1 else "")))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)


def raise_descriptor_limit() -> None:
    """Each connection holds one or two descriptors: use all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)


def make_private(paths: Iterable[str]) -> None:
    """Take other users' access away from the files of ours that an older satellite made 0644 (the
    umask makes new ones 0600). The group's bits stay: 0640 for an admins' group is a choice."""
    for path in paths:
        try:
            st = os.stat(path)
            if st.st_uid == os.geteuid() and (st.st_mode & 0o170000) == 0o100000 and st.st_mode & 0o007:
                os.chmod(path, st.st_mode & 0o770)
                log.warning("%s was open to other users (mode %04o); now %04o", path, st.st_mode & 0o777,
                            st.st_mode & 0o770)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not make %s private: %s", path, exc)


def database_files_problem(db: str, uid: int) -> Optional[str]:
    """Why the database's files (db, -wal, -shm) are not satellite's alone, or None. In a directory others may
    write, another user could make satellite.db first, and satellite would serve from a file they can change
    (re-point a live session to a listener of theirs and receive the victim's next visit with its token)."""
    for path in (db, db + "-wal", db + "-shm"):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"cannot look at {path}: {exc.strerror}"
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a plain file (a symlink or other): remove it"
        if st.st_uid != uid:
            return (f"{path} is owned by uid {st.st_uid}, not by the user satellite runs as (uid {uid}), who could "
                    f"change every session in it: move it aside and let satellite make a new one "
                    f"(in a directory only satellite may write: install -d -m 0700)")
        if st.st_mode & 0o022:
            return (f"{path} may be changed by other users (mode {st.st_mode & 0o777:04o}): "
                    f"chmod 0600 {path}")
    return None


LISTENERS = (    # (what, the setting, handler, plane with a control listener, plane without)
    ("HTTPS", "listen", ConnectionHandler, "data", "all"),
    ("the control plane", "control_listen", ConnectionHandler, "control", "control"),
    ("redirects", "redirect_listen", RedirectHandler, "all", "all"),
)


def command_serve(settings: Settings) -> int:
    """Check everything a worker needs (so a mistake stops the start, named), open the listeners, then
    serve: in this process (workers = 1), or in N forked workers under a Supervisor."""
    settings.workers = settings.worker_count
    setup_logging(settings)
    raise_descriptor_limit()
    make_private([settings.db, settings.db + "-wal", settings.db + "-shm"]
                 + [path for path in (settings.access_log, settings.audit_log) if path not in ("", "-", "off")])
    problem = database_files_problem(settings.db, os.geteuid())
    if problem:
        log.error("db: %s", problem)
        return 1
    try:
        service = Satellite(settings)
        service.store.mark_tunnels_down(time.time())
        service.store.close_thread_connection()    # the main thread keeps none open (workers close theirs)
        for level, text in certificate_findings(settings, service.tls):
            if level != "OK":
                log.warning("%s (satellite check -c FILE checks this and more)", text)
    except (CookieKeyError, ValueError) as exc:     # TLSFilesError, the audit log, the front secret: named
        log.error("%s", exc)
        return 1
    except sqlite3.Error as exc:
        log.error("%s", database_problem(settings.db, exc))
        return 1
    listeners = []
    for what, name, handler, plane, plane_alone in LISTENERS:
        address = getattr(settings, name)
        if address is None:
            continue
        try:
            listeners.append((open_listener(address), handler, plane if settings.control_listen else plane_alone))
        except OSError as exc:
            log.error("cannot listen on %s for %s: %s", host_port(*address), what, exc)
            for sock, _, _ in listeners:
                sock.close()
            return 1
    settings.listen = listeners[0][0].getsockname()[:2]       # port 0 asks the OS for a free one
    for sock, handler, plane in listeners[1:]:
        kind = "redirecting http://{} to https" if handler is RedirectHandler else \
            "control plane (API, tunnels, metrics, front auth) on {}"
        log.info(kind.format(host_port(*sock.getsockname()[:2])))
    log.info("satellite %s serving https://*.%s on %s:%d (links use port %d)%s", __version__, settings.domain,
             *settings.listen, settings.link_port, f" with {settings.workers} workers" if settings.workers > 1 else "")
    if settings.workers == 1:
        code = serve_listeners(service, listeners)
    else:
        service.events.close()                      # each worker opens its own Satellite after fork
        code = Supervisor(settings, listeners).run()
    log.info("satellite stopped")
    return code


def serve_listeners(service: Satellite, listeners: list) -> int:
    """One process's serving: a thread per listener, a thread per connection, until SIGTERM or SIGINT.
    SIGHUP reloads the certificate."""
    servers = [ThreadedServer(service, sock, handler, plane) for sock, handler, plane in listeners]
    for each in servers[1:]:
        threading.Thread(target=each.serve_forever, daemon=True).start()
    signal.signal(signal.SIGHUP, lambda *_: service.reload_certificate())

    def stop(*_):
        for each in servers:
            threading.Thread(target=each.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, Supervisor.SIGNALS)     # a worker's were blocked from its fork
    try:
        servers[0].serve_forever(poll_interval=0.5)
    finally:
        for each in servers:
            each.server_close()
    return 0


def relay_directory(db: str) -> tuple:
    """Where workers' tunnels meet (TunnelRelay), cleared of an earlier run's sockets: beside the database
    (satellite.db -> satellite.tunnels); if that cannot be ours alone (private_directory_problem: e.g. another
    user made it first in a shared directory) or its path is too long for a socket's name, a directory named
    for the user and the database in $XDG_RUNTIME_DIR or the temporary directory (the same each start, so a
    supervisor killed with SIGKILL leaves at most that one behind, cleared at the next start); if even that is
    taken, a new random one. Returns (path, whether to remove it when serving stops)."""
    path = os.path.splitext(os.path.abspath(db))[0] + ".tunnels"
    problem = (private_directory(path) if len(path) <= UNIX_PATH_MAX - RELAY_NAME_ROOM
               else f"{path} is too long for a socket's name")
    if problem is None:
        clear_relays(path)
        return path, False
    name = f"satellite-tunnels-{os.geteuid()}-{hashlib.sha256(os.path.abspath(db).encode()).hexdigest()[:16]}"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    bases = ([runtime] if runtime and private_directory_problem(runtime) is None else []) + [tempfile.gettempdir(), "/tmp"]
    for base in dict.fromkeys(bases):
        fallback = os.path.join(base, name)
        if len(fallback) <= UNIX_PATH_MAX - RELAY_NAME_ROOM:
            taken = private_directory(fallback)
            if taken is None:
                log.warning("tunnel relays in %s, not beside the database: %s", fallback, problem)
                clear_relays(fallback)
                return fallback, True
            problem += f"; {taken}"
    fallback = tempfile.mkdtemp(prefix=f"satellite-tunnels-{os.geteuid()}-", dir="/tmp")
    log.warning("tunnel relays in %s, not beside the database: %s", fallback, problem)
    return fallback, True


def private_directory(path: str) -> Optional[str]:
    """Make `path` a directory only we may enter (0700), unless it exists; why it is not ours alone, or None."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)                   # ours, just made: whatever the umask left
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}"
    return private_directory_problem(path)


def clear_relays(path: str) -> None:
    """Remove the tunnel relays' sockets (no worker is running: they are stale)."""
    for name in os.listdir(path):
        if name.endswith(".sock") or ".sock." in name:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))


RESTART_DELAY = 0.5                     # seconds before a worker that died young starts again, at first
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 10.0                     # a worker that lived this long starts again at once


def restart_delays(lived: float, planned: Optional[float]) -> tuple:
    """(the pause before a dead worker starts again, the pause planned for its next death): none after a
    worker that ran STABLE_AFTER, else the planned pause, which doubles each time up to RESTART_DELAY_MAX."""
    delay = 0.0 if lived >= STABLE_AFTER else (RESTART_DELAY if planned is None else planned)
    return delay, min(max(delay * 2, RESTART_DELAY), RESTART_DELAY_MAX)


class Supervisor:
    """`serve` with several workers. This process opened the listeners (and so bound port 443 with the
    capability) and forks N workers that each run serve_listeners on them with a Satellite of their own
    (its own database connections, caches, locks and threads: nothing crosses the fork but the listening
    sockets, the log files and the shared counters). It serves nothing itself: it passes SIGHUP on to
    every worker (each reloads its certificate), stops them all on SIGTERM or SIGINT (SIGKILL after
    STOP_WAIT), and starts a worker again that died, after a pause that doubles while it keeps dying
    (restart_delays), so a crash loop does not spin."""

    STOP_WAIT = 10.0

    SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}

    def __init__(self, settings: Settings, listeners: list):
        self.settings = settings
        self.listeners = listeners
        self.slots = MetricSlots(settings.workers)
        self.limits = Limits(settings, settings.workers)       # counted once for all workers
        self.relay_dir, self.relay_temporary = relay_directory(settings.db)
        self.pids: dict = {}             # pid -> worker index
        self.started: dict = {}          # index -> when it last started (monotonic)
        self.delay: dict = {}            # index -> the pause before its next restart
        self.due: dict = {}              # index -> when it is to start again
        self.stopping = False
        self.parent = os.getpid()

    def run(self) -> int:
        signal.signal(signal.SIGHUP, lambda *_: self.signal_workers(signal.SIGHUP))
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        try:
            for index in range(self.settings.workers):
                self.spawn(index)
            while not self.stopping:
                self.reap()
                now = time.monotonic()
                for index, when in list(self.due.items()):
                    if when <= now and not self.stopping:
                        del self.due[index]
                        self.spawn(index)
                time.sleep(0.1)
            self.stop_workers()
        finally:
            for sock, _, _ in self.listeners:
                sock.close()
            if self.relay_temporary:
                shutil.rmtree(self.relay_dir, ignore_errors=True)
            else:
                clear_relays(self.relay_dir)
        return 0

    def stop(self, *_) -> None:
        self.stopping = True

    def signal_workers(self, signum: int) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def spawn(self, index: int) -> None:
        """Fork worker `index`. Signals wait (blocked) across the fork until the worker has its own handlers."""
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os._exit(self.worker(index))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        self.pids[pid] = index
        self.started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, pid)

    def worker(self, index: int) -> int:
        """In the child: serve until told to stop, or until the supervisor is gone."""
        code = 1
        try:
            for signum in self.SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            service = Satellite(self.settings, self.slots, index, self.relay_dir, self.limits)
            self.limits.connections.worker_started(index)
            threading.Thread(target=self.watch_parent, daemon=True).start()
            code = serve_listeners(service, self.listeners)      # sets its handlers, then unblocks below
        except (CookieKeyError, ValueError) as exc:
            log.error("worker %d cannot start: %s", index, exc)
        except sqlite3.Error as exc:
            log.error("worker %d cannot start: %s", index, database_problem(self.settings.db, exc))
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
        return code

    def watch_parent(self) -> None:
        """A worker whose supervisor died (kill -9) stops too, rather than serve on unsupervised."""
        while os.getppid() == self.parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    def reap(self) -> None:
        """Note workers that ended; schedule their restart."""
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            how = (f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exited with status {os.WEXITSTATUS(status)}")
            self.limits.connections.forget_worker(index)     # what it held is closed with it
            if self.stopping:
                continue
            self.mark_tunnels_down(pid)
            lived = time.monotonic() - self.started[index]
            delay, self.delay[index] = restart_delays(lived, self.delay.get(index))
            self.due[index] = time.monotonic() + delay
            log.warning("worker %d (pid %d) %s after %.1fs; starting it again in %.1fs", index, pid, how, lived, delay)

    def mark_tunnels_down(self, pid: int) -> None:
        """The tunnels the dead worker held are gone with it (its relays no longer answer): record it, so
        refresh ends their sessions after dead-after if their agents do not come back. The connection is
        closed at once: none is open across the next fork."""
        store = None
        try:
            store = Store(self.settings.db)
            gone = store.mark_tunnels_of_process_down(pid, time.time())
            if gone:
                log.warning("%d tunnel%s went with worker pid %d", gone, "s" if gone > 1 else "", pid)
        except sqlite3.Error as exc:
            log.warning("could not record the tunnels of worker pid %d as gone: %s", pid, exc)
        finally:
            if store is not None:
                store.close_thread_connection()

    def stop_workers(self) -> None:
        """SIGTERM to every worker, then SIGKILL to those still there after STOP_WAIT."""
        self.signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self.STOP_WAIT
        while self.pids and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        if self.pids:
            log.warning("workers %s did not stop in %.0fs: killing them", sorted(self.pids.values()), self.STOP_WAIT)
            self.signal_workers(signal.SIGKILL)
            for pid in list(self.pids):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self.pids.pop(pid, None)


def database_problem(db: str, error: Exception) -> str:
    """Why the database cannot be opened, with what to do (SQLite says only 'unable to open database file')."""
    directory = os.path.dirname(os.path.abspath(db))
    if not os.path.isdir(directory):
        return (f"db: the directory {directory} does not exist: create it for the user satellite runs as "
                f"(install -d -m 0700 -o satellite -g satellite {directory}; the systemd unit's "
                f"StateDirectory= makes /var/lib/satellite)")
    if not os.access(directory, os.W_OK | os.X_OK):
        return (f"db: cannot write in {directory} as uid {os.geteuid()}: it must belong to the user satellite runs "
                f"as (chown satellite:satellite {directory}; chmod 0700 {directory})")
    return f"db: cannot open {db}: {error}"


def admin_store(settings: Settings) -> Store:
    if not os.path.exists(settings.db):
        raise SystemExit(f"satellite: error: no database at {settings.db} (give -c FILE or --db FILE)")
    return Store(settings.db)


def command_refresh(settings: Settings, dry_run: bool) -> int:
    """One pass of housekeeping; prints a one-line summary. For cron, every minute."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    store = admin_store(settings)
    started = time.monotonic()
    try:
        summary = refresh(store, settings, Events(store, settings.audit_log), dry_run)
    except (sqlite3.Error, OSError, subprocess.SubprocessError, ValueError) as exc:     # ValueError: audit-log
        store.bump("refresh_failed")
        print(f"refresh failed: {exc}", file=sys.stderr)
        return 1
    print(("refresh (dry run, nothing changed): " if dry_run else "refresh: ")
          + f"expired {summary['expired_links']} unredeemed links and {summary['expired_sessions']} sessions; "
          f"probed {summary['probed']} apps, {summary['down']} not answering, {summary['dead']} ended as gone; "
          f"pruned {summary['pruned']}; {summary['jobstates']} job states, {summary['jobs_ended']} sessions ended with their job; {time.monotonic() - started:.2f}s")
    return 0


EXPORT_LINE = {
    # one route: host name -> the app (and, for the fronts that decide, the session cookie's check), in each
    # front end's map syntax. contrib/nginx-satellite.conf and contrib/haproxy-satellite.cfg read these.
    "nginx": '"{host}" "{target} {check}";',      # map $host $satellite_route { hostnames; include FILE; }
    "apache": "{host} http://{target}",           # RewriteMap satellite "txt:FILE"
    "haproxy": "{host} {address} {port} {check}",  # map_str(FILE): the values HAProxy's runtime API replaces
}
CHECKED_FORMATS = ("nginx", "haproxy")            # files that let a front accept cookies: 0640, never world-readable
NGINX_MAP_NAME_MAX = 110      # the longest host name contrib/nginx-satellite.conf's map_hash_bucket_size 128 holds


def export_domain_warning(fmt: str, domain: str) -> Optional[str]:
    """Why some sessions' host names would not fit the nginx front's map hash (the reload would fail and
    nginx keep its old map), or None. The longest alias is three of the longest words and two hyphens."""
    longest = 3 * max(map(len, WORDS)) + 2 + 1 + len(domain)
    if fmt != "nginx" or longest <= NGINX_MAP_NAME_MAX:
        return None
    return (f"host names under {domain} reach {longest} characters; contrib/nginx-satellite.conf's "
            f"map_hash_bucket_size 128 holds {NGINX_MAP_NAME_MAX}: raise it to 256 or nginx's reloads will fail")


def front_check(fmt: str, cookie: str) -> str:
    """What a front compares the presented cookie with: a one-way digest of the cookie, never the cookie or
    the token. nginx's secure_link compares base64url(MD5(value)); HAProxy compares hex SHA-256 (strcmp).
    Getting past the front with a leaked file needs a preimage: for nginx, of a 128-bit MD5 digest (the bar is
    the digest's 128 bits, not the cookie's 256; the best known attack costs ~2^123), for HAProxy of SHA-256.
    MD5's practical attacks are collisions, which need the attacker to choose both inputs. A leak of the file
    lets no one in; it tells who has a live session."""
    if fmt == "nginx":
        digest = hashlib.md5(cookie.encode(), usedforsecurity=False).digest()       # allowed in FIPS mode too
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
    return hashlib.sha256(cookie.encode()).hexdigest()


def front_decides(session: Session, now: float) -> bool:
    """May a front reach this session's app itself? Not when satellite must be in the path: the app speaks
    pinned TLS or its agent wants satellite's upstream proof (a front cannot send the proof preamble), it is
    reached through the job's tunnel, it is legacy (its alias is its redeem secret), or it is within
    ENDING_NOTICE of its end (satellite shows the ending notice)."""
    return not (session.is_over(now) or session.tls_pin or session.upstream_proof or session.tunneled
                or session.legacy or session.expires - now <= ENDING_NOTICE)


def export_map(store: Store, domain: str, fmt: str, cookie_key: Optional[bytes] = None) -> tuple:
    """The live alias -> target map and when it next changes by the clock alone: (text, epoch or None).
    nginx and HAProxy lines carry the session cookie's check (`front_check`) when `cookie_key` is given;
    without it ('-') the front decides nothing and passes every request to satellite."""
    lines = [f"# satellite export --format {fmt}: live sessions under {domain} (generated; do not edit)"]
    now = time.time()
    next_change = None
    for session in sorted(store.sessions(("mapped", "proxied")), key=lambda s: s.alias):
        if not front_decides(session, now):
            continue
        leaves = session.expires - ENDING_NOTICE
        next_change = leaves if next_change is None else min(next_change, leaves)
        check = front_check(fmt, cookie_value(cookie_key, session.alias, session.token_hash)) if cookie_key else "-"
        lines.append(EXPORT_LINE[fmt].format(host=f"{session.alias}.{domain}", check=check,
                                             target=host_port(session.target_host, session.target_port),
                                             address=session.target_host, port=session.target_port))
    return "\n".join(lines) + "\n", next_change


def export_cookie_key(settings: Settings, fmt: str) -> Optional[bytes]:
    """The cookie key, for the formats that carry checks; None with SSO (trusted-user-header): a front cannot
    check who is signed in, so every request of such a site goes to satellite."""
    if fmt not in CHECKED_FORMATS or settings.trusted_user_header:
        return None
    return read_cookie_key(settings.cookie_key_path)


def write_export(output: str, text: str, fmt: str, group: Optional[int]) -> bool:
    """Write `text` to `output` whole or not at all (a file beside it, renamed over it); False if it already
    held exactly that. Files with cookie checks are 0640 with `group` (the front's), never world-readable."""
    try:
        with open(output) as f:
            if f.read() == text and (group is None or os.fstat(f.fileno()).st_gid == group):
                return False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(output)), prefix=".satellite-export.")
    try:
        with os.fdopen(fd, "w") as f:
            if group is not None:
                os.fchown(f.fileno(), -1, group)
            # the map alone is no secret (Apache's RewriteMap reads it as another user); the checks are
            os.fchmod(f.fileno(), 0o640 if fmt in CHECKED_FORMATS else 0o644)
            f.write(text)
        os.replace(tmp, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return True


class HaproxyCLI:
    """One connection to HAProxy's runtime API (its stats socket) in interactive mode: each command is one
    short line, each answer ends at HAProxy's prompt. HAProxy caps one command (with any payload) at its
    buffer (tune.bufsize, 16 KiB by default) and cuts off or silently truncates a longer one, so a map is
    never sent as one payload: one `add map` line per entry, each a few hundred bytes at most."""

    PROMPT = b"\n> "

    def __init__(self, socket_path: str, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
            self.command("prompt")
        except BaseException:
            self.sock.close()
            raise

    def command(self, line: str, limit: int = 64 << 20) -> str:
        """Run one command; its answer without the prompt. OSError if HAProxy closes the connection first."""
        if "\n" in line or len(line) > 4096:
            raise ValueError(f"runtime API command too long or not one line: {line[:80]!r}")
        self.sock.sendall(line.encode() + b"\n")
        answer = bytearray()
        while not answer.endswith(self.PROMPT) and len(answer) < limit:
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise OSError(f"HAProxy closed the connection during {line.split(' @')[0][:40]!r}")
            answer += data
        return answer[:-len(self.PROMPT)].decode(errors="replace").strip()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"quit\n")
        self.sock.close()


def haproxy_entries(text: str) -> list:
    """The (key, value) pairs of an exported HAProxy map; ValueError on anything the runtime API could not
    carry as one argument each (the value's spaces are escaped, nothing else may need it)."""
    entries = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if not key or not value or "\\" in line or any(c.isspace() and c != " " for c in line):
            raise ValueError(f"map line HAProxy's runtime API cannot carry: {line[:80]!r}")
        entries.append((key, value))
    return entries


def push_haproxy_map(socket_path: str, map_path: str, text: str) -> None:
    """Replace the map HAProxy loaded from `map_path` with `text`'s entries, atomically: a new version of the
    map is filled entry by entry over one connection, then committed (HAProxy >= 2.4), then counted. Every
    answer is checked: `add map` and `commit map` answer nothing when they succeed, anything else (or a
    closed connection) is a failure. If the new version cannot be committed whole, HAProxy's map is
    cleared (`clear_haproxy_map`): the front then decides nothing and every request goes to satellite,
    which is always right, rather than the front deciding with a map that still holds ended sessions.
    Raises OSError (ValueError for a line it cannot carry) when HAProxy does not hold `text`'s map."""
    try:
        entries = haproxy_entries(text)
        cli = HaproxyCLI(socket_path)
        try:
            prepared = cli.command(f"prepare map {map_path}")
            version = re.fullmatch(r"New version created: (\d+)", prepared)
            if not version:
                raise OSError(f"prepare map: {prepared[:200]!r}")
            for key, value in entries:
                added = cli.command(f"add map @{version.group(1)} {map_path} {key} {value.replace(' ', chr(92) + ' ')}")
                if added:
                    raise OSError(f"add map {key}: {added[:200]!r}")
            committed = cli.command(f"commit map @{version.group(1)} {map_path}")
            if committed:
                raise OSError(f"commit map: {committed[:200]!r}")
            held = [line for line in cli.command(f"show map {map_path}").splitlines() if line.strip()]
            if len(held) != len(entries):
                raise OSError(f"HAProxy holds {len(held)} entries after the commit, not {len(entries)}")
        finally:
            cli.close()
    except (OSError, ValueError) as exc:
        clear_haproxy_map(socket_path, map_path, exc)
        raise


def clear_haproxy_map(socket_path: str, map_path: str, why: Exception) -> None:
    """Fail safe after a failed push: empty HAProxy's current map (one short command), so no ended or revoked
    session's cookie is let through while the push is retried. Logged loudly either way."""
    try:
        cli = HaproxyCLI(socket_path)
        try:
            cleared = cli.command(f"clear map {map_path}")
        finally:
            cli.close()
        if cleared:
            raise OSError(f"clear map: {cleared[:200]!r}")
        log.error("export: HAProxy's map update failed (%s): its map is now EMPTY, every request goes to satellite "
                  "until the update succeeds", why)
    except OSError as exc:
        log.critical("export: HAProxy's map update failed (%s) and clearing its map failed too (%s): HAProxy still "
                     "decides with its OLD map, which may let ended or revoked sessions' cookies through; "
                     "restart HAProxy if this persists", why, exc)


class FrontSync:
    """Brings the front up to date in a thread of its own: `wanted(text)` with each new map; the action
    (the reload command, or the push to HAProxy) runs with at most one in flight, on the newest map, and
    changes while it runs cost exactly one more. A failure is logged and tried again after a pause (2 s,
    doubling up to 60 s) or at the next change, whichever comes first; the watcher never stops for it."""

    def __init__(self, name: str, action: Callable[[str], None]):
        self.name = name
        self.action = action
        self._text = ""
        self._wanted = threading.Event()
        threading.Thread(target=self._run, name=f"front-sync-{name}", daemon=True).start()

    def wanted(self, text: str) -> None:
        self._text = text
        self._wanted.set()

    def _run(self) -> None:
        pause = 2.0
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                self.action(self._text)
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                log.error("export: %s failed (%s); trying again in %gs or at the next change", self.name, exc, pause)
                if not self._wanted.wait(pause):
                    self._wanted.set()
                pause = min(pause * 2, 60.0)
                continue
            pause = 2.0


def run_reload_command(command: str) -> None:
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise OSError(f"exit status {result.returncode}: {result.stderr.strip()[:300]}")


def watch_export(settings: Settings, fmt: str, output: str, group: Optional[int], reload_command: Optional[str],
                 haproxy_socket: Optional[str], poll: float = 0.1) -> int:
    """export --watch: keep `output` (and the running front) current. Looks every `poll` seconds whether
    the database, its WAL or the cookie key changed (a stat each, as Store.cached_session does) or a
    session's time ran out, and only then reads the sessions again; a new file goes to HAProxy through
    its runtime API, or triggers the (coalesced) reload command. Runs until stopped (SIGTERM)."""
    store = admin_store(settings)
    sync = None
    if haproxy_socket:
        map_path = os.path.abspath(output)
        sync = FrontSync("haproxy map update", lambda text: push_haproxy_map(haproxy_socket, map_path, text))
    elif reload_command:
        sync = FrontSync("reload command", lambda text: run_reload_command(reload_command))
    seen, due, first = None, 0.0, True
    log.info("export: watching %s for %s (every %gs)", settings.db, output, poll)
    while True:
        signature = (store._files_signature(), file_signature(settings.cookie_key_path))
        if signature != seen or time.time() >= due:
            seen = signature
            try:
                text, next_change = export_map(store, settings.domain, fmt, export_cookie_key(settings, fmt))
                changed = write_export(output, text, fmt, group)
            except (sqlite3.Error, OSError, CookieKeyError) as exc:
                log.error("export: %s; trying again", exc)
                text, seen, next_change, changed = "", None, None, False
            due = min(next_change or math.inf, time.time() + 60)       # and once a minute regardless
            if changed:
                log.info("export: %d routes written to %s", text.count("\n") - 1, output)
            if sync and (changed or (first and text)):        # and once at start: the front may be older
                first = False
                sync.wanted(text)
        store.close_thread_connection()
        time.sleep(poll)


def command_export(settings: Settings, fmt: str, output: Optional[str], reload_command: Optional[str],
                   group_name: Optional[str] = None, watch: bool = False, haproxy_socket: Optional[str] = None) -> int:
    """Write the map for a front end (atomically, only when it changed), then run the reload command
    (or, with --watch, keep doing so on every change)."""
    if not settings.domain:
        print("satellite: error: export needs the domain (-c FILE or --domain)", file=sys.stderr)
        return 2
    if (watch or haproxy_socket or group_name) and not output:
        print("satellite: error: --watch, --haproxy-socket and --group need --output FILE", file=sys.stderr)
        return 2
    group = None
    if group_name:
        import grp
        try:
            group = grp.getgrnam(group_name).gr_gid
        except KeyError:
            print(f"satellite: error: no group {group_name}", file=sys.stderr)
            return 2
    warning = export_domain_warning(fmt, settings.domain)
    if warning:
        print(f"satellite: warning: {warning}", file=sys.stderr)
    if watch:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        return watch_export(settings, fmt, output, group, reload_command, haproxy_socket)
    try:
        text, _ = export_map(admin_store(settings), settings.domain, fmt, export_cookie_key(settings, fmt))
    except CookieKeyError as exc:
        print(f"satellite: error: {exc} (export runs as the user satellite runs as)", file=sys.stderr)
        return 1
    routes = text.count("\n") - 1
    if output is None:
        print(text, end="")
        return 0
    if not write_export(output, text, fmt, group):
        print(f"export: {routes} routes, {output} unchanged")
        return 0
    message = f"export: {routes} routes written to {output}"
    try:
        if haproxy_socket:
            push_haproxy_map(haproxy_socket, os.path.abspath(output), text)
            message += "; HAProxy's map updated"
        elif reload_command:
            run_reload_command(reload_command)
            message += "; reloaded"
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"{message}; {'map update' if haproxy_socket else 'reload'} failed: {exc}", file=sys.stderr)
        return 1
    print(message)
    return 0


def command_list(settings: Settings, state: Optional[str], as_json: bool) -> int:
    store = admin_store(settings)
    sessions = store.sessions((state,) if state else SESSION_STATES)
    rows = [dict(s.describe(), issued_to=s.issued_to) for s in sessions]
    if as_json:
        print(json.dumps(rows))
        return 0
    print(f"{'ALIAS':<24} {'STATE':<8} {'TARGET':<22} {'JOB':<10} {'ISSUED TO':<16} EXPIRES")
    for row in rows:
        print(f"{row['alias']:<24} {row['state']:<8} {row.get('target', '-'):<22} {row.get('jobid', '-'):<10} "
              f"{row['issued_to']:<16} {row['expires']}")
    return 0


def command_show(settings: Settings, alias: str) -> int:
    session = admin_store(settings).session(alias)
    if session is None:
        print(f"satellite: no session {alias}", file=sys.stderr)
        return 1
    info = dict(session.describe(), issued_to=session.issued_to)
    if session.redeemed:
        info["redeemed"] = iso_time(session.redeemed)
    if session.backend_gone:
        info["app_not_answering_since"] = iso_time(session.backend_gone)
    if session.ended:
        info["ended"] = iso_time(session.ended)
    print("".join(f"{k}={v}\n" for k, v in info.items()), end="")
    return 0


def command_revoke(settings: Settings, alias: str) -> int:
    """End a session now. The running server answers 410 at once and cuts its WebSockets
    within seconds (they check while idle)."""
    store = admin_store(settings)
    if store.session(alias) is None:
        print(f"satellite: no session {alias}", file=sys.stderr)
        return 1
    try:
        events = Events(store, settings.audit_log)
    except ValueError as exc:                     # the audit log cannot be opened: say so before changing anything
        print(f"satellite: error: {exc}", file=sys.stderr)
        return 1
    if store.end(alias, "revoked"):
        events.record("revoke", alias, user=os.environ.get("SUDO_USER") or None)
        print(f"revoked {alias}")
    else:
        print(f"{alias} had already ended")
    return 0


def command_rotate_cookie_key(settings: Settings) -> int:
    """Replace the cookie key (see CookieKey): every browser opens its link again; nothing else changes."""
    path = settings.cookie_key_path
    try:
        owner = os.stat(path).st_uid
    except FileNotFoundError:
        print(f"satellite: error: no cookie key at {path} (give -c FILE, --db FILE or --cookie-key FILE; "
              f"serve makes the first one)", file=sys.stderr)
        return 1
    if owner != os.geteuid():
        print(f"satellite: error: {path} belongs to uid {owner}: run this as that user, the one satellite runs as "
              f"(e.g. sudo -u satellite satellite rotate-cookie-key -c /etc/satellite/satellite.ini)", file=sys.stderr)
        return 1
    try:
        write_cookie_key(path, replace=True)
    except CookieKeyError as exc:
        print(f"satellite: error: {exc}", file=sys.stderr)
        return 1
    print(f"new cookie key in {path}: running satellites use it within {CookieKey.CHECK_SECONDS:g}s, and every "
          f"browser then opens its link again (links, tokens and sessions are unchanged)")
    return 0


def command_stats(settings: Settings) -> int:
    store = admin_store(settings)
    counters = store.counters()
    print("sessions: " + ", ".join(f"{k} {v}" for k, v in store.count_by_state().items()))
    by_user = store.live_by_user()
    print("live by user: " + (", ".join(f"{k or '(none named)'} {v}" for k, v in by_user.items()) or "none"))
    print("events:   " + ", ".join(f"{e} {counters.get('events_' + e, 0)}" for e in LIFECYCLE_EVENTS))
    last = json.loads(store.meta("last_refresh") or "{}")
    when = iso_time(last["time"]) if last else "never"
    print(f"refresh:  {counters.get('refresh_ok', 0)} runs, {counters.get('refresh_failed', 0)} failed, last {when}")
    return 0


CHECK_NETWORKS = ("issue_from", "redeem_from", "metrics_from", "admin_from", "jobstates_from", "trusted_fronts")


def may_access(path: str, uid: int, gids: set, bits: int) -> bool:
    """Could user `uid` (groups `gids`) do `bits` (4 read, 2 write, 1 enter) to `path`, and reach it?"""
    if uid == 0:
        return True
    path = os.path.abspath(path)
    parents = [p for p in Path(path).parents]
    try:
        for each, want in [(str(p), 1) for p in parents] + [(path, bits)]:
            st = os.stat(each)
            have = (st.st_mode >> 6 if st.st_uid == uid else st.st_mode >> 3 if st.st_gid in gids else st.st_mode)
            if have & want != want:
                return False
    except OSError:
        return False
    return True


def handshake_in_memory(server: ssl.SSLContext, client: ssl.SSLContext, hostname: Optional[str]) -> ssl.SSLObject:
    """A TLS handshake in memory (no socket) between the server's context and a client; returns the
    client's end, or raises what the client or the server refused."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server_end = server.wrap_bio(bios[0], bios[1], server_side=True)
    client_end = client.wrap_bio(bios[2], bios[3], server_hostname=hostname)
    done = [False, False]
    for _ in range(50):
        for index, end in enumerate((client_end, server_end)):
            if not done[index]:
                try:
                    end.do_handshake()
                    done[index] = True
                except ssl.SSLWantReadError:
                    pass
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
        if all(done):
            return client_end
    raise ssl.SSLError("the handshake did not finish")


def certificate_names(server: ssl.SSLContext, chain: str, hostname: Optional[str]) -> dict:
    """The certificate as a client sees it, trusting the chain file itself (so any CA will do) and, given a
    hostname, checking the certificate names it: OpenSSL's own name check, the one browsers' libraries make."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = hostname is not None
    client.load_verify_locations(cafile=chain)
    client.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)   # the chain's leaf is enough
    return handshake_in_memory(server, client, hostname).getpeercert()


def certificate_findings(settings: Settings, context: ssl.SSLContext) -> list:
    """The certificate as browsers will judge it: (level, line) for its expiry and for whether it covers
    *.DOMAIN (tried as anything.DOMAIN) and DOMAIN. `check` reports them; `serve` logs any that is not OK."""
    results, seen = [], {}
    try:
        seen = certificate_names(context, settings.cert, None)
        left = ssl.cert_time_to_seconds(seen["notAfter"]) - time.time()
        level = "OK" if left > 14 * 86400 else "WARN"
        results.append((level, f"certificate valid until {seen['notAfter']} ({left / 86400:.0f} days)"
                        + ("" if level == "OK" else ": renew it soon (certbot renew, then systemctl reload "
                                                    "satellite)")))
    except ssl.SSLCertVerificationError as exc:
        results.append(("FAIL", f"certificate in {settings.cert}: {exc.verify_message}: get a new one"))
    names = ", ".join(value for kind, value in seen.get("subjectAltName", ()) if kind == "DNS")
    for shown, hostname in ((f"*.{settings.domain}", f"anything.{settings.domain}"),
                            (settings.domain, settings.domain)):
        try:
            certificate_names(context, settings.cert, hostname)
            results.append(("OK", f"certificate covers {shown}" + (f" (tried {hostname})" if shown != hostname
                                                                    else "")))
        except ssl.SSLCertVerificationError:
            results.append(("FAIL" if shown.startswith("*") else "WARN",
                            f"certificate covers {shown}: it names {names or 'no DNS name'} and does not name "
                            f"{hostname}: get a certificate for *.{settings.domain} and {settings.domain} (domain = "
                            f"{settings.domain} in the config)"))
        except ssl.SSLError as exc:
            results.append(("FAIL", f"certificate covers {shown}: the handshake failed: {exc}"))
    return results


def check_deployment(settings: Settings, user: str) -> list:
    """What `satellite check` finds: (level, line) for each check, level OK, WARN or FAIL."""
    import grp
    import pwd
    results = []

    def report(level, text):
        results.append((level, text))
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        report("FAIL", f"user {user} does not exist: create it (useradd --system ... satellite) or give --user")
        return results
    uid = account.pw_uid
    gids = set(os.getgrouplist(user, account.pw_gid))
    group = grp.getgrgid(account.pw_gid).gr_name
    as_user = f"as {user}" if uid != os.geteuid() else f"as {user} (this user; give --user satellite to check as "\
                                                         "the service's user)"
    report("OK", f"checking as user {user} (uid {uid})" if uid != os.geteuid() else f"checking {as_user}")

    # the certificate and its key
    for name, path in (("cert", settings.cert), ("key", settings.key)):
        if not os.path.isfile(path):
            report("FAIL", f"{name} file {path} does not exist: copy it into place (see README, Deployment)")
        elif not may_access(path, uid, gids, 4):
            report("FAIL", f"{name} file {path} cannot be read by {user}: chgrp {group} {path}; "
                           f"chmod 0640 {path} (and its directory 0750 root:{group})")
        elif name == "key" and os.stat(path).st_mode & 0o004:
            report("FAIL", f"key file {path}: other users may read it (mode {os.stat(path).st_mode & 0o777:04o}): "
                           f"chmod 0640 {path}; chown root:{group} {path}")
        elif name == "key" and os.stat(path).st_mode & 0o040 and os.stat(path).st_gid != account.pw_gid:
            key_group = os.stat(path).st_gid
            report("FAIL", f"key file {path}: group {grp_name(key_group)} may read it, not only {user}'s group: "
                           f"chown root:{group} {path}; chmod 0640 {path}")
        else:
            report("OK", f"{name} file {path} readable by {user}")
    try:
        context = load_tls_context(settings.cert, settings.key)
        report("OK", f"key matches the certificate ({settings.key}, {settings.cert})")
    except TLSFilesError as exc:
        report("FAIL", str(exc))
        context = None
    if context is not None:
        results.extend(certificate_findings(settings, context))

    # where it listens
    for name in ("listen", "control_listen", "redirect_listen"):
        address = getattr(settings, name)
        if address is None:
            continue
        shown = f"{name.replace('_', '-')} {host_port(*address)}"
        try:
            family, kind, proto, _, where = socket.getaddrinfo(address[0] or None, address[1], 0, socket.SOCK_STREAM,
                                                               0, socket.AI_PASSIVE)[0]
            with socket.socket(family, kind, proto) as probe_socket:
                probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe_socket.bind(where)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                report("FAIL", f"{shown}: the address is in use: stop what listens there (ss -ltnp "
                               f"'sport = :{address[1]}'), or is satellite already running?")
            elif exc.errno == errno.EACCES:
                report("FAIL", f"{shown}: permission denied: ports below 1024 need CAP_NET_BIND_SERVICE "
                               f"(contrib/satellite.service gives it: AmbientCapabilities=CAP_NET_BIND_SERVICE)")
            else:
                report("FAIL", f"{shown}: cannot bind: {exc.strerror or exc}: is it an address of this host?")
            continue
        if 0 < address[1] < 1024 and uid != 0:
            report("WARN", f"{shown}: can be bound, but port {address[1]} is below 1024: {user} needs "
                           f"CAP_NET_BIND_SERVICE (contrib/satellite.service gives it with "
                           f"AmbientCapabilities=; without systemd, start it with that capability)")
        else:
            report("OK", f"{shown} can be bound")

    workers = settings.worker_count
    shared = "; rate limits and connection caps are counted once for all of them" if workers > 1 else ""
    report("OK", f"workers: {workers} serving process{'es' if workers > 1 else ''}"
                 f"{' (one per core)' if not settings.workers else ''}{shared}")

    # files and directories
    state = os.path.dirname(os.path.abspath(settings.db))
    if not os.path.isdir(state):
        report("FAIL", f"db directory {state} does not exist: install -d -m 0700 -o {user} -g "
                       f"{group} {state}")
    elif not may_access(state, uid, gids, 3):
        report("FAIL", f"db directory {state}: {user} cannot write in it: chown {user} {state}; chmod 0700 {state}")
    elif os.stat(state).st_mode & 0o007:
        report("WARN", f"db directory {state}: other users may enter it (mode {os.stat(state).st_mode & 0o777:04o}): "
                       f"chmod 0700 {state}")
    else:
        report("OK", f"db directory {state} writable by {user}, closed to others")
    problem = database_files_problem(settings.db, uid)
    if problem:
        report("FAIL", f"db: {problem}")
    key_path = settings.cookie_key_path
    if os.path.exists(key_path):
        st = os.stat(key_path)
        if st.st_uid != uid or st.st_mode & 0o077:
            report("FAIL", f"cookie-key {key_path} (owner uid {st.st_uid}, mode {st.st_mode & 0o777:04o}) would be "
                           f"refused: it must be {user}'s, mode 0600; remove it and satellite makes a new one")
    if settings.front_secret:
        try:
            problem = front_secret_problem(settings.front_secret, os.stat(settings.front_secret), uid, account.pw_gid)
        except OSError as exc:
            problem = f"cannot read {settings.front_secret}: {exc.strerror}"
        if problem:
            report("FAIL", f"front-secret: {problem}")
        else:
            report("OK", f"front-secret {settings.front_secret} closed to other users")
    for name in ("audit_log", "access_log"):
        path = getattr(settings, name)
        if path in ("", "-", "off"):
            continue
        shown, directory = name.replace("_", "-"), os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            report("FAIL", f"{shown} directory {directory} does not exist: install -d -m 0750 -o {user} -g "
                           f"{group} {directory}")
        elif not (may_access(path, uid, gids, 2) if os.path.exists(path) else may_access(directory, uid, gids, 3)):
            report("FAIL", f"{shown} {path}: {user} cannot write it: chown {user} {directory}")
        else:
            report("OK", f"{shown} {path} writable by {user}")

    # networks
    for name in CHECK_NETWORKS:
        shown = name.replace("_", "-")
        written = [part for part in str(getattr(settings, "given", {}).get(name, "")).replace(" ", "").split(",")
                   if part]
        for part in written:
            with contextlib.suppress(ValueError):
                if not _strict_network(part):
                    network = ipaddress.ip_network(part, strict=False)
                    report("WARN", f"{shown} {part} has host bits set: it means {network} (all "
                                   f"{network.num_addresses} addresses); write {part.split('/')[0]}/"
                                   f"{network.max_prefixlen} for that one host")
        networks = getattr(settings, name)
        if name in ("issue_from", "redeem_from"):
            if not networks:
                report("FAIL", f"{shown} is empty: no one could {'ask for' if name == 'issue_from' else 'redeem'} "
                               f"links")
            elif all(net.is_loopback for net in networks):
                report("WARN", f"{shown} {setting_text(name, networks)} is this host only: give your "
                               f"{'login' if name == 'issue_from' else 'compute'} nodes' networks")
            elif any(net.prefixlen == 0 for net in networks):
                report("WARN", f"{shown} {setting_text(name, networks)} is every address: anyone could "
                               f"{'ask for' if name == 'issue_from' else 'redeem'} links")
            else:
                report("OK", f"{shown} {setting_text(name, networks)}")
        elif any(net.prefixlen == 0 for net in networks):
            report("FAIL", f"{shown} {setting_text(name, networks)} is every address: {NETWORK_POWERS[name]}; "
                           f"name the hosts that need it")
        elif name == "jobstates_from" and any(net.is_loopback for net in networks):
            report("WARN", f"{shown} {setting_text(name, networks)} takes this host: any local user here may then "
                           f"feed job states, which end sessions; prefer jobstate-command (refresh runs it)")
        elif networks:
            report("OK", f"{shown} {setting_text(name, networks)}")
    return results


NETWORK_POWERS = {"metrics_from": "anyone could read the metrics",
                  "admin_from": "anyone could ask satellite to decide a front's requests",
                  "jobstates_from": "anyone could feed job states and so end every session",
                  "trusted_fronts": "anyone could name the client address and the signed-in user"}


def grp_name(gid: int) -> str:
    import grp
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _strict_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=True)
        return True
    except ValueError:
        return False


def command_check(config: Optional[str], overrides: dict, user: str) -> int:
    """`satellite check`: one line per check; exit 1 if any FAILs."""
    try:
        settings = Settings.from_sources(config, overrides)
    except ValueError as exc:
        return print_checks([("FAIL", f"config {config or '(flags)'}: {exc}")])
    return print_checks([("OK", f"config {config or '(flags)'} parses (domain {settings.domain})")]
                        + check_deployment(settings, user))


def wrapped_help(text: str) -> str:
    """A command's description, its paragraphs wrapped for a terminal (the formatter keeps the example's lines)."""
    return "\n\n".join(textwrap.fill(paragraph, 100) for paragraph in text.split("\n\n"))


def print_checks(results: list) -> int:
    """One line per check, 'OK  ', 'WARN' or 'FAIL' first; the exit status: 1 if any FAILed.
    (satellite-client check prints its findings with this too.)"""
    for level, text in results:
        print(f"{level:<4} {text}")
    return 1 if any(level == "FAIL" for level, _ in results) else 0


SETTING_FLAGS = [
    # flag, dest, help (the default is added from Settings: one copy of each default)
    ("--domain", "domain", "DNS domain whose wildcard *.DOMAIN points at this host"),
    ("--listen", "listen", "HOST:PORT to listen on ([::]:443 in production)"),
    ("--cert", "cert", "certificate chain (PEM) valid for *.DOMAIN; reloaded on SIGHUP"),
    ("--key", "key", "private key (PEM) of the certificate"),
    ("--db", "db", "SQLite database file"),
    ("--cookie-key", "cookie_key", "file with the key that signs browser cookies: made 0600 at the first start, "
                                   "refused if other users may read it, replaced by rotate-cookie-key"),
    ("--issue-from", "issue_from", "CIDR[,CIDR] allowed to call /api/getlink: your login nodes"),
    ("--redeem-from", "redeem_from", "CIDR[,CIDR] allowed to call /api/redeem: your compute nodes"),
    ("--port-range", "port_range", "ports a job may redeem"),
    ("--redeem-within", "redeem_within", "how long a link waits for its job to redeem it"),
    ("--session-lifetime", "session_lifetime", "session length after redeem when getlink names none"),
    ("--max-session-lifetime", "max_session_lifetime", "longest lifetime getlink may ask for"),
    ("--public-port", "public_port", "port shown in links, if a front maps 443 elsewhere (0: the listen port)"),
    ("--access-log", "access_log", "access log file, '-' for stderr or 'off'; secrets are redacted"),
    ("--log-level", "log_level", "debug, info, warning or error"),
    ("--max-connections", "max_connections", "open connections at most, on every listener and worker together "
                                             "(0 = no cap)"),
    ("--max-connections-per-address", "max_connections_per_address",
     "open connections from one address (an IPv6 /64) at most, all listeners and workers together, so one "
     "cannot take every slot (0 = no cap; a trusted front's connection is capped until it shows the "
     "front secret, then counts only in max-connections)"),
    ("--handshake-timeout", "handshake_timeout", "seconds a client has to finish the TLS handshake, in all"),
    ("--header-timeout", "header_timeout", "seconds from accept to a whole first request head, handshake included"),
    ("--idle-timeout", "idle_timeout", "seconds a keep-alive connection has for its next whole request head"),
    ("--audit-log", "audit_log", "JSON-lines audit log of every issue/redeem/state/release/revoke/expire/denial "
                                 "('-' for stderr, '' for off)"),
    ("--metrics-from", "metrics_from", "CIDR[,CIDR] that may read /metrics"),
    ("--admin-from", "admin_from", "CIDR[,CIDR] of fronts whose auth_request satellite answers"),
    ("--jobstates-from", "jobstates_from", "CIDR[,CIDR] that may feed scheduler states to /api/jobstates and "
                                           "update-jobs.cgi (they end sessions: name your controller; none by default)"),
    ("--getlink-rate", "getlink_rate", "getlink calls per user (per address if none is named), COUNT/DURATION "
                                       "(0 = no limit)"),
    ("--max-live-per-source", "max_live_per_source", "live sessions per issuing address, its ceiling (0 = no limit)"),
    ("--max-live-per-user", "max_live_per_user", "live sessions per user named at getlink (0 = no limit)"),
    ("--user-proof", "user_proof", "how getlink knows who asks: 'claim' (user=, a label, not checked) or 'munge' "
                                   "(munge=CREDENTIAL, checked with unmunge; the proxy node shares the cluster's "
                                   "MUNGE key); an SSO front's user is always believed"),
    ("--token-failures", "token_failures", "wrong tokens per address and session before 429, COUNT/DURATION"),
    ("--dead-after", "dead_after", "refresh ends a session whose app has not answered for this long"),
    ("--retention", "retention", "refresh deletes ended sessions after this long"),
    ("--jobstate-command", "jobstate_command", "refresh runs this for 'JOBID STATE [REASON]' lines, a full snapshot "
                                               "of the scheduler's jobs, e.g. squeue -h -t all -o '%%i %%T %%r'"),
    ("--job-gone-after", "job_gone_after", "a job a full snapshot has not listed for this long after a feed listed "
                                           "it has ended (finished jobs age out of squeue)"),
    ("--hsts", "hsts", "Strict-Transport-Security max-age (0 = off)"),
    ("--redirect-listen", "redirect_listen", "HOST:PORT of a plain-HTTP listener that redirects to HTTPS"),
    ("--control-listen", "control_listen", "HOST:PORT of a separate listener for the API, tunnels, /metrics and "
                                           "a front's auth requests; --listen then serves sessions only (use it "
                                           "with a front such as contrib/nginx-satellite.conf, which forwards "
                                           "only sessions)"),
    ("--trusted-user-header", "trusted_user_header", "header naming the signed-in user, set by an SSO front "
                                                     "(e.g. X-Remote-User); a session then belongs to its first user"),
    ("--front-secret", "front_secret", "FILE holding a secret (32+ characters) a front sends as X-Satellite-Front; "
                                       "only requests carrying it speak for clients (needed when a front is on "
                                       "this host: local users share its loopback address)"),
    ("--trusted-fronts", "trusted_fronts", "CIDR[,CIDR] of fronts (nginx, an SSO proxy): their requests count as the "
                                           "client they name last in X-Forwarded-For; the user header from anyone "
                                           "else is dropped"),
    ("--workers", "workers", "serving processes, all accepting on the same listening sockets, so every core "
                             "works (0 = one per core; 1 = a single process, no supervisor). Rate limits and "
                             "connection caps are counted once for all of them, so any N admits exactly what "
                             "they say"),
    ("--legacy-api", "legacy_api", "also serve SDSC Satellite's getlink.cgi, redeemtoken.cgi, ... for old clients "
                                   "(weaker: the alias alone redeems; no proxy token check)"),
]


def compact_duration(seconds: int) -> str:
    """43200 -> '12h': the largest unit that divides it (as parse_duration reads it back)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def setting_text(name: str, value) -> str:
    """A setting's value as it is written in the INI file or on the command line."""
    parser = Settings.PARSERS.get(name)
    if parser is parse_duration:
        return compact_duration(value)
    if parser is parse_networks:
        return ",".join(str(net) for net in value) or "none"
    if parser in (parse_listen, parse_optional_listen):
        return host_port(*value) if value else "off"
    if parser is parse_rate:
        return "0" if not value[0] else f"{value[0]}/{compact_duration(value[1])}"
    if parser is parse_port_range:
        return f"{value[0]}-{value[1]}"
    if parser is parse_bool:
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if value != "" else "none"


def flag_help(dest: str, text: str) -> str:
    default = getattr(Settings, dest)
    if dest in ("domain", "cert", "key"):
        return f"{text} (required)"
    if dest == "cookie_key":
        return f"{text} (default: beside the database, its name with .cookie-key)"
    return f"{text} (default: {setting_text(dest, default)})".replace("%", "%%").replace("%%%%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="satellite",
        description="HTTPS reverse proxy that gives batch jobs a secure link (https://<three-words>.DOMAIN/).",
        epilog="Example:\n  satellite serve --domain sat.example.edu --listen [::]:443 \\\n"
               "      --cert /etc/satellite/fullchain.pem --key /etc/satellite/privkey.pem \\\n"
               "      --issue-from 10.1.0.0/24 --redeem-from 10.2.0.0/16 --db /var/lib/satellite/satellite.db\n\n"
               "Then, from a login node:  curl https://manage.sat.example.edu/api/getlink",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"satellite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the proxy and its API",
        description="Run the HTTPS proxy. Settings come from -c FILE ([satellite] section, same names as the "
                    "flags, e.g. issue-from = 10.1.0.0/24) and flags, flags winning. SIGHUP reloads the "
                    "certificate; SIGTERM stops.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("-c", "--config", metavar="FILE", help="INI file with a [satellite] section")
    for flag, dest, help_text in SETTING_FLAGS:
        if isinstance(getattr(Settings, dest, None), bool):
            serve.add_argument(flag, dest=dest, action="store_const", const="yes", help=flag_help(dest, help_text))
        else:
            metavar = "FILE" if dest == "cookie_key" else dest.split("_")[-1].upper()    # a file's name, never the key
            serve.add_argument(flag, dest=dest, metavar=metavar, help=flag_help(dest, help_text))

    def admin(name, help_text, description, **more):
        sub = commands.add_parser(name, help=help_text, description=description, **more)
        sub.add_argument("-c", "--config", metavar="FILE", help="the server's INI file (for its db and settings)")
        sub.add_argument("--db", dest="db", metavar="FILE", help="the SQLite database (instead of -c)")
        return sub
    refresh_parser = admin("refresh", "housekeeping for cron: expire, health-check, prune",
                           "Expire links and sessions past their time, end sessions whose app has not answered for "
                           "--dead-after, delete ended sessions older than --retention, take scheduler states from "
                           "--jobstate-command. Safe while serve runs, and beside another refresh. Cron: "
                           "* * * * * satellite satellite refresh -c /etc/satellite/satellite.ini")
    refresh_parser.add_argument("--dead-after", dest="dead_after", metavar="DURATION")
    refresh_parser.add_argument("--retention", dest="retention", metavar="DURATION")
    refresh_parser.add_argument("--jobstate-command", dest="jobstate_command", metavar="COMMAND")
    refresh_parser.add_argument("--job-gone-after", dest="job_gone_after", metavar="DURATION")
    refresh_parser.add_argument("--audit-log", dest="audit_log", metavar="FILE")
    refresh_parser.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    list_parser = admin("list", "sessions in the database", "List sessions (all, or one --state).")
    list_parser.add_argument("--state", choices=SESSION_STATES)
    list_parser.add_argument("--json", action="store_true")
    admin("show", "one session in full", "Show one session (no secrets: they are not stored).") \
        .add_argument("alias")
    revoke_parser = admin("revoke", "end a session now, live connections included",
                          "End a session now: its link answers 410 and its WebSockets are cut.")
    revoke_parser.add_argument("alias")
    revoke_parser.add_argument("--audit-log", dest="audit_log", metavar="FILE")
    admin("stats", "counts by state and lifecycle event", "Counts of sessions and events, and the last refresh.")
    admin("rotate-cookie-key", "replace the key that signs browser cookies (logs every browser out)",
          "Write a new cookie key in place of the old one. Running satellites use it within a second: cookies "
          "made before are refused and browsers open their link (with its token) again. Links, tokens, job keys "
          "and sessions are unchanged. Run it as the user satellite runs as.") \
        .add_argument("--cookie-key", dest="cookie_key", metavar="FILE", help="the key file (instead of -c or --db)")
    check_parser = commands.add_parser(
        "check", help="check a config before starting: certificate, files, listen address, networks",
        description=wrapped_help(
                    "Check what `satellite serve -c FILE` would need, before you start it (and after each change): "
                    "the config parses; the certificate and key load, belong together and cover *.DOMAIN and "
                    "DOMAIN (a real TLS handshake in memory, trusting the chain itself, so a site CA is fine) and "
                    "are not expiring; the key is not readable by others; the listen addresses can be bound (with "
                    "the CAP_NET_BIND_SERVICE hint for ports below 1024); the database and log directories exist "
                    "and the service's user can write them; issue-from/redeem-from are sensible (a network written "
                    "with host bits set, like 10.1.0.5/24, means all of 10.1.0.0/24).\n\n"
                    "It prints one line per check: OK, WARN (works, but look) or FAIL (serve would fail or be "
                    "unsafe), each with what to do; the exit status is 1 if any check FAILs, else 0."),
        epilog="Example, as root on the proxy node before the first start:\n"
               "  satellite check --user satellite -c /etc/satellite/satellite.ini",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check_parser.add_argument("-c", "--config", metavar="FILE", required=True, help="the INI file serve will use")
    check_parser.add_argument("--user", metavar="NAME", help="check file access and port binding as this user, the "
                                                             "one satellite runs as (default: the user running check)")
    export_parser = admin(
        "export", "write the alias -> app map for nginx, Apache or HAProxy",
        wrapped_help("For sites that put nginx or HAProxy in front as the data plane (Apache: the map only): "
                     "write the live map (atomically, only when it changed) and run --reload-command. nginx's and "
                     "HAProxy's maps carry, per session, a one-way digest of its browser cookie, so the front lets "
                     "a request with a valid cookie through by itself and passes everything else to satellite "
                     "(contrib/nginx-satellite.conf, contrib/haproxy-satellite.cfg). Run it as satellite's user "
                     "(it reads the cookie key). --watch keeps the front current within a second; plain export "
                     "from cron is the safety net."),
        epilog="Examples:\n"
               "  satellite export -c /etc/satellite/satellite.ini --format nginx --watch \\\n"
               "      --output /var/lib/satellite-front/nginx.map --group satellite-front \\\n"
               "      --reload-command 'sudo -n /usr/sbin/nginx -s reload'\n"
               "  satellite export -c /etc/satellite/satellite.ini --format haproxy --watch \\\n"
               "      --output /var/lib/satellite-front/haproxy.map --group satellite-front \\\n"
               "      --haproxy-socket /run/haproxy/satellite-sync.sock",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export_parser.add_argument("--format", required=True, choices=sorted(EXPORT_LINE))
    export_parser.add_argument("--output", metavar="FILE", help="write here (default: print)")
    export_parser.add_argument("--group", metavar="GROUP",
                               help="the front's group: nginx/HAProxy maps (they let the front accept cookies) are "
                                    "written 0640 with this group, so the front reads them and no one else does")
    export_parser.add_argument("--reload-command", metavar="COMMAND", help="run after the file changed, "
                                                                           "e.g. 'sudo -n /usr/sbin/nginx -s reload'")
    export_parser.add_argument("--haproxy-socket", metavar="PATH",
                               help="HAProxy's runtime API socket (stats socket ... level admin): the new map is "
                                    "pushed there (prepare map, one add map line per session, commit map, on "
                                    "--output, the file HAProxy loaded; no reload), then counted. If that fails, "
                                    "HAProxy's map is cleared (every request then goes to satellite) and the "
                                    "failure logged")
    export_parser.add_argument("--watch", action="store_true",
                               help="keep running: look for changes every 0.1 s (a stat of the database and the "
                                    "cookie key) and bring the front up to date within a second of each")
    export_parser.add_argument("--domain", dest="domain", metavar="DOMAIN")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.umask(0o077)     # what satellite makes (database, WAL, logs, audit log, cookie key) is its own user's alone
    overrides = {dest: getattr(args, dest, None) for _, dest, _ in SETTING_FLAGS}
    if args.command == "check":
        import pwd
        return command_check(args.config, overrides, args.user or pwd.getpwuid(os.geteuid()).pw_name)
    try:
        settings = Settings.from_sources(args.config, overrides, serving=args.command == "serve")
    except ValueError as exc:
        parser.exit(2, f"satellite: error: {exc}\n")
    if args.command == "serve":
        return command_serve(settings)
    if args.command == "refresh":
        return command_refresh(settings, args.dry_run)
    if args.command == "list":
        return command_list(settings, args.state, args.json)
    if args.command == "show":
        return command_show(settings, args.alias)
    if args.command == "revoke":
        return command_revoke(settings, args.alias)
    if args.command == "stats":
        return command_stats(settings)
    if args.command == "rotate-cookie-key":
        return command_rotate_cookie_key(settings)
    if args.command == "export":
        return command_export(settings, args.format, args.output, args.reload_command, args.group, args.watch,
                              args.haproxy_socket)
    return 2


###############################################################################
# 14. Word list
###############################################################################
# Aliases are three words drawn from this list: the words of 3 to 7 letters of the
# EFF Large Wordlist (https://www.eff.org/dice, CC BY 3.0 US), 4,438 words, ~36 bits
# an alias. The alias is an address, not a secret: the token and key are the secrets.

WORDS = """
abacus abdomen abide abiding ability ablaze able abreast abridge abroad absence absolve abstain absurd accent
acclaim account acetone aching acid acorn acquire acre acrobat acronym acting action active actress acts acutely
aerosol afar affair affirm affix afford affront aflame afloat afoot afraid aged ageless agency agenda agent aghast
agile agility aging agonize agony agreed aground ahead ahoy aide aids aim ajar alarm album alfalfa algebra alias
alibi aliens alike alive almanac almost aloe aloft aloha alone aloof alright alto alumni always amaze amber ambush
amends amenity amiable amid amigo amino amiss ammonia amnesty among amount ample amplify amply amuck amulet amused
amuser amusing anagram anatomy anchor anchovy ancient android anemia anemic anew angelic anger angled angler angles
angling angrily angular animal animate anime ankle annex annuity another antacid anthem anthill antics antler
antonym antsy anvil anybody anyhow anymore anyone anytime anyway aorta apache apostle appear appease applaud apple
applied apply approve apricot april apron aptly aqua area arena argue arise armband armed armful armhole arming
armless armoire armored armory armrest army aroma arose around arousal arrange array arrest arrival arrive arson art
ascend ascent ashamed ashen ashes ashy aside askew asleep aspect aspire aspirin astound astride astute atlas atom
atop atrium atrophy attach attain attempt attest attic attire auction audible audibly audio august author autism
avatar avenge avenue average avert aviator avid avoid await awaken award aware awhile awkward awning awoke awry axis
babble babied baboon backed backer backing backlit backlog backup bacon badass badge badland badly badness baffle
bagel bagful baggage bagged baggie bagging baggy bagpipe baked bakery baking balance balcony balmy bamboo banana
banish banjo banked banker banking banner banshee banter barbed barbell barber barcode barge barista barley barmaid
barman barn barrack barrel barrier bash basics basil basin basis basket batboy batch bath baton bats battery batting
battle bauble bazooka blabber bladder blade blah blame blaming blank blast blazer blazing bleach bleak bleep blemish
blend bless blimp bling blinked blinker blinks blip blitz bloated blob blog blooper blot blouse blubber bluff bluish
blunt blurb blurred blurry blurt blush boaster boat bobbed bobbing bobble bobcat bobsled bobtail body bogged boggle
bogus boil bok bolster bolt bonanza bonded bonding boned boney bonfire bonnet bonsai bonus bony book booted booth
bootie booting bootleg boots boozy borax boring borough boss botany botch both bottle bottom bounce bouncy bovine
boxcar boxer boxing boxlike boxy breach breath breeder breeze breezy brewery brewing briar bribe brick bride bridged
brigade bright brim bring brink brisket briskly bristle brittle broaden broadly broiler broken broker bronco bronze
brook broom brought browse brunch brunt brush brute bubble bubbly bucked bucket buckle budding buddy budget buffalo
buffed buffer buffing buffoon buggy bulb bulge bulgur bulk bulldog bullion bullish bullpen bully bunch bundle bungee
bunion bunkbed bunny bunt busboy bush busily busload bust buzz cabana cabbage cabbie cable caboose cache cackle
cacti cactus caddie caddy cadet cadmium cage cahoots cake calcium caliber calm caloric calorie calzone cameo camera
camper camping campus canal canary cancel candied candle candy cane canine canned canning cannon cannot canola canon
canopy canteen canyon capable capably cape capital capitol capped capsize capsule caption captive capture caramel
carat caravan carbon carded cardiac caress cargo caring carless carload carnage carol carpool carport carried carrot
carry cartel carton cartoon carve carving carwash cascade case cash casing casino casket catalog catcall catcher
catchy caterer catfish catlike catnap catnip catsup cattail cattle catty catwalk caucus causal cause causing caution
cavalry caviar cavity cedar celery celtic cement census certify chafe chain chair chalice chamber chance change
channel chant chaos chapped chaps chapter charger chariot charity charm charred charter chase chasing chaste chatter
chatty cheddar cheek cheer cheese cheesy chef chemist chemo cherub chess chest chevron chevy chewer chewing chewy
chief chili chill chimp chip chirpy chive choice choking chomp chooser choosy chop chosen chowder chrome chubby
chuck chug chummy chump chunk churn chute cider cinch cinema circle circus citable citadel citizen citric citrus
city civic civil clad claim clammy clamor clamp clang clapped clapper clarify clarity clash clasp class clatter
clause claw clay clean clear cleat cleaver cleft clench clerk clever clicker client climate cling clinic clip clique
cloak clobber clock clone cloning closure clothes cloud clover clubbed clump clumsy clunky clutch clutter coach
coastal coaster coat cobalt cobbler cobweb cocoa coconut cod coerce coexist coffee coil coke cola cold collage
collar collide collie colony colt coma come comfort comfy comic coming comma commend comment commode common commute
company compare compel compile comply compost comrade concave conceal concept concert conch concise concur condone
conduit cone confess confirm conform conical conjure consent console consult contact contend contest context contort
contour control convene convent cope copied copier copilot coping copious copper copy coral cork corncob cornea
corned corner corny coroner corral correct corrode corsage corset cortex cosmic cosmos cost cottage cotton couch
cough could country county courier cover coveted coyness cozily cozy cradle crafter crafty cramp crane cranial
cranium crank crate crave craving crayon crazed crazily crazy creamed creamer crease create credit creed creme
creole crepe crept crested crevice crewman crib cricket cried crier crimp crimson cringe crinkle crinkly crisped
crisply crispy critter croak crock crook croon crop cross crouch crouton crowbar crowd crown crucial crudely cruelly
cruelty crumb crummy crumpet crunchy crushed crusher crust crux crying cryptic crystal cube cubical cubicle cuddle
cuddly culprit culture cupcake cupid cupped cupping curable curator curdle cure curfew curing curled curler curling
curly curry curse cursive cursor curtain curtly curtsy curve curvy cushy cusp cussed custard custody customs cut
cycle cyclic cycling cyclist cymbal dab dad dagger daily dainty dairy daisy dance dancing dander dandy danger dangle
dares darkish darling darn dart dash data dating dawdler dawn daybed daycare daylong dayroom daytime dazzler deacon
dealer dealing dealt dean debate debit debrief debtor debug debunk decade decaf decal decay deceit decency decent
decibel decimal deck decline decode decoy decree deduce deduct deed deem deepen deeply deface defame default defeat
defense defiant defile define deflate defog defraud defrost deftly defuse defy degree deity delay delete delouse
delta deluge deluxe demise demote denial denim denote dense density dental dentist denture deny depict deplete
deploy deport depose depress deprive depth deputy derail derby derived deserve desktop despair despise despite
destiny detail detest detract deuce devalue deviant deviate device devious devotee diagram dial diaper diary dice
dicing dictate dig dill dilute dime dimly dimmed dimmer dimness dimple diner dingbat dinghy dingo dingy dining
dinner diocese dioxide diploma dipped dipper dipping disarm disband discard discern discuss disdain dish disjoin
disk dislike dismay dismiss disobey disown display dispose dispute disrupt distant distill distort ditch ditto ditzy
divided diving dizzy doable docile dock dodge dodgy doily doing dole dollar dollop dolly dolphin domain donated
donator donor donut doodle doorman doormat doorway doozy dork dorsal dosage dose dotted douche dove down dowry doze
drab drained drainer drank drapery drastic draw dreaded dreamt dreamy dreary drench dress drew dribble dried drier
drift driller drippy driven driver driving drizzle drizzly drone drool droop dropbox droplet dropout dropper drove
drown drudge drum dry dubbed duchess ducking ducky duct dude duffel dugout duh duke duller duly dumping duo dupe
duplex durable durably duress during dusk dust dutiful duty duvet dwarf dweeb dwelled dweller dwindle dynamic
dynasty each eagle earache eardrum earflap earful earlobe early earmark earmuff earring earshot earthen earthly
earthy earwig easeful easel easiest easily easing easter eatable eaten eatery eating eats ebay ebony ebook ecard
echo eclair eclipse ecology economy edge edging edgy edition editor eel effects effort egging eggnog egotism either
eject elastic elated elbow elderly eldest elevate eleven elf elite elitism elixir elk ellipse elm elope elude
elusive elves email embargo embark embassy ember emblaze emblem embody emboss emcee emerald emit emote emotion
empathy emperor empower emptier empty emu enable enamel enclose encode encore encrust encrypt ended ending endless
endnote endorse energy engaged engine engorge engross engulf enhance enjoyer enrage enrich enroll enslave ensnare
ensure entail entire entitle entity entomb entrap entree entrust entwine envious envoy envy enzyme epic episode
equal equate equator equinox equity erased eraser erasure errand errant erratic error erupt eskimo esquire essay
essence estate etching eternal ethanol ether ethics evacuee evade evasion evasive even evict evident evil evoke
evolve exact exalted example excess exclaim exclude excuse exert exes exhale exhaust exhume exile exit exodus expand
expanse expel expend expert expire explain explode exploit explore expose express extent extinct extras extrude
fable fabric faceted facial facing faction factoid factor factual faculty fade fading failing falcon fall false
falsify fame family famine fanatic fancied fancy fanfare fang fanning fantasy fascism faster fasting faucet favored
fax feast federal fedora feeble feed feel feisty feline femur fence fencing fender ferment ferret ferris ferry
fervor fester festive fetal fetch fever fiber fiction fiddle fidgety fifteen fifth fifty figment figure filing
filled filler filling film filter filth finale finally finance finch finer finicky finite finless finlike fit five
flaccid flagman flail flakily flaky flame flanked flap flaring flashy flask flatbed flatly flatten flattop fled
fleshed fleshy flick flier flight flinch fling flint flip flirt float flock flop floral florist floss flyable
flyaway flyer flying flyover foam foe fog foil folic folk follow fondly fondue font food fool footage footer footing
footman footpad footsie fossil foster founder fox foyer fragile frail frame framing frantic frayed fraying frays
freebee freebie freedom freeing freely freeway freight french frenzy fresh fretful fretted friday fridge fried
friend frill fringe frisbee frisk fritter frolic from front frosted frosty froth frown frozen fruit frying gab gaffe
gag gaining gains gala gallery galley gallon gallows galore game gaming gamma gander gangly gangway gap garage
garbage garden gargle garland garlic garment garnet garnish garter gas gating gauging gauze gave gawk gazing gear
gecko geek geiger gem gender generic genre gentile gently gents geology gerbil gestate gesture getaway getting getup
giant giblet giddily giddy gift giggle giggly gigolo gilled gills gimmick girdle given giver giving gizmo gizzard
glacial glacier glade gladly glamour glance glare glaring glass glazing gleeful glider gliding glimmer glimpse
glisten glitch glitter glitzy gloater gloomy glorify glory gloss glove glowing glucose glue gluten glutton gnarly
gnat goal goes goggles going golf goliath gonad gondola gone gong good gooey goofy google goon gopher gore gorged
gory gosling gossip gothic gotten gout gown grab graded grader grading grafted grain grandly grandma grandpa granite
granny granola grant grape graph grapple grasp grass gratify grating gravel graves gravity gravy gray grazing greedy
green greeter grew grid grief grill grimace grime grimy grinch grip gristle grit groggy groin groom groove groovy
grope ground grouped grout grove grower growing growl grub grudge gruffly grumble grumbly grunge grunt guide guiding
guise gulf gully gulp gumball gumdrop gumming gummy gurgle guru gush gusto gusty gutless guts gutter guy guzzler
habitat hacked hacker hacking hacksaw had haggler haiku half halogen halt halved halves hamlet hammock hamper
hamster handbag handed handful handgun handled handler handoff handsaw handset hangout hangup hankie hanky happier
happily happy harbor hardhat hardly hardy harmful harmony harness harpist harsh harvest hash hassle haste hastily
hasty hatbox hatchet hate hatless hatred haunt haven hazard hazily hazing hazy headed header heading headset headway
heap heat heave heavily heaving hedge hedging hefty helium helmet helper helpful helping hemlock hence henna herald
herbal herbs hermit heroics heroism herring herself hertz hexagon hubcap huddle huff hug hula hulk hull human humble
humbly humid humming hummus humped humvee hunger hungry hunk hunter hunting hurdle hurled hurler hurling hurray
hurried hurry hurt husband hush husked hut hybrid hydrant hyphen ice iciness icing icky icon icy ideally idiocy
idiom idly igloo ignore iguana image imaging imitate immerse impale impart impeach impish implant implode imply
impose impound imprint improve impulse impure iodine iodize ion ipad iphone ipod irate irk iron islamic isotope
issue issuing italics item itunes ivory ivy jab jackal jacket jackpot jailer jam janitor january jargon jarring
jasmine jaunt java jawed jawless jawline jaws jaybird jazz jeep jellied jelly jersey jester jet jiffy jigsaw jimmy
jingle jinx jitters jittery job jockey jogger jogging john joining jolly jolt jot jovial joyous joyride judge judo
juggle jugular juice juicy jujitsu jukebox july jumble jumbo jump june junior juniper junkie junkman jurist juror
jury justice justify justly kabob karaoke karate karma kebab keenly keep keg kelp kennel kept kettle kick kiln kilt
kimono kindle kindly kindred kinetic kinfolk king kinship kinsman kisser kissing kitchen kite kitten kitty kiwi
kleenex knee knelt knoll koala kooky kosher krypton kudos kung labored laborer ladder ladies ladle ladybug lagged
lagging lagoon lair lake lance landed landing lanky lantern lapdog lapel lapped lapping laptop lard large lark lash
lasso last latch late lather latrine latter launch launder laundry laurel lavish lazily lazy left legacy legal
legend legged legible legibly lego legroom legume legwork lemon lend length lens lent leotard lesser letdown letter
lettuce level levers liable liberty library licking lid life lifter lifting liftoff likely liking lilac lilly lily
limb limeade limes limit limping line lingo lining linked linseed lint lion lip liquefy liqueur liquid lisp list
litmus litter little livable lived lively liver lividly living lizard lucid luckily lugged lullaby lumber lumping
lumpish lunacy lunar lung lurch lure lurk lushly luster lustily lusty luxury lying lyrics macaw mace machine magenta
maggot magical magma magnify maimed majesty maker making malt mama mammal mammary manager manatee mandate manger
mangle mango mangy manhole manhood manhunt manila mankind manlike manly manmade manned mannish manor mantis mantra
manual many map marbled marbles march mardi margin marina marine marital marlin maroon married marrow marry marshy
marxism mascot mashed mashing masses massive mastiff matador matcher math mating matrix matron matted matter mauve
maximum maybe mayday moaner moaning mobile mobster mocha mocker mockup modify modular module moisten molar mold
mollusk mom monday mongrel monitor monsoon monthly moocher moody mooing mooned moonlit mop morale morally morse
mortify mosaic mossy most motion motive motor motto mounted mourner mouse mousy mouth movable move movie moving
mower mowing much muck mud mug mulch mule mulled mullets mumble mumbo mummify mummy mumps mundane muppet mural murky
museum mushily mushy music musket musky mustang mustard muster musty mutable mutate mute mutiny mutt mutual muzzle
myself myspace mystify myth nacho nag nail name naming nanny nape napkin napped napping nappy narrow nastily native
natural nature navy nearby nearest nearly neatly nebula nectar negate nemeses nemesis neon nephew nerd nervous nervy
nest net neuron neuter neutron never next nibble niece nifty nimble nimbly ninja ninth nuclear nuclei nucleus nugget
nullify number numbing numbly numeral numeric nursery nursing nurture nutcase nutlike nutmeg nutty nuzzle nylon oaf
oak oasis oat object obliged oblong oboe obscure obtain obtuse obvious occupy ocean ocelot octagon octane october
octopus ogle oil oink okay old olive omega omen ominous omit onboard ongoing onion online only onset onshore onstage
onto onward onyx oops ooze oozy opacity opal open operate opium opossum oppose opt osmosis other otter ouch ought
ounce outage outback outbid outcast outcome outer outfit outgrow outing outlast outlet outline outlook outmost
outpost outpour output outrage outrank outsell outward outwit oval ovary oven overact overall overbid overdue
overfed overlap overlay overpay overrun overtly overuse owl oxford oxidant oxidize oxygen oyster ozone paced pacific
pacify padded padding paddle padlock pagan pager paging pajamas palace palm paltry pampers panama pancake panda pang
panic panning panther pantry pants papaya paper paprika papyrus parade paradox parcel parched pardon parish parka
parking parkway parlor parole parrot parsley parsnip partake parted parting partly partner party passage passing
passion passive pasta pasted pastel pastime pastor pasture pasty patchy path patient patio patriot patrol pauper
paver paving pawing payable payback payday payee payer paying payment payroll pebble pebbly pecan pectin pelican
pellet pelt pelvis penalty pencil pendant pending pennant penny penpal pension pep percent perch perfume perish
perjury perky perm pesky peso pester petal petite petri petted petty petunia phantom phobia phoenix phoney phonics
phony photo phrase placard placate plank planner plant plasma plaster plastic plated plating platter player playful
playing playoff playpen playset plaza pleat pledge plenty pliable plod plop plot plow ploy pluck plug plunder plural
plus plywood poach pod poem poet pogo pointed pointer pointy poise poison poker poking polar police policy polio
polish polka polo polygon polymer poncho pond pony popcorn pope poplar popper poppy popular pork porous portal
portion portly poser posh posing possum postage postal postbox posted poster posting posture postwar pouch pounce
pound pouring pout powdery power powwow pox prance pranker prayer praying preachy precise precook precut predict
preface prefix pregame prelaw prelude premium prepaid prepay preplan preppy preset preshow presoak press presume
preteen pretext pretty pretzel prevail prevent preview prewar pried primal primary primate primer primp print prior
prism prison prissy privacy private prize probe probing problem process prodigy produce product profane profile
progeny program prone prong pronto proofs propose props prorate proton proud proved proven proving provoke prowess
prowler proxy prozac prude prune pruning pry psychic public pucker pueblo pug pull pulp pulsate pulse puma pumice
pummel punch pungent punk pupil puppet puppy purely purge purging purify purist puritan purity purple purr purse
pursuit pusher pushing pushpin pushup pushy putdown putt puzzle pyramid python quack quail quake quaking qualify
quality qualm quantum quarrel quarry quartet quench query quicken quickly quiet quill quilt quintet quirk quit
quiver quote rabid race racing racism rack racoon radar radial radio radish raffle raft rage ragged raging ragweed
raider railcar railing railway raisin rake raking rally ramble ramp ramrod ranch random ranged ranger ranging ranked
ranking ransack ranting rants rare rarity rascal rash rasping ravage raven ravine raving ravioli reach reactor ream
reapply reason reawake rebate rebel rebirth reboot reborn rebound rebuff rebuild rebuilt recall recant recast recede
recent recess recital recite reclaim recluse recoil recolor recopy record recount recoup rectal rectify reenact
reenter reentry referee refill refined reflex reflux refocus refold refract refrain refresh refried refund refusal
refuse refute regain regalia regally reggae regime region regress regroup regular rehab reheat rehire reissue
rejoice rejoin relapse related relax relay relearn release reliant relic relieve relight relish relive reload relock
rely remake remark remarry rematch remedy remix remnant remold remorse remote removal removed remover rename renewal
renewed rental rented renter reoccur reopen reorder repaint repair repave repeal repent replace replay replica reply
repose repost reprint reprise reps reptile request require reroute rerun resale rescuer reseal resend resent reset
reshape reshoot residue resize resort respect result resume retail retake rethink retinal retired retiree retold
retool retouch retrace retract retrain retread retreat retrial retry return retying retype reunion reunite reuse
reveal reveler revenge revenue reverb revered reverse revert revise revisit revival reviver revoke revolt reward
rewash rewind rewire reword rework rewrap rewrite rhyme ribbon ribcage rice riches richly rickety ricotta ridden
ride riding rifling rift rigging rigid rigor rimless rimmed rind rink rinse rinsing riot ripcord ripping ripple
riptide rise rising risk risotto ritalin ritzy rival riveter roamer roaming roast robbing robe robin robust rocker
rocket rocking rocky rogue roman romp rope roping roster rosy rotten rotting rotunda roundup routine routing rover
roving royal rubbed rubber rubbing rubble rubdown ruby ruckus rudder rug ruined rule rumble rummage rumor rundown
runner running runny runt runway rupture rural ruse rush rust rut sabbath sacred sadden saddled sadly sadness safari
safely saffron saga sage sagging saggy said saint sake salad salami salary saline salon saloon salsa salt salute
salvage same sample sandal sandbag sandbar sandbox sanded sanding sandlot sandpit sandy sank santa sapling sappy
sarcasm sardine sash sassy satchel satin satisfy saucy sauna savage savanna saved savings savior savor say scabbed
scabby scalded scale scaling scallop scam scandal scanner scant scarce scared scarf scarily scary scenic scheme
scholar science scion scoff scone scoop scooter scope scorch scored scorer scoring scorn scotch scoured scouts scrap
scratch scrawny screen scribe script scroll scrooge scruffy scrunch scuba scuff scurvy scuttle second secrecy secret
sector secular sedan sedate seduce segment seismic seizing seldom self seltzer seminar senate senator send senior
sepia septic septum sequel series sermon serpent serve service serving sesame setback setting settle setup seventh
seventy shabby shack shaded shadily shading shadow shady shaft shakily shaking shaky shale shallot shallow shame
shampoo shank shanty shape shaping share sharper sharpie sharply shawl sheath shed sheep sheet shelf shell shelter
shelve sherry shield shifter shifty shimmer shimmy shindig shine shingle shining shiny ship shirt shock shone
shopper shore shorten shorter shortly shorts shorty shout shove showbiz shower showing showman shown showoff showy
shrank shriek shrill shrimp shrine shrink shrivel shrubs shrug shrunk shudder shuffle shun shush shut shy siamese
sibling siding sierra siesta sift sighing silent silica silicon silk silly silo silt silver simile simple simply
sincere singer singing single sinless sinner sinuous sip siren sister sitcom sitter sitting sixfold sixteen sixth
sixties sizable sizably size sizing sizzle skater skating skeptic sketch skewed skewer skid skied skier skies skiing
skilled skillet skimmed skimmer skinny skipper skirt skittle skyline skype skyward slab slacked slacker slacks slain
slam slander slang slashed slate slather slaw sled sleek sleep sleet sleeve slept sliced slicer slicing slick slider
sliding slimy slinky slip slit sliver slogan sloped sloping sloppy slot slouchy sludge slug slum slurp slush sly
small smartly smasher smashup smell smile smirk smite smith smitten smock smog smoked smoking smoky smolder smooth
smother smudge smudgy smugly snack snagged snaking snap snare snarl snazzy sneak sneer sneeze snide sniff snippet
snitch snooper snooze snore snoring snorkel snort snout snowcap snowman snowy snub snuff snuggle snugly speak
species specked specks speech speed speller spender spent spew sphere sphinx spider spied spiffy spill spilt spinach
spinal spindle spinner spinout spiny spiral spirits splashy spleen splice splurge spoiled spoiler spoils spoken
sponge spongy sponsor spoof spooky spool spoon spore sports sporty spotted spotter spotty spousal spouse spout
sprain sprang sprawl spray spree sprig spring sprint sprite sprout spruce sprung spry spud spur sputter squad squall
squash squeak squeeze squid squint squire squirt squishy stable stack stadium staff stage staging stained stamina
stammer stamp stand stank staple starch stardom staring stark starlet starlit starry starter startle startup starved
stash state static statue stature status statute staunch stays steam steed steep stellar stem stench stencil step
stereo sterile sternum stew stick stiffen stiffly stifle stilt stimuli stinger stingy stinky stipend stir stitch
stock stoic stoke stole stomp stoning stony stood stooge stool stoop stopped stopper storage storm stout stove
stowing stratus straw stray streak stream street strep stress stretch strewn strict stride strife strike strive
strobe strode struck strudel strum strung strut stubbed stubble stubbly stucco stuck student studied studio study
stuffed stuffy stumble stump stung stunned stunner stunt stupor sturdy styling stylist stylus suave subdued subject
sublet sublime subpar subplot subside subsidy subsoil subtext subtly subtype suburb subway subzero such suction
sudden sudoku suds suffice suffix sugar suggest suing suitor sulfate sulfide sulfite sulfur sulk sullen sultry
supper supply support supreme surely surface surfer surgery surging surname surpass surplus surreal survey survive
sushi suspect suspend swab swagger swan swarm sway swear sweat sweep swell swept swerve swifter swiftly swimmer
swinger swipe swirl switch swivel swizzle swooned swoop swoosh swore sworn swung symptom synapse synergy syrup
system tabasco tabby tables tablet tabloid tacking tackle tacky taco tactful tactics tactile tadpole tag tainted
take taking talcum tall talon tamale tamer tamper tank tanned tannery tanning tantrum tapered tapioca tapping taps
target tarmac tarnish tarot tartar tartly task tassel taste tasting tasty tattle tattoo taunt tavern thank that thaw
theater thee theft theme thermal thermos these thesis thicken thicket thigh thimble thing think thinly thinner
thirsty thirty thong thorn those thrash thread thrift thrill thrive throat throng thrower thud thumb thus thyself
tiara tibia tidal tidbit tidings tidy tiger tighten tightly tigress tile tiling till tilt timid timing timothy
tinfoil tingle tingly tinker tinsel tint tinwork tiny tipoff tipped tipper tipping tiptop tiring tissue trace
tracing track tractor trade trading traffic tragedy train traitor trance trapeze trapped trapper traps trash travel
tray treason treat treble tree trekker tremble tremor trench trend triage trial tribune tribute triceps trickle
tricky trident tried trifle trilogy trimmer trinity trio tripod triumph trivial trodden trophy tropics trouble
trough trout trowel truce truck truffle trump trunks trustee truth try tubby tubular tucking tuesday tug tuition
tulip tumble tummy turban turbine turf turkey turmoil turret turtle tusk tutor tutu tux tweak tweed tweet twelve
twenty twerp twice twiddle twig twine twins twirl twisted twister twisty twitch twitter tycoon tying tyke udder
ultra umpire unable unaired unawake unaware unbaked unbend unbent unblock unboxed uncanny unchain uncheck uncivil
unclad unclasp uncle unclip uncloak unclog uncork uncouth uncover uncross uncrown uncured uncut undated undead
undergo undoing undone undress undying unearth unease uneasy uneaten unequal uneven unfair unfazed unfiled unfixed
unfold unglue ungodly unhappy unheard unhinge unholy unhook unicorn unified unifier unify union unison unit unkempt
unkind unknown unlaced unlatch unleash unless unlined unlit unloved unlucky unmade unmixed unmoral unmoved unnamed
unnerve unpack unpaid unpaved unplug unquote unrated unread unreal unrest unripe unrobed unroll unruly unsafe unsaid
unsaved unscrew unseen unsent unsnap unsold unstuck unsure unsworn untaken untamed untaxed untidy untie until
untimed untold untried untrue untruth untwist untying unused unusual unvocal unwary unweave unwed unwell unwind
unwired unworn unwound unwoven unzip upbeat upchuck update upfront upgrade upheld uphill uphold upload upon upper
upright upriver uproar uproot upscale upside upstage upstart upstate upswing uptake uptight uptown upward upwind
uranium urban urchin urgency urgent urging urology usable usage useable used user usher usual utensil utility
utilize utmost utopia utter vacancy vacant vacate vaguely valiant valid valium valley value vanilla vanish vanity
vantage varied variety various varmint varnish varsity varying vastly veal vegan veggie velcro velvet vending vendor
venture venue venus verbose verdict verify verse version versus vertigo very vessel vest veteran veto viable vibes
vice victory video viewer viewing village villain vintage violate violet violin viper viral virtual virus visa
viscous visible visibly vision visitor visor vista vitally vividly vixen vocally voice voicing void volley voltage
volumes voter voting voucher vowed vowel voyage wad wafer waffle waged wager wages waggle wagon wake waking walk
walmart walnut walrus waltz wand wannabe wanted wanting wasabi washday washed washer washing washout washtub wasp
wasting watch water waving wavy whacky wham wharf wheat whiff whinny whiny whoever whole whoopee whoops why wick
widely widen widget widow width wielder wife wifi wildcat wilder wildly willed willing willow wilt wimp wince
wincing wind wing winking winner winter wipe wired wiring wiry wisdom wise wish wispy wistful wizard wobble wobbly
wok wolf womanly womb woof wooing wool woozy word work worried worrier worry worst wound woven wow wrangle wrath
wreath wrecker wrench wriggle wriggly wrinkle wrinkly wrist writing written wronged wrongly wrought xbox xerox yahoo
yam yanking yapping yard yarn yeah yearly yeast yelling yelp yen yiddish yield yin yippee yodel yoga yogurt yonder
yoyo yummy zap zealous zebra zen zero zesty zipfile zipping zippy zips zit zodiac zombie zone zoning zoology zoom
""".split()


if __name__ == "__main__":
    sys.exit(main())

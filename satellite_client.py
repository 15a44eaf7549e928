#!/usr/bin/env python3
"""satellite-client: one command on a login node launches Jupyter (or any web app) as a
batch job behind a Satellite HTTPS link.

    satellite-client launch --jupyter lab --partition debug --time-limit 2:00:00 --wait

asks satellite for a link, writes the batch script, submits it with the scheduler's own
CLI and prints the link. Inside the job the same program runs as `agent`: it reports
"running", starts the app where only the agent reaches it (a Unix socket in the session's
0700 directory, or the node's loopback, checked to be the app's own listener), opens its
gate (TLS, satellite's per-session proof, then a byte relay: the only network listener in
direct mode), redeems the link, and releases it on every way out (the app ends, scancel,
time limit). See README, "Where the app listens".

Secrets: the link's token and the job's key live only in ~/.satellite/sessions/<alias>/secrets
(mode 0600, directory 0700). They never appear in the batch script, on a command line or in
a log. `--json` shows the link (which holds the token, as intended) and never the key.

Pure standard library, Python >= 3.9. Sections, top-down:

    1. Constants        paths, apps, job states
    2. Options          launch options, time and memory parsing, site config, profiles
    3. Satellite API    HTTPS calls, link probe
    4. Sessions         the per-session directory on disk
    5. Schedulers       Slurm, PBS, LSF, HTCondor, SGE, local: directives, submit, query, cancel
    6. Batch script     rendering
    7. Agent            what runs inside the job; a tunnel to satellite when it cannot connect to the node
    8. Commands         launch, list, status, cancel, profile
    9. main             argparse

The tunnel protocol (frames, streams, credit) has one copy, in satellite.py: this program
imports it from there. satellite.py sits beside this file in the source tree, and inside
dist/satellite-client.pyz, byte for byte.
"""

from __future__ import annotations

import argparse
import calendar
import collections
import configparser
import contextlib
import dataclasses
import hashlib
import hmac
import http.client
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Iterable, Optional

from satellite import TUNNEL_PROTOCOL, Tunnel     # the tunnel protocol's one copy (see above)
from satellite import plain_address, relay_websocket, tls_handshake   # address, byte relay, deadline-bound TLS: one copy, there
from satellite import UPSTREAM_PREAMBLE_PREFIX, UPSTREAM_PREAMBLE_SIZE, upstream_preamble
from satellite import ALIAS_SHAPE, SESSION_STATES  # what satellite issues: the client checks its replies against it
from satellite import COOKIE_NAME, STATUS_PATH     # satellite's own cookie and status path: --wait's probe
from satellite import print_checks, wrapped_help  # `check`'s help and OK/WARN/FAIL lines, as `satellite check`'s

__version__ = "0.1.0"


###############################################################################
# 1. Constants
###############################################################################

SITE_CONFIG = "/etc/satellite/client.ini"          # or $SATELLITE_CLIENT_CONFIG
SCHEDULER_NAMES = ("slurm", "pbs", "lsf", "htcondor", "sge", "local")
CONNECT_MODES = ("direct", "tunnel", "auto")        # how satellite reaches the app (see --connect)
JOB_STATES = ("pending", "held", "running", "completed", "failed", "timeout", "cancelled", "done", "unknown")
ENDED_JOB_STATES = ("completed", "failed", "timeout", "cancelled", "done")   # done: ended, outcome not known
SESSION_ROOT = ".satellite/sessions"                # under the user's home
PROFILE_ROOT = ".satellite/profiles"
LOOPBACK = "127.0.0.1"                              # where an app with no Unix socket listens: only the node
# Where the app listens (README, "Security model"). The default: on a Unix socket in the session's 0700
# directory, or the node's loopback for apps that cannot serve on one; in direct mode the agent's gate is the
# only network listener. The old behaviour, the app on the node's cluster address in plain HTTP for anyone on
# the cluster network, only by the site's [enforced] app-listens = cluster-network-unprotected.
ISOLATED, UNPROTECTED = "isolated", "cluster-network-unprotected"
APP_LISTENS = (ISOLATED, UNPROTECTED)
APP_SOCKET = "app.sock"                             # in the session directory (0700)
MAX_SOCKET_PATH = 100                               # sun_path holds 108 bytes
GATE_PENDING = 16                                   # connections the gate holds before they proved anything
GATE_PENDING_SATELLITE = 256                        # the same, for connections from satellite's own addresses
GATE_PENDING_PER_SOURCE = 4                         # of GATE_PENDING, what one other address may hold
GATE_SECONDS = 5.0                                  # for the TLS handshake and satellite's proof, in total
LIFETIME_MARGIN = 600                               # link outlives the walltime by this much (seconds)
MAX_REPLY = 64 * 1024                               # bytes of a satellite reply we read at most
LOG_TAIL_BYTES = 16 * 1024                          # of the job log's end, what --wait reads to show its last lines

JUPYTER_FLAGS = ("--no-browser --ip={host} --port={port} --ServerApp.port_retries=0 "
                 # satellite is the front: Host names are its aliases, and it sets X-Forwarded-*
                 "--ServerApp.allow_remote_access=True --ServerApp.trust_xheaders=True")
# jupyter_server >= 1.?: --ServerApp.sock (mode 0600; --port must then be left out; the token still applies).
# Kernels talk to the server over Unix sockets (transport=ipc) in a private runtime directory
# (JUPYTER_RUNTIME_DIR, see app_setup), not on five TCP ports of the node's shared loopback.
JUPYTER_IPC_KERNELS = "--KernelManager.transport=ipc"
JUPYTER_SOCKET_FLAGS = ("--no-browser --ServerApp.sock={socket} " + JUPYTER_IPC_KERNELS + " "
                        "--ServerApp.allow_remote_access=True --ServerApp.trust_xheaders=True")
RUNTIME_PREFIX = "satellite-runtime-"              # a short private directory: a Unix socket path has 107 bytes
JUPYTER_CONFIG = '{"IdentityProvider": {"token": "$token"}}'        # jupyter_server 2: Lab and Notebook 7


@dataclasses.dataclass(frozen=True)
class KnownApp:
    """An app `--app`/`--jupyter` names, and how it is given the link's token: in a file (0600, in a 0700
    directory of the session) that the app itself reads as its own login setting. Never on its command line
    (`ps` shows that to every user) and never in its environment (its kernels and terminals would inherit it).
    The app starts in that private directory and is told the working directory as its root ({workdir}): what
    an app loads from where it starts (Voila's voila.py, also loaded by Lab and Notebook when Voila is
    installed) cannot be another user's plant in a shared project directory.
    The command is a shell template: {host} {port} {workdir}, {config} (the file) and {config_dir};
    `socket_command`, for an app that can serve on a Unix socket, has {socket} instead of {host} {port}
    and is what runs by default (app-listens = isolated)."""
    command: str
    config_name: str = ""             # the file's name; "" = the app has no login of its own
    config: str = ""                  # its text; $token is the link's token
    socket_command: str = ""          # the same app on the Unix socket {socket}; "" = loopback only


APPS = {
    "lab": KnownApp(f"jupyter lab {JUPYTER_FLAGS} --ServerApp.root_dir={{workdir}} --config={{config}}",
                    "jupyter_config.json", JUPYTER_CONFIG,
                    f"jupyter lab {JUPYTER_SOCKET_FLAGS} --ServerApp.root_dir={{workdir}} --config={{config}}"),
    "notebook": KnownApp(f"jupyter notebook {JUPYTER_FLAGS} --ServerApp.root_dir={{workdir}} --config={{config}}",
                         "jupyter_config.json", JUPYTER_CONFIG,
                         f"jupyter notebook {JUPYTER_SOCKET_FLAGS} --ServerApp.root_dir={{workdir}} "
                         "--config={config}"),
    # Voila ignores $JUPYTER_TOKEN and serves with no login unless Voila.token is set; it reads voila.json
    # from config_file_paths (by default the directory it starts in too)
    "voila": KnownApp("voila --no-browser --Voila.ip={host} --port={port} --Voila.port_retries=0 "
                      "--Voila.config_file_paths={config_dir} {workdir}", "voila.json", '{"Voila": {"token": "$token"}}'),
    # code-server: its --config YAML file (password auth)
    "code-server": KnownApp("code-server --config={config} --bind-addr {host}:{port} --disable-telemetry {workdir}",
                            "code-server.yaml", "auth: password\npassword: $token\n",
                            "code-server --config={config} --socket {socket} --disable-telemetry {workdir}"),
    # TensorBoard has no login of its own: whoever reaches its port uses it (README, "Security model")
    "tensorboard": KnownApp("tensorboard --logdir {workdir} --host {host} --port {port}"),
}

# Variables that carry a session's secret into the app's environment: never passed on from the environment
# the client or the agent was started in (a launch from a Jupyter terminal inherits its server's token).
SECRET_VARIABLES = ("SATELLITE_TOKEN", "SATELLITE_TOKEN_FILE", "JUPYTER_TOKEN", "JPY_API_TOKEN", "PASSWORD",
                    "HASHED_PASSWORD")


class UsageError(Exception):
    """Bad options or config: exit 2 before anything is contacted."""


class Failure(Exception):
    """Something outside went wrong (satellite, scheduler, job): exit 1."""


# Terminal control: C0 and C1 controls (escape sequences start with one) and the bidirectional overrides that
# reorder what a reader sees. Tab and newline stay.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text) -> str:
    """Text from outside (satellite's replies, a scheduler's answers, a job's log) as it may reach a terminal:
    every control character shown as \\xNN, so none can move the cursor, retitle the window or hide text."""
    return CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                  else f"\\u{ord(m.group()):04x}", str(text))


###############################################################################
# 2. Options
###############################################################################

TIME_LIMIT_FORMS = "minutes (90), MM:SS (90:00), HH:MM:SS (1:30:00), D-HH (1-12), D-HH:MM or D-HH:MM:SS"
SCHEDULER_TIME = re.compile(r"(?:(?P<days>[0-9]+)-(?P<dhours>[0-9]+)(?::(?P<dminutes>[0-5]?[0-9])"
                            r"(?::(?P<dseconds>[0-5]?[0-9]))?)?"
                            r"|(?P<hours>[0-9]+):(?P<hminutes>[0-5]?[0-9]):(?P<hseconds>[0-5]?[0-9])"
                            r"|(?P<minutes>[0-9]+)(?::(?P<mseconds>[0-5]?[0-9]))?)")


def scheduler_seconds(text: str) -> Optional[int]:
    """A time in Slurm's forms (which squeue prints too) -> seconds; None if it is not one. Read as Slurm reads
    it: one number is minutes, two (90:00) are minutes and seconds, three hours, minutes and seconds; with
    days-, the next number is hours."""
    match = SCHEDULER_TIME.fullmatch(text.strip())
    if not match:
        return None
    n = {name: int(value or 0) for name, value in match.groupdict().items()}
    return ((n["days"] * 24 + n["dhours"] + n["hours"]) * 60 + n["dminutes"] + n["hminutes"] + n["minutes"]) * 60 \
        + n["dseconds"] + n["hseconds"] + n["mseconds"]


def parse_time_limit(text: str) -> int:
    """--time-limit -> seconds, in the forms Slurm reads (TIME_LIMIT_FORMS; every scheduler gets it converted
    to its own), or with a unit: 90m, 2h, 1d. Zero is refused: to Slurm it means no limit at all."""
    text = str(text).strip()
    match = re.fullmatch(r"([0-9]+)([mhd])", text)
    seconds = (int(match.group(1)) * {"m": 60, "h": 3600, "d": 86400}[match.group(2)] if match
               else scheduler_seconds(text))
    if seconds is None:
        raise UsageError(f"--time-limit {text!r}: use {TIME_LIMIT_FORMS}, or 90m, 2h, 1d")
    if seconds == 0:
        raise UsageError(f"--time-limit {text!r}: give a limit above zero (0 is no limit at all to Slurm)")
    return seconds


def limit_text(seconds: int) -> str:
    """A time limit as Slurm writes it: [D-]HH:MM:SS."""
    days, rest = divmod(seconds, 86400)
    return f"{days}-{hms(rest)}" if days else hms(rest)


def hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def parse_memory_gb(text: str) -> int:
    """'16' or '16G' or '0.5' (GB) -> megabytes."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(?:[gG][bB]?)?", str(text).strip())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"--memory {text!r}: give gigabytes, e.g. 16 or 0.5")
    return int(round(float(match.group(1)) * 1024))


def positive_int(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name.replace('_', '-')} {value!r}: give a whole number") from None
    if number < 1:
        raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    return number


@dataclasses.dataclass
class LaunchOptions:
    """What `launch` (and a profile, and the site config) can say. None = not given."""
    scheduler: Optional[str] = None
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    reservation: Optional[str] = None
    nodes: Optional[int] = None
    ntasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    memory: Optional[str] = None
    gpus: Optional[int] = None
    gres: Optional[str] = None
    time_limit: Optional[str] = None
    constraint: Optional[str] = None
    jupyter: Optional[str] = None
    app: Optional[str] = None
    command: Optional[str] = None
    satellite: Optional[str] = None
    cacert: Optional[str] = None
    workdir: Optional[str] = None
    env_modules: Optional[str] = None
    conda_env: Optional[str] = None
    venv: Optional[str] = None
    sif: Optional[str] = None
    bind: Optional[str] = None
    nv: Optional[bool] = None
    rocm: Optional[bool] = None
    python: Optional[str] = None
    tls: Optional[bool] = None
    connect: Optional[str] = None
    app_listens: Optional[str] = None      # only from the site's [enforced] section (APP_LISTENS)

    def merged(self, other: "LaunchOptions") -> "LaunchOptions":
        """These options, with other's given values taking over."""
        values = dataclasses.asdict(self)
        values.update({k: v for k, v in dataclasses.asdict(other).items() if v is not None})
        return LaunchOptions(**values)

    def given(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_mapping(cls, values: dict, source: str, enforced: bool = False) -> "LaunchOptions":
        """Options from a config section or a profile. `enforced`: the site's [enforced] section, read by
        enforced_options, the only source app-listens is taken from (never decided by a source's name)."""
        known = {f.name for f in dataclasses.fields(cls)}
        options = {}
        for name, value in values.items():
            key = name.replace("-", "_")
            if key not in known:
                raise UsageError(f"{source}: unknown setting {name!r}")
            if key == "app_listens" and not enforced:
                raise UsageError(f"{source}: app-listens is the site's alone ({SITE_CONFIG}, [enforced])")
            if key in ("nv", "rocm", "tls") and isinstance(value, str):
                value = value.strip().lower() in ("1", "yes", "true", "on")
            options[key] = value
        return cls(**options)


def read_config(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error as exc:
        raise UsageError(f"config {path}: {exc}") from None
    return parser


def site_options() -> LaunchOptions:
    """Defaults: the site config's [client] section (or that of $SATELLITE_CLIENT_CONFIG's file), then
    SATELLITE_URL / SATELLITE_CACERT. An [enforced] section is the site's alone (enforced_options)."""
    path = os.environ.get("SATELLITE_CLIENT_CONFIG", SITE_CONFIG)
    options = LaunchOptions()
    if os.path.exists(path):
        parser = read_config(path)
        if parser.has_section("enforced") and path != SITE_CONFIG:
            raise UsageError(f"{path}: an [enforced] section is read only from the site config, {SITE_CONFIG}")
        if parser.has_section("client"):
            options = LaunchOptions.from_mapping(dict(parser.items("client")), f"site config {path}")
    elif "SATELLITE_CLIENT_CONFIG" in os.environ:
        raise UsageError(f"SATELLITE_CLIENT_CONFIG points at {path}, which does not exist")
    env = LaunchOptions(satellite=os.environ.get("SATELLITE_URL") or None,
                        cacert=os.environ.get("SATELLITE_CACERT") or None)
    return options.merged(env)


def enforced_options() -> LaunchOptions:
    """What the site requires: the [enforced] section of /etc/satellite/client.ini, read from that path
    whatever $SATELLITE_CLIENT_CONFIG says."""
    if not os.path.exists(SITE_CONFIG):
        return LaunchOptions()
    parser = read_config(SITE_CONFIG)
    if not parser.has_section("enforced"):
        return LaunchOptions()
    return LaunchOptions.from_mapping(dict(parser.items("enforced")), f"{SITE_CONFIG} [enforced]", enforced=True)


def enforce_site(options: LaunchOptions) -> LaunchOptions:
    """The options with what the site enforces; UsageError if the environment, a profile or the command
    line asks for something else (a different value is refused, not silently replaced)."""
    enforced = enforced_options()
    wanted, required = with_absolute_paths(options), with_absolute_paths(enforced)
    for name, value in required.given().items():
        if getattr(wanted, name) is not None and str(getattr(wanted, name)) != str(value):
            raise UsageError(f"{name} {printable(getattr(options, name))}: this site requires {name} = "
                             f"{printable(getattr(enforced, name))} ({SITE_CONFIG}, [enforced]); leave it out")
    return options.merged(enforced)


def profile_path(name: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or name.startswith("."):
        raise UsageError(f"profile name {name!r}: use letters, digits, '.', '_' or '-'")
    return Path.home() / PROFILE_ROOT / f"{name}.json"


def load_profile(name: str) -> LaunchOptions:
    path = profile_path(name)
    if not path.exists():
        raise UsageError(f"no profile {name!r} (see: satellite-client profile list)")
    return LaunchOptions.from_mapping(json.loads(path.read_text()), f"profile {name}")


@dataclasses.dataclass
class Plan:
    """Launch options checked and resolved: everything needed to write and submit the job."""
    options: LaunchOptions
    scheduler: "Scheduler"
    time_limit: int                 # seconds
    memory_mb: Optional[int]
    command: str                    # shell command template with {port} (and {host}), or {socket}
    app: Optional[str]              # a name in APPS, or None for --command
    workdir: str
    python: str


def plan_launch(options: LaunchOptions, need_cli: bool = True, need_satellite: bool = True) -> Plan:
    """Check everything that can be checked locally, so bad options fail before any contact, and resolve
    them into a Plan. Only checks: nothing is rendered, and the caller's options are left as they are
    (the Plan holds its own copy, with the counts made whole numbers). need_satellite=False (a profile):
    no satellite URL is needed, but one that is given must be right."""
    if need_satellite or options.satellite:
        check_satellite_url(options.satellite)
    options = with_absolute_paths(options)
    if sum(x is not None for x in (options.jupyter, options.app, options.command)) > 1:
        raise UsageError("choose one of --jupyter, --app and --command")
    if options.app_listens is not None and options.app_listens not in APP_LISTENS:
        raise UsageError(f"app-listens {options.app_listens!r}: choose {ISOLATED} or {UNPROTECTED}")
    isolated = options.app_listens != UNPROTECTED
    if options.command is not None:
        command, app = options.command, None
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(command) if f is not None}
        except ValueError as exc:
            raise UsageError(f"--command: {exc} (write literal braces as {{{{ and }}}})") from None
        if not {"port", "socket"} & fields or {"port", "socket"} <= fields:
            raise UsageError("--command must contain {socket} (a Unix socket the app serves on: only the agent "
                             "reaches it) or {port} (a loopback port the agent picks), one of them")
        allowed = {"port", "host", "socket"}
        if options.tls and not isolated:
            allowed |= {"certfile", "keyfile"}
        if fields - allowed:
            raise UsageError(f"--command: unknown placeholder {{{sorted(fields - allowed)[0]}}}; only "
                             + ", ".join(f"{{{f}}}" for f in sorted(allowed)) + " are filled in")
        if options.tls and not isolated and not {"certfile", "keyfile"} <= fields:
            raise UsageError("--tls with --command: pass {certfile} and {keyfile} to your app so it serves HTTPS")
        if "socket" in fields and not isolated:
            raise UsageError(f"--command with {{socket}}: this site runs apps with app-listens = {UNPROTECTED}")
    else:
        name = options.app or options.jupyter or "lab"
        if options.jupyter and options.jupyter not in ("lab", "notebook", "voila"):
            raise UsageError("--jupyter is lab, notebook or voila")
        if name not in APPS:
            raise UsageError(f"--app {name!r}: choose from {', '.join(sorted(APPS))}, or give --command")
        command, app = APPS[name].command, name
        if isolated and APPS[name].socket_command:
            command = APPS[name].socket_command
        if name in ("lab", "notebook") and os.geteuid() == 0:
            command += " --allow-root"              # jobs run as the launching user; Jupyter refuses root without it
        if options.tls and isolated:
            pass                                    # the agent's gate speaks TLS to satellite already
        elif options.tls:
            if name not in ("lab", "notebook", "voila"):
                raise UsageError(f"--tls: {name} is not known to serve HTTPS here; use --command with "
                                 "{certfile} and {keyfile}")
            command += " --certfile={certfile} --keyfile={keyfile}"
    if options.sif:
        command = container_prefix(options) + " " + command
    scheduler = find_scheduler(options.scheduler, need_cli)
    time_limit = parse_time_limit(options.time_limit or "1:00:00")
    memory = parse_memory_gb(options.memory) if options.memory is not None else None
    options = dataclasses.replace(options, **{name: positive_int(name, getattr(options, name))
                                              for name in ("nodes", "ntasks_per_node", "cpus_per_task", "gpus")
                                              if getattr(options, name) is not None})
    if options.cacert and not os.path.isfile(options.cacert):
        raise UsageError(f"--cacert {options.cacert}: no such file")
    workdir = options.workdir or os.getcwd()
    if not os.path.isdir(workdir):
        raise UsageError(f"--workdir {printable(workdir)}: no such directory")
    check_directive_values(options, scheduler)
    check_script_values(options, workdir)
    if options.venv and not os.path.isfile(os.path.join(options.venv, "bin", "activate")):
        raise UsageError(f"--venv {options.venv}: no bin/activate there")
    if (options.nv or options.rocm or options.bind) and not options.sif:
        raise UsageError("--bind, --nv and --rocm go with --sif IMAGE")
    if options.nv and options.rocm:
        raise UsageError("choose --nv (NVIDIA) or --rocm (AMD), not both")
    if options.connect is not None and options.connect not in CONNECT_MODES:
        raise UsageError(f"connect {options.connect!r}: choose direct, tunnel or auto")
    scheduler.check(options)
    return Plan(options, scheduler, time_limit, memory, command, app, workdir,
                options.python or sys.executable or "python3")


# Option values that become scheduler directives (or lines of HTCondor's submit description) are read by the
# scheduler's own parser, line by line and word by word, and the script is read by bash: a newline, a quote, a
# space or a bracket would end the value and start something else. Only these characters are allowed.
DIRECTIVE_VALUES = {
    "names": (re.compile(r"[A-Za-z0-9_.,:@-]{1,128}"), "letters, digits and _ . , : @ -"),
    "constraint": (re.compile(r"[A-Za-z0-9_.,:@&|!*()<>=-]{1,256}"), "letters, digits and _ . , : @ & | ! * ( ) < > = -"),
}
DIRECTIVE_PATH = re.compile(r"[A-Za-z0-9_.,:@+=/-]{1,1024}")


def check_directive_values(options: LaunchOptions, scheduler: "Scheduler") -> None:
    """UsageError for a value that could break out of its directive (checked for every scheduler: a profile
    or site config may be used with another one later)."""
    for name in ("account", "partition", "qos", "reservation", "gres", "constraint"):
        value = getattr(options, name)
        if value is None:
            continue
        shape, allowed = DIRECTIVE_VALUES["constraint" if name == "constraint" else "names"]
        if not shape.fullmatch(str(value)):
            raise UsageError(f"--{name} {printable(repr(value))}: use only {allowed} (the value goes into a "
                             "scheduler directive, where other characters would end it)")
    if scheduler.name != "local" and not DIRECTIVE_PATH.fullmatch(str(SessionDir.root())):
        raise UsageError(f"the session directory {printable(repr(str(SessionDir.root())))} goes into the job's "
                         "directives (its log), which allow only letters, digits and _ . , : @ + = / - in paths; "
                         "set HOME to a directory with a plain name")


def check_script_values(options: LaunchOptions, workdir: str) -> None:
    """UsageError naming the setting whose value holds a control character: one check for every setting,
    from the command line, a profile or a config file, and for the working directory. Quoting keeps bash
    safe, but a newline inside a quoted value still starts a line of job.sh of its own, and Grid Engine reads
    '#$' lines anywhere in the script: --conda-env 'x<newline>#$ -v BASH_ENV=...' set the job's options."""
    for name, value in dict(options.given(), workdir=workdir).items():
        if re.search(r"[\x00-\x1f\x7f]", str(value)):
            what = ("the working directory" if name == "workdir" and not options.workdir
                    else f"--{name.replace('_', '-')}")
            raise UsageError(f"{what} {printable(repr(value))[:200]}: holds control characters (a newline would "
                             "start a line of the batch script of its own, which Grid Engine reads as a directive)"
                             + ("; launch from another directory" if what == "the working directory" else ""))


PATH_OPTIONS = ("cacert", "venv", "sif", "workdir")


def with_absolute_paths(options: LaunchOptions) -> LaunchOptions:
    """Paths made absolute against the directory the user gave them in: the job starts elsewhere (the
    workdir, often a shared one where others can plant files), and list/status run from anywhere.
    --python too when it is a path (a bare name is looked up on the job's PATH)."""
    paths = {name: os.path.abspath(os.path.expanduser(getattr(options, name)))
             for name in PATH_OPTIONS if getattr(options, name)}
    if options.python and "/" in options.python:
        paths["python"] = os.path.abspath(os.path.expanduser(options.python))
    return dataclasses.replace(options, **paths)


def check_satellite_url(url: Optional[str]) -> None:
    if not url:
        raise UsageError("where is satellite? give --satellite https://manage.<domain>, set SATELLITE_URL, "
                         f"or ask your admins for a site config ({SITE_CONFIG})")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise UsageError(f"--satellite {url!r}: give an https:// URL")


def literal(text: str) -> str:
    """A path for the app's command template: shell-quoted, braces doubled so the agent's format() leaves
    them as the user wrote them."""
    return shlex.quote(text).replace("{", "{{").replace("}", "}}")


def container_prefix(options: LaunchOptions) -> str:
    """Apptainer or Singularity, whichever the node has, found at run time by the agent."""
    parts = ["{container}", "exec"]
    for path in filter(None, (options.bind or "").split(",")):
        parts += ["--bind", literal(path.strip())]
    if options.nv:
        parts.append("--nv")
    if options.rocm:
        parts.append("--rocm")
    parts.append(literal(options.sif))
    return " ".join(parts)


###############################################################################
# 3. Satellite API
###############################################################################

class SniHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to satellite's own address, naming another host (a session alias) in SNI and Host.
    Session hosts are served by the same satellite, so the client needs no DNS for aliases."""

    def __init__(self, connect_to: tuple, host: str, port: int, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, context=context, timeout=timeout)
        self.connect_to = connect_to

    def connect(self):
        sock = socket.create_connection(self.connect_to, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class SatelliteApi:
    def __init__(self, url: str, cacert: Optional[str], timeout: float = 20.0):
        parsed = urllib.parse.urlsplit(url)
        self.url = url.rstrip("/")
        self.address = (parsed.hostname, parsed.port or 443)
        self.context = ssl.create_default_context(cafile=cacert) if cacert else ssl.create_default_context()
        self.timeout = timeout

    def call(self, endpoint: str, **params) -> dict:
        """POST /api/<endpoint> (secrets in the body, not the URL); the JSON reply, or Failure."""
        body = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        conn = SniHTTPSConnection(self.address, self.address[0], self.address[1], self.context, self.timeout)
        try:
            conn.request("POST", f"/api/{endpoint}", body=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded",
                                  "Accept": "application/json", "User-Agent": f"satellite-client/{__version__}"})
            sock = conn.sock                               # getresponse may let go of it (Connection: close)
            resp = conn.getresponse()
            data = self.read_reply(sock, resp)
        except ssl.SSLCertVerificationError as exc:
            raise Unreachable(self.untrusted(exc)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"cannot reach satellite at {self.url}: {exc}") from None
        finally:
            conn.close()
        reply = json_object(data)
        if reply is None:
            raise Failure(f"satellite at {self.url} answered {resp.status} with something that is not a JSON object")
        if resp.status >= 400:
            raise ApiRefused(resp.status, reply.get("error", "refused"))
        return reply

    def untrusted(self, exc: ssl.SSLCertVerificationError) -> str:
        return (f"cannot reach satellite at {self.url}: its certificate is not trusted here "
                f"({exc.verify_message or exc}); check --cacert (or $SATELLITE_CACERT, or cacert in the site "
                f"config {SITE_CONFIG}): it must name the CA that signed satellite's certificate")

    def read_reply(self, sock: socket.socket, resp: http.client.HTTPResponse) -> bytes:
        """The reply's body, whole within the call's timeout and MAX_REPLY bytes: a satellite that
        trickles or floods its answer gets no more of the login node than a silent one."""
        deadline, data = time.monotonic() + self.timeout, b""
        while len(data) <= MAX_REPLY:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure(f"satellite at {self.url} did not finish its answer within {self.timeout:.0f}s")
            sock.settimeout(remaining)
            chunk = resp.read1(MAX_REPLY + 1 - len(data))
            if not chunk:
                return data
            data += chunk
        raise Failure(f"satellite at {self.url} answered with more than {MAX_REPLY} bytes")

    def open_tunnel(self, key: str, attach: int) -> tuple:
        """Ask satellite to carry the session over a new connection: (TLS socket, bytes already read
        past the 101 answer). The key goes in a header, never in a URL; `attach` must grow each time."""
        host = self.address[0]
        request = (f"GET /api/tunnel HTTP/1.1\r\nHost: {host}:{self.address[1]}\r\n"
                   f"Connection: Upgrade\r\nUpgrade: {TUNNEL_PROTOCOL}\r\nAuthorization: Bearer {key}\r\n"
                   f"Satellite-Tunnel-Attach: {attach}\r\nUser-Agent: satellite-client/{__version__}\r\n\r\n")
        try:
            raw = socket.create_connection(self.address, self.timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # frames go out at once (no Nagle wait)
            sock = self.context.wrap_socket(raw, server_hostname=host)
            sock.sendall(request.encode())
            received = b""
            while b"\r\n\r\n" not in received:
                data = sock.recv(65536)
                if not data or len(received) > 65536:
                    raise ConnectionError("satellite closed the connection before answering")
                received += data
        except ssl.SSLCertVerificationError as exc:
            raise Unreachable(self.untrusted(exc)) from None
        except OSError as exc:
            raise Unreachable(f"cannot open a tunnel to satellite at {self.url}: {exc}") from None
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            sock.close()
            raise Failure(f"satellite at {self.url} answered {status_line!r}")
        if parts[1] != "101":
            sock.close()
            raise ApiRefused(int(parts[1]), str((json_object(rest) or {}).get("error", status_line)))
        sock.settimeout(None)
        return sock, rest

    def satellite_addresses(self) -> list:
        """The addresses satellite's name resolves to here: where its connections to this node come from."""
        try:
            return [plain_address(info[4][0]) for info in socket.getaddrinfo(*self.address, type=socket.SOCK_STREAM)]
        except OSError:
            return []

    def local_address(self) -> str:
        """The address this host uses to reach satellite: what satellite will map a redeem to."""
        with socket.create_connection(self.address, self.timeout) as sock:
            return sock.getsockname()[0]

    def probe_link(self, url: str) -> int:
        """Status of the session link through satellite (503 = status page, app not answering yet), asked
        with no token in a URL: an app that logs its request lines (http.server, into the job log) would log
        the live token at every probe. The token goes in a header to satellite's own status path, which
        never reaches the app, and answers with satellite's cookie (an HMAC, not the token, and removed from
        what the app is sent); the cookie opens the link's path. Without a cookie (a refusal): that answer."""
        parsed = urllib.parse.urlsplit(url)
        token = urllib.parse.parse_qs(parsed.query).get("token", [""])[0]
        conn = SniHTTPSConnection(self.address, parsed.hostname, parsed.port or 443, self.context, self.timeout)
        try:
            conn.request("GET", STATUS_PATH, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            resp.read()
            cookies = [c.split(";", 1)[0] for c in resp.headers.get_all("Set-Cookie") or ()
                       if c.split("=", 1)[0].strip() == COOKIE_NAME]
            if not cookies:
                return resp.status
            conn.request("GET", parsed.path or "/", headers={"Cookie": cookies[0]})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()


def json_object(data: bytes) -> Optional[dict]:
    """A reply's body as a JSON object, or None for anything else: not JSON, not an object, or nested deeper
    than the parser recurses (60,000 '[' fit in MAX_REPLY and raise RecursionError, not ValueError)."""
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return reply if isinstance(reply, dict) else None


def who_asks() -> dict:
    """getlink's fields that say who asks for a link, so satellite rations links per user instead of per
    login node: the login name of this process's real user (a claim), and where munge is installed a
    MUNGE credential that proves it (satellite checks it with unmunge). Read from munge's output,
    never put on a command line."""
    fields = {"user": pwd.getpwuid(os.getuid()).pw_name}
    if shutil.which("munge"):
        try:
            made = subprocess.run(["munge", "-n"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return fields
        if made.returncode == 0 and made.stdout.startswith("MUNGE:"):
            fields["munge"] = made.stdout.strip()
    return fields


class Unreachable(Failure):
    pass


# What satellite's replies must look like before any field touches a path, a script, a directive or a terminal:
# a compromised proxy node must not get code execution on the accounts of the users who launch.
SECRET_SHAPE = re.compile(r"[A-Za-z0-9_-]{32,128}")            # secrets.token_urlsafe(32): 43 characters
DOMAIN_SHAPE = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
LINK_SHAPE = re.compile(r"https://(?P<alias>[a-z-]+)\.(?P<domain>" + DOMAIN_SHAPE + r")(?::(?P<port>[0-9]{1,5}))?"
                        r"/\?token=(?P<token>[A-Za-z0-9_-]+)")
ISO_TIME = "%Y-%m-%dT%H:%M:%SZ"


UPSTREAM_PROOF_SHAPE = re.compile(r"^[0-9a-f]{64}\Z")


class BadReply(Failure):
    """A reply field that is not what satellite issues: refused before it is used anywhere."""

    def __init__(self, field: str, value, expected: str):
        shown = printable(repr(value))
        super().__init__(f"satellite's reply: {field} {shown[:120]} is not {expected}; refused (is satellite "
                         "misconfigured, or not satellite? tell your admins)")


def reply_field(reply: dict, field: str, shape: re.Pattern, expected: str) -> str:
    value = reply.get(field)
    if not isinstance(value, str) or not shape.fullmatch(value):
        raise BadReply(field, value, expected)
    return value


def checked_expiry(reply: dict) -> float:
    value = reply.get("expires")
    try:
        return calendar.timegm(time.strptime(value, ISO_TIME))
    except (TypeError, ValueError):
        raise BadReply("expires", value, "a time like 2026-11-25T10:00:00Z") from None


def checked_link(reply: dict) -> dict:
    """getlink's reply, every field checked: alias (three words), token and key (URL-safe base64),
    url = https://<alias>.<domain>[:port]/?token=<the token>, state queued, expires a time."""
    alias = reply_field(reply, "alias", ALIAS_SHAPE, "an alias of three words (like fresh-askew-depict)")
    token = reply_field(reply, "token", SECRET_SHAPE, "a token (32-128 of A-Z a-z 0-9 _ -)")
    key = reply_field(reply, "key", SECRET_SHAPE, "a key (32-128 of A-Z a-z 0-9 _ -)")
    url = reply.get("url")
    match = LINK_SHAPE.fullmatch(url) if isinstance(url, str) else None
    if not match or match["alias"] != alias or match["token"] != token or not 0 < int(match["port"] or 443) < 65536:
        raise BadReply("url", url, f"https://{alias}.<domain>[:port]/?token=<the token issued>")
    if reply.get("state") != "queued":
        raise BadReply("state", reply.get("state"), "queued (a new link)")
    checked_expiry(reply)
    return {"alias": alias, "token": token, "key": key, "url": url}


def checked_status(reply: dict) -> tuple:
    """/api/status's reply: (state, expiry as epoch seconds)."""
    state = reply.get("state")
    if state not in SESSION_STATES:
        raise BadReply("state", state, "a session state (" + ", ".join(SESSION_STATES) + ")")
    return state, checked_expiry(reply)


class ApiRefused(Failure):
    def __init__(self, status: int, reason: str):
        super().__init__(f"satellite refused: {reason} ({status})")
        self.status = status
        self.reason = reason


###############################################################################
# 4. Sessions
###############################################################################

class SessionDir:
    """~/.satellite/sessions/<alias>/: session.json (no secrets), secrets (0600), job.sh, job.log."""

    def __init__(self, path: Path):
        self.path = path
        self.alias = path.name

    @classmethod
    def root(cls) -> Path:
        return Path.home() / SESSION_ROOT

    @classmethod
    def create(cls, alias: str) -> "SessionDir":
        root = cls.root()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root.parent, 0o700)
        os.chmod(root, 0o700)
        path = root / alias
        path.mkdir(mode=0o700)
        return cls(path)

    @classmethod
    def find(cls, alias: str) -> "SessionDir":
        path = cls.root() / alias
        if not re.fullmatch(r"[a-z]+(-[a-z]+)*", alias) or not (path / "session.json").exists():
            raise UsageError(f"no session {alias!r} here (see: satellite-client list)")
        return cls(path)

    @classmethod
    def all(cls) -> list:
        root = cls.root()
        if not root.is_dir():
            return []
        return [cls(p) for p in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime)
                if (p / "session.json").exists()]

    def write_secrets(self, token: str, key: str, url: str) -> None:
        fd = os.open(self.path / "secrets", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"token": token, "key": key, "url": url}))

    def secrets(self) -> dict:
        return json.loads((self.path / "secrets").read_text())

    def info(self) -> dict:
        return json.loads((self.path / "session.json").read_text())

    def save_info(self, info: dict) -> None:
        tmp = self.path / "session.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(self.path / "session.json")

    @property
    def script(self) -> Path:
        return self.path / "job.sh"

    @property
    def log(self) -> Path:
        return self.path / "job.log"

    def log_tail(self, lines: int = 15, most: int = LOG_TAIL_BYTES) -> str:
        """The job log's last lines, from at most its last `most` bytes: anyone who can write to the log can
        make it as large as the disk, and only its end is shown. A line cut by the window is left out (unless
        the window holds no whole line: then its end is shown)."""
        try:
            with open(self.log, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(0, size - most))
                data = log.read(most)
        except OSError:
            return ""
        if size > most and b"\n" in data[:-1]:
            data = data.partition(b"\n")[2]
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def save_end_reason(self, reason: str) -> None:
        """The agent's one line on why it stopped (end_reason), for list, status and --wait."""
        try:
            (self.path / "end_reason").write_text(printable(reason)[:300] + "\n")
        except OSError:
            pass

    def end_reason(self) -> Optional[str]:
        try:
            return printable((self.path / "end_reason").read_text().strip()[:300]) or None
        except OSError:
            return None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


###############################################################################
# 5. Schedulers
###############################################################################

# The environment jobs are submitted with: what a job needs to find its tools (modules, locale) and what the
# scheduler's CLI needs to find its cluster, nothing else of the environment satellite-client runs in, which
# may hold other programs' secrets (a launch from a Jupyter terminal has its server's token). Slurm and LSF
# copy the CLI's environment into the job; HTCondor's getenv would put it in the job's ClassAd, readable by
# every user (condor_q -l).
JOB_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
                   "MODULEPATH", "MODULESHOME")
JOB_ENVIRONMENT_PREFIXES = ("LC_", "LMOD", "BASH_FUNC_module", "BASH_FUNC_ml", "SLURM_", "SBATCH_", "PBS_",
                            "LSF_", "LSB_", "SGE_", "CONDOR_", "_CONDOR_")


def job_environment() -> dict:
    return {name: value for name, value in os.environ.items()
            if (name in JOB_ENVIRONMENT or name.startswith(JOB_ENVIRONMENT_PREFIXES)) and name not in SECRET_VARIABLES}


def run(argv: list, stdin: Optional[str] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """A scheduler CLI (or openssl), with the job environment."""
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=job_environment())
    except FileNotFoundError:
        raise Failure(f"{argv[0]} not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise Failure(f"{argv[0]} did not answer within {timeout:.0f}s") from None


class Scheduler:
    """One batch system, read like a table row:

    prefix        the directive prefix in the script (#SBATCH, #PBS, ...)
    options       option -> directive template ("{}" is the value); options missing here
                  cannot be expressed, and check() refuses them before anything is contacted
    directives()  the whole directive block; submit(), query() and cancel() run the CLIs
    """
    name = ""
    prefix = ""
    cli = ""                      # presence on PATH means this scheduler is here
    options: dict = {}

    def directives(self, plan: Plan, session: Path, alias: str) -> list:
        return [f"{self.prefix} {line}" for line in self.fixed(plan, session, alias) + self.option_lines(plan)]

    def check(self, options: LaunchOptions) -> None:
        """UsageError for a given option this scheduler cannot express (no row in its table)."""
        for option in options.given():
            if option in SCHEDULER_OPTIONS and self.options.get(option) is None:
                raise UsageError(f"--{option.replace('_', '-')} cannot be expressed for {self.name}"
                                 + self.hint(option))

    def option_lines(self, plan: Plan) -> list:
        """The table rows for the options given (check() has refused the others). An empty
        template: the option is rendered by fixed(), with others (PBS's select, LSF's -n)."""
        return [self.options[option].format(value) for option, value in plan.options.given().items()
                if option in SCHEDULER_OPTIONS and self.options[option]]

    def hint(self, option: str) -> str:
        return ""

    def fixed(self, plan: Plan, session: Path, alias: str) -> list:
        return []

    def submit(self, session: SessionDir) -> str:
        raise NotImplementedError

    def query(self, jobid: str) -> str:
        raise NotImplementedError

    def status(self, jobid: str) -> "JobStatus":
        """The state, and where the CLI tells them, why the job waits and its time left."""
        return JobStatus(self.query(jobid))

    def never_starts(self, reason: str) -> Optional[str]:
        """Advice if the scheduler's pending reason is one that never clears by itself, else None."""
        return None

    def cancel(self, jobid: str) -> None:
        raise NotImplementedError

    @staticmethod
    def parse_jobid(pattern: str, result: subprocess.CompletedProcess, cli: str) -> str:
        """The job id in the CLI's answer; it must look like one, since it goes on later command lines."""
        match = re.search(pattern, result.stdout) if result.returncode == 0 else None
        if not match:
            detail = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
            raise Failure(f"{cli} failed: {detail}")
        if not JOBID_SHAPE.fullmatch(match.group(1)):
            raise Failure(f"{cli} answered job id {match.group(1)!r}, which does not look like one")
        return match.group(1)


@dataclasses.dataclass
class JobStatus:
    state: str                          # one of JOB_STATES
    reason: str = ""                    # why it waits, in the scheduler's words (Slurm's %r), while it waits
    time_left: Optional[int] = None     # seconds: left while it runs, asked for while it waits (None: not told)


JOBID_SHAPE = re.compile(r"[0-9][A-Za-z0-9._@\[\]-]{0,127}")   # 4242, 4242.server, 4242[].server

# options that become scheduler directives (memory and time are rendered by each scheduler)
SCHEDULER_OPTIONS = ("account", "partition", "qos", "reservation", "nodes", "ntasks_per_node",
                     "cpus_per_task", "memory", "gpus", "gres", "constraint")


def warning_seconds(time_limit: int) -> int:
    """How long before the time limit the job asks its scheduler for a warning signal, SIGUSR1 (Slurm --signal,
    Grid Engine s_rt + -notify, LSF -wa/-wt), so the agent releases the link and stops the app before the
    kill: a minute, or a quarter of a short job."""
    return min(60, time_limit // 4)


def memory_text(mb: int, giga: str, mega: str) -> str:
    return f"{mb // 1024}{giga}" if mb % 1024 == 0 else f"{mb}{mega}"


class Slurm(Scheduler):
    name, prefix, cli = "slurm", "#SBATCH", "sbatch"
    options = {"account": "--account={}", "partition": "--partition={}", "qos": "--qos={}",
               "reservation": "--reservation={}", "nodes": "--nodes={}", "ntasks_per_node": "--ntasks-per-node={}",
               "cpus_per_task": "--cpus-per-task={}", "memory": "", "gpus": "--gpus={}", "gres": "--gres={}",
               "constraint": "--constraint={}"}

    def fixed(self, plan, session, alias):
        lines = [f"--job-name=satellite-{alias}", f"--output={session / 'job.log'}",
                 f"--time={limit_text(plan.time_limit)}", "--no-requeue"]
        if warning_seconds(plan.time_limit):
            lines.append(f"--signal=B:USR1@{warning_seconds(plan.time_limit)}")    # to the agent, before the limit
        if plan.memory_mb:
            lines.append(f"--mem={memory_text(plan.memory_mb, 'G', 'M')}")
        return lines

    def submit(self, session):
        result = run(["sbatch", "--parsable", str(session.script)])
        return self.parse_jobid(r"^([0-9]+)", result, "sbatch")

    STATES = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "RUNNING": "running",
              "COMPLETING": "running", "SUSPENDED": "held", "COMPLETED": "completed", "CANCELLED": "cancelled",
              "FAILED": "failed", "TIMEOUT": "timeout", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed",
              "PREEMPTED": "failed", "BOOT_FAIL": "failed", "DEADLINE": "timeout"}

    # pending reasons that never clear by themselves (the job asks more than a limit allows any one job),
    # with what to do instead; other reasons (Resources, Priority, ReqNodeNotAvail, ...) are shown and waited on,
    # PartitionConfig too: Slurm gives it for a second before PartitionTimeLimit (checked with 22.05)
    NEVER_STARTS = (
        (re.compile(r"PartitionTimeLimit"), "the time limit is longer than the partition allows: give a shorter "
                                            "--time-limit or another --partition (sinfo -o '%P %l' lists the limits)"),
        (re.compile(r"PartitionNodeLimit"), "more nodes than the partition allows: fewer --nodes, or another "
                                            "--partition"),
        (re.compile(r"QOSMax\w*PerJob\w*|QOSMin\w*|InvalidQOS"), "more (or less) than your QOS allows one job: "
                                                                "change the request or --qos (sacctmgr show qos)"),
        (re.compile(r"AssocMax\w*PerJob\w*|AssocGrp\w*MinutesLimit|InvalidAccount"),
         "your account's limits refuse it: change the request or --account, or ask your admins "
         "(sacctmgr show assoc user=$USER)"),
    )

    def status(self, jobid):
        # -t all: a finished job too (squeue -j alone prints nothing for it, until MinJobAge)
        result = run(["squeue", "-h", "-t", "all", "-j", jobid, "-o", "%T|%r|%L|%l"], timeout=30)
        if result.returncode != 0 and "Invalid job id" not in result.stderr:
            return JobStatus("unknown")                 # an unreachable controller is not a dead job
        line = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
        if not line:
            return self.accounted(jobid)
        state, reason, left, limit = (line.split("|") + ["", "", ""])[:4]
        state = "held" if state == "PENDING" and reason.startswith("JobHeld") else \
            self.STATES.get(state.rstrip("+"), "unknown")
        waiting = state in ("pending", "held")
        return JobStatus(state, reason if waiting and reason != "None" else "",
                         scheduler_seconds(limit if waiting else left) if state in ("pending", "held", "running")
                         else None)

    def accounted(self, jobid: str) -> JobStatus:
        """A job squeue has forgotten (after MinJobAge): its outcome from sacct, where accounting is kept."""
        if not shutil.which("sacct"):
            return JobStatus("done")
        result = run(["sacct", "-n", "-X", "-P", "-j", jobid, "-o", "State"], timeout=30)
        words = result.stdout.split() if result.returncode == 0 else []
        return JobStatus(self.STATES.get(words[0].rstrip("+"), "done") if words else "done")

    def query(self, jobid):
        return self.status(jobid).state

    def never_starts(self, reason):
        return next((advice for shape, advice in self.NEVER_STARTS if shape.search(reason)), None)

    def cancel(self, jobid):
        run(["scancel", jobid])


class Pbs(Scheduler):
    """PBS Pro / OpenPBS / Torque with select syntax."""
    name, prefix, cli = "pbs", "#PBS", "qsub"
    options = {"account": "-A {}", "partition": "-q {}", "nodes": "", "ntasks_per_node": "", "cpus_per_task": "",
               "memory": "", "gpus": ""}

    def hint(self, option):
        return {"reservation": " (submit to the reservation's queue: --partition R1234)",
                "gres": " (use --gpus)", "constraint": " (ask your admins for the resource name)"}.get(option, "")

    def fixed(self, plan, session, alias):
        opts = plan.options
        select = f"select={opts.nodes or 1}:ncpus={(opts.ntasks_per_node or 1) * (opts.cpus_per_task or 1)}"
        if opts.ntasks_per_node:
            select += f":mpiprocs={opts.ntasks_per_node}"
        if plan.memory_mb:
            select += f":mem={memory_text(plan.memory_mb, 'gb', 'mb')}"
        if opts.gpus:
            select += f":ngpus={opts.gpus}"
        return [f"-N sat-{alias}"[:18], f"-o {session / 'job.log'}", "-j oe", "-r n",
                f"-l walltime={hms(plan.time_limit)}", f"-l {select}"]

    def submit(self, session):
        return self.parse_jobid(r"^(\S+)", run(["qsub", str(session.script)]), "qsub")

    STATES = {"Q": "pending", "W": "pending", "T": "pending", "H": "held", "S": "held", "U": "held",
              "R": "running", "E": "running", "B": "running", "F": "done", "C": "done", "X": "done"}

    def query(self, jobid):
        result = run(["qstat", "-f", jobid], timeout=30)
        if result.returncode != 0:
            return "done" if "Unknown Job Id" in result.stderr or "Job has finished" in result.stderr else "unknown"
        match = re.search(r"job_state = (\w)", result.stdout)
        if not match:
            return "unknown"
        if match.group(1) in ("F", "C"):
            exit_match = re.search(r"[Ee]xit_status = (-?\d+)", result.stdout)
            return ("failed" if exit_match.group(1) != "0" else "completed") if exit_match else "done"
        return self.STATES.get(match.group(1), "unknown")

    def cancel(self, jobid):
        run(["qdel", jobid])


class Lsf(Scheduler):
    name, prefix, cli = "lsf", "#BSUB", "bsub"
    options = {"account": "-P {}", "partition": "-q {}", "reservation": "-U {}", "nodes": "", "ntasks_per_node": "",
               "cpus_per_task": "", "memory": "", "gpus": '-gpu "num={}"', "constraint": '-R "select[{}]"'}

    def hint(self, option):
        return {"qos": " (LSF has no QOS; ask your admins which queue)", "gres": " (use --gpus)"}.get(option, "")

    def fixed(self, plan, session, alias):
        opts = plan.options
        per_node = (opts.ntasks_per_node or 1) * (opts.cpus_per_task or 1)
        lines = [f"-J satellite-{alias}", f"-o {session / 'job.log'}", f"-W {max(1, plan.time_limit // 60)}",
                 f"-n {(opts.nodes or 1) * per_node}"]
        if plan.time_limit >= 120:                  # SIGUSR1 a minute (-wt is in minutes) before the limit
            lines += ["-wa USR1", "-wt 1"]
        if opts.nodes:
            lines.append(f'-R "span[ptile={per_node}]"')
        if plan.memory_mb:
            lines.append(f'-R "rusage[mem={plan.memory_mb}MB]"')
            lines.append(f"-M {plan.memory_mb}MB")
        return lines

    def submit(self, session):
        # bsub reads #BSUB lines only from a script given on standard input
        result = run(["bsub"], stdin=session.script.read_text())
        return self.parse_jobid(r"Job <([0-9]+)>", result, "bsub")

    STATES = {"PEND": "pending", "WAIT": "pending", "PSUSP": "held", "USUSP": "held", "SSUSP": "held",
              "RUN": "running", "PROV": "running", "DONE": "completed", "EXIT": "failed", "UNKWN": "unknown",
              "ZOMBI": "unknown"}

    def query(self, jobid):
        result = run(["bjobs", "-noheader", "-o", "stat", jobid], timeout=30)
        text = (result.stdout + result.stderr).strip()
        if "is not found" in text:
            return "done"
        if result.returncode != 0 or not text:
            return "unknown"
        return self.STATES.get(text.split()[0], "unknown")

    def cancel(self, jobid):
        run(["bkill", jobid])


class HtCondor(Scheduler):
    """A submit description next to the script; directives go into the description."""
    name, prefix, cli = "htcondor", "", "condor_submit"
    options = {"cpus_per_task": "request_cpus = {}", "memory": "", "gpus": "request_gpus = {}",
               "account": "accounting_group = {}"}

    def hint(self, option):
        return " (HTCondor matches jobs to machines; ask your admins for a requirements expression)"

    def directives(self, plan, session, alias):
        return []                                   # the script itself carries none: they go in job.sub

    def description(self, plan: Plan, session: Path, alias: str) -> str:
        lines = [f"# Satellite session {alias}", f"executable = {session / 'job.sh'}",
                 f"output = {session / 'job.log'}", f"error = {session / 'job.log'}",
                 f"log = {session / 'condor.log'}", f"batch_name = satellite-{alias}",
                 # only these variables, named here, and never getenv: the ClassAd is readable by every user
                 f'environment = "{condor_environment()}"',
                 # the walltime: remove the job once it has run this long
                 f"periodic_remove = (JobStatus == 2) && (time() - EnteredCurrentStatus > {plan.time_limit})"]
        if plan.memory_mb:
            lines.append(f"request_memory = {plan.memory_mb} MB")
        lines += self.option_lines(plan)
        return "\n".join(lines) + "\nqueue\n"

    def submit(self, session):
        result = run(["condor_submit", str(session.path / "job.sub")])
        return self.parse_jobid(r"submitted to cluster ([0-9]+)", result, "condor_submit")

    STATES = {"1": "pending", "2": "running", "3": "cancelled", "4": "completed", "5": "held", "6": "running",
              "7": "held"}

    def query(self, jobid):
        result = run(["condor_q", jobid, "-af", "JobStatus"], timeout=30)
        if result.returncode != 0:
            return "unknown"
        text = result.stdout.strip()
        return self.STATES.get(text, "unknown") if text else "done"

    def cancel(self, jobid):
        run(["condor_rm", jobid])


def condor_environment() -> str:
    """The job's environment for HTCondor's submit description: the plain variables of the job environment
    (no scheduler settings, no shell functions), those whose values need no quoting there."""
    return " ".join(f"{name}={value}" for name, value in sorted(job_environment().items())
                    if name in JOB_ENVIRONMENT and DIRECTIVE_PATH.fullmatch(value))


class Sge(Scheduler):
    """Grid Engine (SGE, SoGE, UGE)."""
    name, prefix, cli = "sge", "#$", "qsub"
    options = {"account": "-P {}", "partition": "-q {}", "reservation": "-ar {}", "cpus_per_task": "",
               "ntasks_per_node": "", "memory": "", "gpus": "-l gpu={}"}

    def hint(self, option):
        return {"nodes": " (SGE places slots, not nodes: use --cpus-per-task)"}.get(option, "")

    def fixed(self, plan, session, alias):
        opts = plan.options
        slots = (opts.ntasks_per_node or 1) * (opts.cpus_per_task or 1)
        # no -wd: the script cds to the working directory itself (quoted; a directive cannot quote)
        lines = [f"-N satellite-{alias}", f"-o {session / 'job.log'}", "-j y", "-S /bin/bash", "-r n",
                 f"-l h_rt={hms(plan.time_limit)}"]
        warning = warning_seconds(plan.time_limit)
        if warning:                                 # SIGUSR1 at s_rt; -notify: SIGUSR2 before qdel's SIGKILL
            lines += [f"-l s_rt={hms(plan.time_limit - warning)}", "-notify"]
        if slots > 1:
            lines.append(f"-pe smp {slots}")
        if plan.memory_mb:
            per_slot = -(-plan.memory_mb // slots)          # h_vmem is per slot
            lines.append(f"-l h_vmem={memory_text(per_slot, 'G', 'M')}")
        return lines

    def submit(self, session):
        return self.parse_jobid(r"Your job ([0-9]+)", run(["qsub", str(session.script)]), "qsub")

    def query(self, jobid):
        result = run(["qstat", "-u", "*"], timeout=30)
        if result.returncode != 0:
            return "unknown"
        for line in result.stdout.splitlines():
            fields = line.split()
            if fields and fields[0] == jobid and len(fields) > 4:
                state = fields[4]
                if "E" in state:
                    return "failed"
                if "h" in state or "s" in state.lower():
                    return "held"
                return "running" if "r" in state or "t" in state else "pending"
        return "done"

    def cancel(self, jobid):
        run(["qdel", jobid])


class Local(Scheduler):
    """Runs the job as a background process on this machine: for demos, laptops and workstations.
    The time limit is enforced with `timeout`. The job id is PID@START, the process id and its start time
    (/proc/PID/stat), so a PID the system has given to another process since is never taken for the job."""
    name, prefix, cli = "local", "#", ""
    options = {}                                    # the job runs on this machine as it is: no directives

    def submit(self, session):
        info = session.info()
        argv = ["bash", str(session.script)]
        if shutil.which("timeout"):
            argv = ["timeout", "--signal=TERM", "--kill-after=30", str(info["time_limit"])] + argv
        with open(session.log, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, cwd=info["workdir"], env=job_environment())
        return f"{proc.pid}@{process_start(proc.pid)}"

    def query(self, jobid):
        return "running" if job_process(jobid) else "done"

    def cancel(self, jobid):
        """SIGTERM to the job's first process (timeout passes it to the job; the agent releases the link and
        stops the app), through a pidfd opened and then checked, so the signal reaches that process or none."""
        pid = job_process(jobid)
        if pid is None:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError:                             # a kernel before 5.3 (RHEL 8): checked just before, then kill
            if job_process(jobid) == pid:
                os.kill(pid, signal.SIGTERM)
            return
        try:
            if job_process(jobid) == pid:           # still the job now that the pidfd holds it
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)


def process_start(pid: int) -> Optional[str]:
    """When the process started (clock ticks after boot: /proc/PID/stat field 22), None if there is no
    such process or it is a zombie (ended, not yet collected)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()     # after the command name, which may hold spaces
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def job_process(jobid: str) -> Optional[int]:
    """The local job's process id while that process is still the job, else None."""
    match = re.fullmatch(r"([0-9]+)@([0-9]+)", jobid)
    if not match:
        raise Failure(f"local job id {jobid!r} is not PID@START (made by an older satellite-client?)")
    pid = int(match.group(1))
    return pid if process_start(pid) == match.group(2) else None


SCHEDULERS = {cls.name: cls for cls in (Slurm, Pbs, Lsf, HtCondor, Sge, Local)}


def detect_scheduler() -> str:
    """From the CLIs on PATH: sbatch, bsub, condor_submit, qsub (SGE if qconf is there too), else local."""
    if shutil.which("sbatch"):
        return "slurm"
    if shutil.which("bsub"):
        return "lsf"
    if shutil.which("condor_submit"):
        return "htcondor"
    if shutil.which("qsub"):
        return "sge" if shutil.which("qconf") else "pbs"
    return "local"


def find_scheduler(name: Optional[str], need_cli: bool = True) -> Scheduler:
    name = name or detect_scheduler()
    if name not in SCHEDULERS:
        raise UsageError(f"--scheduler {name!r}: choose from {', '.join(SCHEDULER_NAMES)}")
    scheduler = SCHEDULERS[name]()
    if need_cli and scheduler.cli and not shutil.which(scheduler.cli):
        raise UsageError(f"--scheduler {name}: {scheduler.cli} is not on PATH here")
    return scheduler


###############################################################################
# 6. Batch script
###############################################################################

def client_path() -> str:
    """This program as the job should run it: the archive it was imported from, whatever its name
    (`install -m 0755 dist/satellite-client.pyz /usr/local/bin/satellite-client`, a link to it), or
    this source file. The zip importer knows its archive; a name ending in .pyz is not required."""
    archive = getattr(__loader__, "archive", None)
    return str(Path(archive or __file__).resolve())


def render_script(plan: Plan, session: Path, alias: str) -> str:
    options = plan.options
    lines = ["#!/bin/bash"] + plan.scheduler.directives(plan, session, alias)
    lines += ["", f"# Satellite session {alias}. The link's secrets stay in {session}/secrets (mode 0600);",
              "# the agent reads them, starts the app, redeems the link, and releases it when the job ends."]
    setup = []
    if options.env_modules:
        setup.append("module load " + " ".join(shlex.quote(m) for m in options.env_modules.split(",") if m))
    if options.conda_env:
        setup.append('eval "$(conda shell.bash hook)"')
        setup.append(f"conda activate {shlex.quote(options.conda_env)}")
    if options.venv:
        setup.append(f"source {shlex.quote(os.path.join(options.venv, 'bin', 'activate'))}")
    setup.append(f"cd {shlex.quote(plan.workdir)}")
    lines += ["set -e"] + setup
    lines.append(f"exec {shlex.quote(plan.python)} {shlex.quote(client_path())} agent {shlex.quote(str(session))} "
                 f"--command {shlex.quote(plan.command)}")
    return "\n".join(lines) + "\n"


###############################################################################
# 7. Agent
###############################################################################

class StopFlag:
    """Set by a signal (scancel, time limit, Ctrl-C). Handlers only record it: raising from a
    handler could land inside Popen() after the fork and orphan the app."""

    def __init__(self):
        self.signum: Optional[int] = None
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, self.set)

    def set(self, signum, _frame=None) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    def pause(self, seconds: float) -> None:
        """Sleep, waking early if stopped."""
        deadline = time.monotonic() + seconds
        while not self and time.monotonic() < deadline:
            time.sleep(min(0.2, deadline - time.monotonic()))


def say(text: str) -> None:
    print(f"satellite-agent: {printable(text)}", flush=True)


def free_port(host: str) -> int:
    """A port that was free a moment ago: only for apps that must take a TCP port themselves. What the app
    then listens on is checked to be its own (`listener_is_ours`): another user may bind it first."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def listening_inodes(port: int) -> set:
    """Socket inodes listening on TCP `port`, any address (/proc/net/tcp and tcp6: every user sees them)."""
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def process_tree(pid: int) -> set:
    """`pid` and its descendants (from /proc/*/stat's parent field)."""
    parents: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in tree:
            tree.add(current)
            todo.extend(parents.get(current, ()))
    return tree


def listener_is_ours(port: int, pid: int) -> Optional[bool]:
    """Does a process of `pid`'s tree hold the socket listening on `port`? None: nobody listens there yet;
    False: somebody else does (a squatter, or a leftover: never redeem the link to it)."""
    inodes = listening_inodes(port)
    if not inodes:
        return None
    for member in process_tree(pid):
        try:
            for fd in os.listdir(f"/proc/{member}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{member}/fd/{fd}")[len("socket:["):-1] in inodes:
                        return True
        except OSError:
            continue
    return False


@dataclasses.dataclass(frozen=True)
class AppAddress:
    """Where the agent reaches the app: a Unix socket in the session's 0700 directory (only this user,
    and root, can connect), or a port on the node's loopback (every user on the node can)."""
    path: str = ""
    host: str = LOOPBACK
    port: int = 0

    def __str__(self) -> str:
        return f"the Unix socket {self.path}" if self.path else f"{self.host}:{self.port}"

    def connect(self, timeout: float = 10) -> socket.socket:
        if self.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock


def app_is_listening(where: AppAddress, proc: subprocess.Popen, verify: bool) -> Optional[bool]:
    """True: the app (and nobody else) listens at `where`; None: not yet; False: somebody else does."""
    if where.path:
        try:
            st = os.lstat(where.path)
        except OSError:
            return None
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            return False
        try:
            where.connect(1).close()
            return True
        except OSError:
            return None
    if verify:
        return listener_is_ours(where.port, proc.pid)
    try:
        socket.create_connection((where.host, where.port), timeout=1).close()   # the old, unverified way
        return True
    except OSError:
        return None


def wait_until_listening(where: AppAddress, proc: subprocess.Popen, timeout: float, stop: StopFlag,
                         verify: bool = True) -> Optional[bool]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not stop:
        listening = app_is_listening(where, proc, verify)
        if listening is not None:
            return listening
        stop.pause(0.1)
    return None


def with_retries(action, what: str, stop: StopFlag, attempts: int = 8, final: tuple = ()):
    """Retry transient failures (unreachable, 5xx, 429) with backoff; refusals (and `final` statuses) are final."""
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except ApiRefused as exc:
            if (exc.status < 500 and exc.status != 429) or exc.status in final:
                raise
            failure = exc
        except Unreachable as exc:
            failure = exc
        if attempt < attempts and not stop:
            say(f"{what} failed ({failure}); retrying in {delay:.0f}s")
            stop.pause(delay)
            delay = min(delay * 2, 30)
    raise failure


def make_certificate(session: SessionDir) -> tuple:
    """A self-signed key pair for the app (0600 key), and its SHA-256 fingerprint for satellite to pin."""
    cert, key = session.path / "app-cert.pem", session.path / "app-key.pem"
    old = os.umask(0o077)
    try:
        result = run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-days", "30", "-subj", "/CN=satellite-app", "-keyout", str(key), "-out", str(cert)])
    finally:
        os.umask(old)
    if result.returncode != 0:
        raise Failure(f"openssl could not make the app's certificate: {result.stderr.strip()[-300:]}")
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    return {"certfile": str(cert), "keyfile": str(key)}, fingerprint


def private_file(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600 from its creation: no moment with wider modes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def app_setup(session: SessionDir, info: dict, token: str) -> tuple:
    """(environment, files its command names, directory it starts in) for the session's app. A known app reads
    the token from its own config file and starts in that file's private directory; a --command app gets
    $SATELLITE_TOKEN and $SATELLITE_TOKEN_FILE (README) and starts in the working directory. Secrets in the
    environment the job started with are never passed on."""
    env = {name: value for name, value in os.environ.items() if name not in SECRET_VARIABLES}
    if info.get("app") is None:
        token_file = session.path / "app-token"
        private_file(token_file, token)
        return dict(env, SATELLITE_TOKEN=token, SATELLITE_TOKEN_FILE=str(token_file)), {}, None
    known = APPS[info["app"]]
    config_dir = session.path / "app-config"
    config_dir.mkdir(mode=0o700, exist_ok=True)
    files = {"workdir": info["workdir"], "config_dir": str(config_dir)}
    if known.config_name:
        private_file(config_dir / known.config_name, string.Template(known.config).substitute(token=token))
        files["config"] = str(config_dir / known.config_name)
    if JUPYTER_IPC_KERNELS in (known.socket_command or ""):
        env["JUPYTER_RUNTIME_DIR"] = tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir="/tmp")   # 0700; run_agent removes it
    return env, files, str(config_dir)


def start_app(command: str, host: str, env: dict, start_timeout: float, stop: StopFlag,
              files: Optional[dict] = None, directory: Optional[str] = None,
              socket_path: str = "", verify: bool = True) -> tuple:
    """Start the app and wait until it listens: (process, AppAddress). With `socket_path` the app serves on
    that Unix socket ({socket}); else on a port of `host` it is given ({port}), and with `verify` the
    listener there must belong to the app's own process tree (a squatter that bound the port first is
    refused, never redeemed to). A port taken before the app binds it makes the app exit: try another."""
    container = shutil.which("apptainer") or shutil.which("singularity") or "apptainer"
    netns = ""
    if verify and not socket_path and host == LOOPBACK and private_network():
        netns = socket_path = os.path.join(tempfile.mkdtemp(prefix="satellite-"), APP_SOCKET)
    for _ in range(3):
        if netns:
            where = AppAddress(path=socket_path)
        elif socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)                  # ours, from an earlier try: the directory is 0700
            where = AppAddress(path=socket_path)
        else:
            where = AppAddress(host=host, port=free_port(host))
        line = command.format(host=host, port=NETNS_PORT if netns else where.port, socket=shlex.quote(socket_path),
                              container=container, **{name: shlex.quote(path) for name, path in (files or {}).items()})
        argv = ["/bin/sh", "-c", "exec " + line]
        if netns:
            say(f"starting the app in a private network namespace on {host}:{NETNS_PORT}, relayed to {where}: {line}")
            argv = [shutil.which("unshare"), "-Urn", "--", sys.executable or "python3", client_path(), "netns-relay",
                    socket_path, str(NETNS_PORT), line]
        else:
            say(f"starting the app on {where}: {line}")
        proc = subprocess.Popen(argv, env=env, start_new_session=True, cwd=directory)
        listening = wait_until_listening(where, proc, start_timeout, stop, verify)
        if listening or stop:
            return proc, where
        if listening is False:
            stop_process_group(proc)
            raise Failure(f"something other than the app listens on {where} (another user's process?); "
                          "the link is not connected to it")
        if proc.poll() is None:
            stop_process_group(proc)
            raise Failure(f"the app did not listen on {where} within {start_timeout:.0f}s")
        say(f"the app exited with status {proc.returncode} before listening")
        if proc.returncode in (126, 127):           # the shell found no such program (or cannot run it)
            raise Failure(missing_app(line, proc.returncode))
    raise Failure("the app could not be started; see the lines above")


def missing_app(line: str, status: int) -> str:
    """What to do when the shell could not find (127) or not run (126) the app: another port will not help."""
    try:
        program = shlex.split(line)[0]
    except (ValueError, IndexError):
        program = line.split(" ", 1)[0]
    if status == 127:
        return (f"{program} is not on PATH on the compute node: use --venv, --conda-env or --env-modules, "
                "or ask your admins which module provides it")
    return (f"{program} cannot be run on the compute node (exit status 126: not executable there): check it, or "
            "use --venv, --conda-env or --env-modules")


NETNS_PORT = 8000                                   # inside a private network namespace every port is free


def private_network() -> bool:
    """Can this node give the app a network namespace of its own without privileges (util-linux `unshare`,
    unprivileged user namespaces)? Asked at run time: many sites turn user namespaces off."""
    unshare = shutil.which("unshare")
    if not unshare:
        return False
    try:
        return subprocess.run([unshare, "-Urn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def loopback_up() -> None:
    """Bring `lo` up in a new network namespace (SIOCSIFFLAGS; no `ip` needed)."""
    import fcntl
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = struct.unpack("16sh", fcntl.ioctl(sock, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(sock, 0x8914, struct.pack("16sh", b"lo", flags | 0x1))


def run_netns_relay(socket_path: str, port: int, line: str) -> int:
    """Inside the app's private network namespace (`unshare -Urn`): start the app on 127.0.0.1:`port` there,
    and once it listens, relay a Unix socket at `socket_path` (0600; the filesystem is shared, the network is
    not) to it. No other process of the node can reach the app: its loopback is its own. Ends with the app."""
    loopback_up()
    proc = subprocess.Popen(["/bin/sh", "-c", "exec " + line])
    where = AppAddress(port=port)
    while proc.poll() is None:
        try:
            where.connect(1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        return proc.returncode
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(socket_path)
    finally:
        os.umask(old)
    listener.listen(128)

    def relay(conn: socket.socket) -> None:
        try:
            with conn, where.connect() as app:
                relay_websocket(conn, app, lambda: proc.poll() is None, check_every=30.0)
        except OSError:
            pass

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=relay, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return proc.wait()


class Gate:
    """The agent's one network listener in direct mode: TLS with the job's own certificate, which
    satellite pinned at redeem, and then satellite's proof for this session before a byte reaches the app.

    Each connection gets GATE_SECONDS in total for its TLS handshake and for the preamble line
    (satellite.upstream_preamble: a fixed prefix, 64 hex digits, CRLF; read to exactly its size), which is
    compared in constant time with the proof the redeem reply gave. Anything else is closed, and the app
    never sees it. At most GATE_PENDING connections are held before they proved anything; more are closed at
    once, and one address may hold at most GATE_PENDING_PER_SOURCE of them. Connections from satellite's
    addresses — those its name resolves to here, and any address a connection has proved itself from
    (satellite may connect from another interface) — have a pool of their own, GATE_PENDING_SATELLITE, so
    other users filling the small pool with silent connections cannot keep satellite out (a connection from
    there must still prove itself). Proven connections are relayed to the app's socket byte for byte (satellite.relay_websocket).
    The gate binds its own port (0: the kernel picks) and holds it from before the redeem to the end: no
    port is picked and then hoped for. The proof lives only in this process's memory: never in a file,
    a log, a command line or the app's environment."""

    def __init__(self, host: str, certificate: dict, app: AppAddress, satellite_addresses: Iterable[str] = ()):
        self.app = app
        self.proof: Optional[bytes] = None              # the preamble; None until the redeem reply gives it
        self.pending = threading.BoundedSemaphore(GATE_PENDING)
        self.satellite_addresses = set(satellite_addresses)
        self.satellite_pending = threading.BoundedSemaphore(GATE_PENDING_SATELLITE)
        self.held_by: collections.Counter = collections.Counter()     # unproven connections per other address
        self.lock = threading.Lock()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(certificate["certfile"], certificate["keyfile"])
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self.accept, daemon=True, name="gate").start()

    def accept(self) -> None:
        while not self.closed:
            try:
                raw, peer = self.sock.accept()
            except OSError:
                if self.closed:
                    return
                time.sleep(0.05)                          # EMFILE and the like: do not spin
                continue
            source = plain_address(peer[0])
            pool = self.hold(source)
            if pool is None:
                raw.close()
                continue
            threading.Thread(target=self.serve, args=(raw, source, pool), daemon=True).start()

    def hold(self, source: str) -> Optional[str]:
        """Take a slot for an unproven connection from `source` if its pool and its share allow: which pool."""
        if source in self.satellite_addresses:
            return "satellite" if self.satellite_pending.acquire(blocking=False) else None
        with self.lock:
            if self.held_by[source] >= GATE_PENDING_PER_SOURCE or not self.pending.acquire(blocking=False):
                return None
            self.held_by[source] += 1
            return "others"

    def let_go(self, source: str, pool: str, proven: bool) -> None:
        if pool == "satellite":
            self.satellite_pending.release()
        else:
            with self.lock:
                self.held_by[source] -= 1
                if not self.held_by[source]:
                    del self.held_by[source]
                self.pending.release()
        if proven:
            self.satellite_addresses.add(source)      # satellite connects from here: its own pool from now on

    def admit(self, raw: socket.socket, peer: str) -> Optional[ssl.SSLSocket]:
        """The TLS connection if it proved itself within the deadline, else None (and it is closed)."""
        deadline = time.monotonic() + GATE_SECONDS
        try:
            raw.settimeout(GATE_SECONDS)
            if raw.recv(1, socket.MSG_PEEK) != b"\x16":       # not TLS: closed without a word
                raw.close()
                return None
            sock = tls_handshake(raw, self.context, deadline, peer)
            if sock is None:
                raw.close()
                return None
            sock.setblocking(True)
            got = b""
            while len(got) < UPSTREAM_PREAMBLE_SIZE:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                chunk = sock.recv(UPSTREAM_PREAMBLE_SIZE - len(got))
                if not chunk:
                    break
                got += chunk
            if self.proof is not None and hmac.compare_digest(got, self.proof):
                return sock
            sock.close()
        except (OSError, ssl.SSLError):
            pass
        raw.close()
        return None

    def serve(self, raw: socket.socket, source: str, pool: str) -> None:
        sock = None
        try:
            sock = self.admit(raw, source)
        finally:
            self.let_go(source, pool, sock is not None)
        if sock is None:
            return
        try:
            with sock, self.app.connect() as app:
                relay_websocket(sock, app, lambda: not self.closed, check_every=30.0)
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class TunnelKeeper:
    """Holds the session's tunnel to satellite open from inside the job (satellite.Tunnel): reconnects
    with backoff and jitter when it drops, and gives up only when satellite refuses it for good
    (the session is over) or the agent closes it."""

    def __init__(self, api: SatelliteApi, key: str, app: AppAddress, stop: StopFlag):
        self.api, self.key, self.app, self.stop_flag = api, key, app, stop
        self.closing = threading.Event()
        self.connected = threading.Event()           # set at the first successful attach
        self.refused: Optional[ApiRefused] = None
        self.current: Optional[Tunnel] = None
        self.last_attach = 0
        self.thread = threading.Thread(target=self.keep, daemon=True, name="tunnel")

    def wanted(self) -> bool:
        return not self.closing.is_set() and not self.stop_flag

    def connect_app(self) -> socket.socket:
        """Every stream goes to this job's app, and nowhere else."""
        return self.app.connect()

    def keep(self) -> None:
        delay = 1.0
        while self.wanted():
            self.last_attach = max(self.last_attach + 1, time.time_ns() // 1_000_000)
            try:
                sock, early = self.api.open_tunnel(self.key, self.last_attach)
            except ApiRefused as exc:
                if exc.status < 500 and exc.status != 429:
                    say(f"the tunnel was refused: {exc.reason} ({exc.status})")
                    self.refused = exc
                    return
                say(f"the tunnel was refused for now: {exc.reason}; retrying")
            except Failure as exc:
                say(f"{exc}; retrying")
            else:
                self.current = Tunnel(sock, self.connect_app, early)
                say("tunnel to satellite connected")
                self.connected.set()
                started = time.monotonic()
                reason = self.current.run(still_wanted=self.wanted)
                if not self.wanted():
                    return
                say(f"tunnel lost ({reason}); reconnecting")
                if time.monotonic() - started > 60:
                    delay = 1.0
            pause = delay * random.uniform(0.5, 1.5)         # jitter: many jobs must not reconnect in step
            deadline = time.monotonic() + pause
            while self.wanted() and time.monotonic() < deadline:
                time.sleep(0.2)
            delay = min(delay * 2, 30.0)

    def start(self, stop: StopFlag) -> None:
        """Start, and wait until the first attach (or a final refusal, or a signal)."""
        self.thread.start()
        while not self.connected.wait(0.2) and self.refused is None and not stop:
            pass
        if self.refused is not None:
            raise Failure(f"satellite refused the tunnel: {self.refused.reason}")

    def close(self) -> None:
        self.closing.set()
        if self.current is not None:
            self.current.stop("the job is ending")
        self.thread.join(5)


def redeem_directly(api: SatelliteApi, key: str, port: int, fingerprint: Optional[str], stop: StopFlag,
                    check: bool, proof: bool = False) -> Optional[dict]:
    """Map the link to `port` for direct connections: the reply, or None if `check` was asked and satellite
    cannot connect (then a tunnel is the way). With `proof`, the reply must carry the upstream proof."""
    try:
        reply = with_retries(lambda: api.call("redeem", key=key, port=port, fingerprint=fingerprint,
                                              check="1" if check else None, proof="1" if proof else None),
                             "redeem", stop, final=(502,))
    except ApiRefused as exc:
        if check and exc.status == 502:
            say(f"{exc.reason}; using a tunnel instead")
            return None
        raise
    if proof:
        reply_field(reply, "upstream_proof", UPSTREAM_PROOF_SHAPE, "64 hex digits")
    return reply


def isolated_app_address(session: SessionDir, command: str) -> str:
    """The Unix socket path for an app whose command has {socket}; "" for a loopback app. In the session's
    directory (0700); where that path is too long for a Unix socket (sun_path: 108 bytes), in a new 0700
    directory of the node's /tmp (mkdtemp), removed when the agent ends."""
    fields = {f for _, f, _, _ in string.Formatter().parse(command) if f is not None}
    if "socket" not in fields:
        return ""
    path = str(session.path / APP_SOCKET)
    if len(path.encode()) > MAX_SOCKET_PATH:
        path = os.path.join(tempfile.mkdtemp(prefix="satellite-", dir="/tmp"), APP_SOCKET)
    return path


def run_agent(session_dir: str, command: str, start_timeout: float = 600) -> int:
    """Inside the job: start the app, connect the link to it (redeem, or a tunnel), release it on every way out.

    By default (app-listens = isolated) the app listens on a Unix socket in the session's directory, or on
    the node's loopback (checked to be the app's own listener); in direct mode the only network listener is
    the agent's Gate, which lets through only satellite's connections for this session."""
    stop = StopFlag()
    session = SessionDir(Path(session_dir))
    info, secrets = session.info(), session.secrets()
    api = SatelliteApi(info["satellite"], info.get("cacert"))
    key = secrets["key"]
    connect = info.get("connect", "direct")
    isolated = info.get("app_listens", ISOLATED) != UNPROTECTED
    proc, keeper, gate, code, socket_path, reason, env = None, None, None, 1, "", "the agent stopped", {}
    try:
        with_retries(lambda: api.call("state", key=key, state="running"), "reporting running", stop)
        node = api.local_address() if connect != "tunnel" else LOOPBACK
        host = LOOPBACK if isolated or connect == "tunnel" else node
        env, files, app_dir = app_setup(session, info, secrets["token"])
        socket_path = isolated_app_address(session, command) if isolated else ""
        tls_files, fingerprint = make_certificate(session) if (info.get("tls") or isolated) and connect != "tunnel" \
            else ({}, None)
        if not isolated:
            files.update(tls_files)
        if not stop:
            proc, app = start_app(command, host, env, start_timeout, stop, files, app_dir, socket_path, isolated)
            socket_path = app.path or socket_path
            if isolated and not app.path:
                say(f"note: this app cannot serve on a Unix socket and this node gives no private network namespace "
                    f"(unprivileged user namespaces are off), so it listens on {app}: other users on this node could "
                    "connect to it (not from other nodes)")
        if not stop and isolated and connect != "tunnel":
            gate = Gate(node, tls_files, app, api.satellite_addresses())
        if not stop:
            reply = None
            if connect != "tunnel":
                reply = redeem_directly(api, key, gate.port if gate else app.port, fingerprint, stop,
                                        connect == "auto", proof=gate is not None)
            if reply is None:
                if gate is not None:                     # through the tunnel, nothing listens on the network
                    gate.close()
                    gate = None
                keeper = TunnelKeeper(api, key, app, stop)
                keeper.start(stop)
                say(f"link ready: {info['link']} is now your app on {app}, through the tunnel")
            elif gate is not None:
                gate.proof = upstream_preamble(reply["upstream_proof"])
                say(f"link ready: {info['link']} is now your app on {app}, through this agent on "
                    f"{host_text(node, gate.port)} (TLS; only satellite's connections for this session pass)")
            else:
                say(f"link ready: {info['link']} is now your app on {app}")
        while proc is not None and proc.poll() is None and not stop and not (keeper and keeper.refused):
            stop.pause(1.0)
        if keeper and keeper.refused:
            raise Failure("the session is over; stopping the app")
        if stop:
            say(f"got {signal.Signals(stop.signum).name}; releasing the link, then stopping the app")
            code = 128 + stop.signum
            reason = STOP_REASONS.get(stop.signum, f"stopped by {signal.Signals(stop.signum).name}")
        else:
            code = proc.returncode
            say(f"the app exited with status {code}")
            reason = f"the app exited with status {code}"
    except Failure as exc:
        say(str(exc))
        reason = str(exc)
    finally:
        session.save_end_reason(reason)
        # release first: a scheduler may kill the whole job seconds after its SIGTERM (PBS, LSF: ~10 s;
        # Slurm: KillWait), and stopping an app can take that long
        release_link(api, key, reason)
        if keeper is not None:
            keeper.close()
        if gate is not None:
            gate.close()
        stop_process_group(proc)
        if socket_path and not socket_path.startswith(str(session.path)):
            shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)
        runtime = env.get("JUPYTER_RUNTIME_DIR", "")
        if os.path.basename(runtime).startswith(RUNTIME_PREFIX):
            shutil.rmtree(runtime, ignore_errors=True)
    return code


# why the agent stopped, by signal: SIGUSR1 is the time-limit warning every scheduler here is asked for
# (Slurm --signal, Grid Engine s_rt, LSF -wa); SIGTERM is a cancel, or a limit with no warning before it
TIME_LIMIT_REASON = "the job's time limit"
STOP_REASONS = {signal.SIGUSR1: f"{TIME_LIMIT_REASON} was near (SIGUSR1)",
                signal.SIGTERM: "stopped by the scheduler (SIGTERM: cancelled, or the time limit)",
                signal.SIGUSR2: "stopped by the scheduler (SIGUSR2: about to be killed)"}


def host_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def release_link(api: SatelliteApi, key: str, reason: Optional[str] = None, timeout: float = 5) -> None:
    """End the link (satellite answers 410 for it from now on); quickly, as the job may be killed soon.
    The reason goes with it (satellite keeps it as the session's end_reason; one that does not know the
    parameter refuses it with 400, and then the release goes again without it).
    Whatever satellite answers, this returns: stopping the app comes after it."""
    api.timeout = timeout
    short = re.sub(r"[^ -~]", "?", reason)[:120] if reason else None
    try:
        try:
            api.call("release", key=key, reason=short)
        except ApiRefused as exc:
            if exc.status != 400 or short is None:
                raise
            api.call("release", key=key)
        say("link released")
    except Exception as exc:                           # noqa: nothing satellite says may keep the app running
        say(f"could not release the link: {printable(exc)}")


def stop_process_group(proc: Optional[subprocess.Popen], grace: float = 10) -> None:
    """Stop the app's whole process group: SIGTERM, up to `grace` seconds for every member to end, then
    SIGKILL to what is left. Every member, not only the leader: the leader may end at once and leave one
    that ignores SIGTERM (in a private network namespace the relay leads the group and the app is its
    child), which would outlive the job. The leader is collected last: until then its pid, the group's
    id, cannot be given to another process."""
    if proc is None or (proc.returncode is not None and not process_group_members(proc.pid)):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while process_group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_group_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5                 # SIGKILL is sure, not instant
        while process_group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    proc.wait()


def process_group_members(pgid: int) -> list:
    """The pids in process group `pgid` that still run (/proc/PID/stat field 5; zombies have ended)."""
    members = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(name))
    return members


###############################################################################
# 8. Commands
###############################################################################

def launch(options: LaunchOptions, wait: bool, quiet: bool, as_json: bool, dry_run: bool) -> int:
    plan = plan_launch(options, need_cli=not dry_run, need_satellite=not dry_run)
    if dry_run:
        placeholder = SessionDir.root() / "ALIAS"
        print(f"satellite-client: dry run; nothing contacted; time limit {limit_text(plan.time_limit)}. The "
              "session directory is named after the link's alias, shown here as ALIAS.", file=sys.stderr)
        print(render_script(plan, placeholder, "ALIAS"), end="")
        if isinstance(plan.scheduler, HtCondor):
            print("\n# job.sub (submit description):")
            print(plan.scheduler.description(plan, placeholder, "ALIAS"), end="")
        return 0
    options = plan.options
    api = SatelliteApi(options.satellite, options.cacert)
    link = checked_link(api.call("getlink", lifetime=f"{plan.time_limit + LIFETIME_MARGIN}s", **who_asks()))
    session = None
    try:
        session = SessionDir.create(link["alias"])
        session.write_secrets(link["token"], link["key"], link["url"])
        info = {"alias": link["alias"], "satellite": options.satellite, "cacert": options.cacert,
                "scheduler": plan.scheduler.name, "jobid": None, "created": time.time(),
                "time_limit": plan.time_limit, "workdir": plan.workdir, "command": plan.command,
                "app": plan.app, "link": link["url"].split("?", 1)[0],
                "tls": bool(options.tls), "connect": options.connect or "direct",
                "app_listens": options.app_listens or ISOLATED}
        session.save_info(info)
        session.script.write_text(render_script(plan, session.path, link["alias"]))
        session.script.chmod(0o700)
        if isinstance(plan.scheduler, HtCondor):
            (session.path / "job.sub").write_text(plan.scheduler.description(plan, session.path, link["alias"]))
        info["jobid"] = plan.scheduler.submit(session)
        session.save_info(info)
    except BaseException:
        # nothing left behind: the link is released and the session directory removed
        try:
            api.call("release", key=link["key"])
        except Failure:
            pass
        if session:
            session.remove()
        raise
    try:
        api.call("state", key=link["key"], state="queued", jobid=info["jobid"])
    except Failure:
        pass                                            # only informative; the job is submitted
    result = {"alias": link["alias"], "url": link["url"], "state": "queued", "scheduler": plan.scheduler.name,
              "jobid": info["jobid"], "time_limit": limit_text(plan.time_limit), "session_dir": str(session.path)}
    note = listening_note(plan)
    if note and not (quiet or as_json):
        print(printable(note))
    elif note:
        print(f"satellite-client: {note}", file=sys.stderr)
    if quiet:
        print(link["url"], flush=True)
    elif as_json and wait:
        print(json.dumps(result), flush=True)          # the link first, as --quiet does; the outcome last
    elif not as_json:
        print(printable(f"Submitted {plan.scheduler.name} job {info['jobid']} for session {link['alias']} "
                        f"(time limit {limit_text(plan.time_limit)})."))
        print(f"Your link (it shows progress until the app is up):\n\n  {link['url']}\n", flush=True)
    code = 0
    if wait:
        result["state"], code = wait_for_session(api, plan.scheduler, session, info, link["url"], quiet or as_json)
    if as_json:
        print(json.dumps(result))
    return code


def listening_note(plan: Plan) -> str:
    """What `launch` says about who besides the link can reach the app, when that is more than the agent."""
    if plan.options.app_listens == UNPROTECTED:
        return (f"Note: this site runs apps with app-listens = {UNPROTECTED}: the app listens on the node's "
                "cluster address, and anyone on the cluster network can connect to it.")
    if "{socket}" not in plan.command:
        return ("Note: this app cannot serve on a Unix socket, so it listens on the compute node's loopback "
                "(127.0.0.1), in a network namespace of its own where the node allows that without privileges; "
                "where it does not, other users on that node could connect to it (the job log says which). "
                "Other nodes cannot.")
    return ""


def wait_for_session(api: SatelliteApi, scheduler: Scheduler, session: SessionDir, info: dict,
                     url: str, silent: bool) -> tuple:
    """Follow the session to 'proxied'; returns (state, exit code)."""
    key = session.secrets()["key"]
    started, shown = time.monotonic(), None

    def show(text):
        if not silent:
            print(f"  [{time.monotonic() - started:5.0f}s] {printable(text)}", flush=True)
    try:
        while True:
            job = scheduler.status(info["jobid"])
            try:
                state = checked_status(api.call("status", key=key))[0]
            except Failure as exc:
                state = "unknown"
                show(f"cannot ask satellite: {exc}")
            if state == "mapped" and link_answers(api, url):
                state = "proxied"
            label = {"queued": "queued: waiting for the scheduler", "running": "running: the app is starting",
                     "mapped": "mapped: waiting for the app to answer", "proxied": "ready"}.get(state, state)
            if state == "queued" and job.state == "held":
                label = "held by the scheduler"
            if state == "queued" and job.reason:
                label += f" ({job.reason})"
            if label != shown:
                show(label)
                shown = label
            if state == "proxied":
                return state, 0
            advice = scheduler.never_starts(job.reason) if job.state in ("pending", "held") else None
            if advice:
                scheduler.cancel(info["jobid"])
                release_quietly(api, key)
                print(printable(f"satellite-client: job {info['jobid']} can never start: the scheduler says "
                                f"{job.reason}; {advice}. Stopped here: cancelled job {info['jobid']} and "
                                "released its link, so nothing is left running."), file=sys.stderr)
                return "ended", 1
            if state == "ended" or job.state in ENDED_JOB_STATES:
                release_quietly(api, key)
                tail, reason = session.log_tail(), session.end_reason()
                print(f"satellite-client: the job ended before the app was ready (job {job.state}, link {state})"
                      + (f": {reason}" if reason else "."), file=sys.stderr)
                if tail:
                    print(f"Last lines of {session.log}:\n{printable(tail)}", file=sys.stderr)
                return "ended", 1
            time.sleep(1 if state in ("running", "mapped") else 2)
    except KeyboardInterrupt:
        print(f"\nStopped waiting; the job goes on. Cancel it with: satellite-client cancel {session.alias}",
              file=sys.stderr)
        return shown or "queued", 130


def link_answers(api: SatelliteApi, url: str) -> bool:
    """True once the link reaches the app (satellite answers 503 with its status page before)."""
    try:
        return api.probe_link(url) not in (502, 503)
    except (OSError, http.client.HTTPException):
        return False


def release_quietly(api: SatelliteApi, key: str) -> None:
    try:
        api.call("release", key=key)
    except Failure:
        pass


def session_status(session: SessionDir) -> dict:
    """Satellite's view and the scheduler's, combined. A job that is gone gets its link released.
    time_left is the job's: the scheduler's own (Slurm %L) while it runs, the limit it asked for while it
    waits; where the scheduler does not tell, at most what the link has left less its margin."""
    info, secrets = session.info(), session.secrets()
    api = SatelliteApi(info["satellite"], info.get("cacert"))
    status = {"alias": session.alias, "url": secrets["url"], "scheduler": info["scheduler"],
              "jobid": info["jobid"], "job": "unknown", "reason": "", "state": "unknown", "time_left": None,
              "end_reason": session.end_reason()}
    job = JobStatus("unknown")
    if info.get("jobid"):
        try:
            job = find_scheduler(info["scheduler"], need_cli=False).status(info["jobid"])
        except Failure:
            pass
    link_left = None
    try:
        reply = api.call("status", key=secrets["key"])
        state, expires = checked_status(reply)
        status["state"] = state
        link_left = max(0, int(expires - time.time())) if state != "ended" else 0
        if not status["end_reason"] and isinstance(reply.get("ended_because"), str):
            status["end_reason"] = printable(reply["ended_because"])[:300]     # satellite's record of it
    except Unreachable as exc:
        status["error"], status["unreachable"] = str(exc), True
    except Failure as exc:
        status["error"] = str(exc)
    status["job"], status["reason"] = job_outcome(job.state, status["end_reason"]), job.reason
    if job.time_left is not None:
        status["time_left"] = job.time_left
    elif job.state in ("pending", "held"):
        status["time_left"] = info["time_limit"]
    elif job.state in ENDED_JOB_STATES:
        status["time_left"] = 0
    elif link_left is not None:
        status["time_left"] = max(0, link_left - LIFETIME_MARGIN)
    if job.state in ENDED_JOB_STATES and status["state"] not in ("ended", "unknown"):
        release_quietly(api, secrets["key"])
        status["state"] = "ended"
    return status


def job_outcome(state: str, end_reason: Optional[str]) -> str:
    """The scheduler's state, made exact by the agent's reason: a job the agent ended at its time-limit
    warning exits non-zero (Slurm: FAILED) but ran out of time."""
    if state in ("failed", "done") and end_reason and end_reason.startswith(TIME_LIMIT_REASON):
        return "timeout"
    return state


def format_left(seconds: Optional[int]) -> str:
    if seconds is None:
        return "?"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def unreachable_note(rows: list) -> int:
    """Exit status for list/prune: 1 (and a line saying so) if satellite could not be asked about a session."""
    failed = [row for row in rows if row.get("unreachable")]
    if failed:
        print(printable(f"satellite-client: {failed[0]['error']}; the state of {len(failed)} session(s) is "
                        "unknown"), file=sys.stderr)
    return 1 if failed else 0


def command_list(as_json: bool, show_all: bool) -> int:
    rows = [session_status(s) for s in SessionDir.all()]
    shown = rows if show_all else [row for row in rows if row["state"] != "ended"]
    hidden = len(rows) - len(shown)
    if as_json:
        print(json.dumps(shown))
        return unreachable_note(rows)
    if not shown:
        print("No live sessions. Start one with: satellite-client launch")
    else:
        print(f"{'ALIAS':<24} {'STATE':<8} {'JOB':<28} {'LEFT':>6}  LINK")
        for row in shown:
            job = f"{row['jobid']} {row['job']}" + (f" ({row['reason']})" if row["reason"] else "")
            print(printable(f"{row['alias']:<24} {row['state']:<8} {job:<28} {format_left(row['time_left']):>6}  "
                            f"{row['url']}"))
            if show_all and row["state"] == "ended" and row.get("end_reason"):
                print(printable(f"{'':<24} ended: {row['end_reason']}"))
    if hidden:
        print(f"({hidden} ended session(s) not shown: list --all shows them, prune removes them)")
    return unreachable_note(rows)


def command_prune() -> int:
    """Remove the records of ended sessions (link ended, job gone). A session satellite cannot be asked
    about stays."""
    rows = []
    for session in SessionDir.all():
        row = session_status(session)
        rows.append(row)
        if row["state"] == "ended" and row["job"] not in ("pending", "held", "running"):
            session.remove()
            print(printable(f"removed {row['alias']} (job {row['jobid']} {row['job']})"))
    return unreachable_note(rows)


def command_status(alias: str, as_json: bool) -> int:
    status = session_status(SessionDir.find(alias))
    if as_json:
        print(json.dumps(status))
    else:
        for key in ("alias", "state", "scheduler", "jobid", "job", "reason", "time_left", "url", "end_reason",
                    "error"):
            if status.get(key) not in (None, ""):
                value = format_left(status[key]) if key == "time_left" else status[key]
                print(printable(f"{key}={value}"))
    return 0 if status["state"] != "unknown" else 1


def command_cancel(alias: str) -> int:
    """Cancel the job and release the link. Safe to repeat."""
    session = SessionDir.find(alias)
    info, secrets = session.info(), session.secrets()
    if info.get("jobid"):
        scheduler = find_scheduler(info["scheduler"], need_cli=False)
        if scheduler.query(info["jobid"]) not in ENDED_JOB_STATES:
            scheduler.cancel(info["jobid"])
    api = SatelliteApi(info["satellite"], info.get("cacert"))
    try:
        api.call("release", key=secrets["key"])
    except ApiRefused as exc:
        if exc.status != 404:
            raise
    print(printable(f"cancelled {alias}: job {info.get('jobid')} stopped, link released"))
    return 0


def client_checks(options: LaunchOptions, config: str) -> list:
    """What `satellite-client check` finds on this login node: (level, line) pairs, level OK, WARN or FAIL."""
    results = []
    for what, path in (("site config", config), ("cacert", options.cacert)):
        loose = path and os.path.exists(path) and others_may_replace(path)
        if loose:
            results.append(("FAIL", f"{what} {path}: {loose}, so they could point every user's links at their own "
                                    f"server: chown root {path}; chmod 0644 {path} (and its directory 0755 root)"))
    if os.path.exists(config):
        results.append(("OK", f"site config {config}"))
    else:
        results.append(("WARN", f"no site config at {config}: install contrib/client.ini there (satellite URL, "
                                f"CA, scheduler), or users must give --satellite each time"))
    if not options.satellite:
        results.append(("FAIL", f"no satellite address: set satellite = https://manage.DOMAIN in [client] of "
                                f"{config}"))
    elif options.cacert and not os.path.isfile(options.cacert):
        results.append(("FAIL", f"cacert {options.cacert} does not exist: give your site CA's PEM file, or leave "
                                f"cacert out if the system's store trusts satellite's certificate"))
    else:
        api = SatelliteApi(options.satellite, options.cacert, timeout=10)
        conn = SniHTTPSConnection(api.address, api.address[0], api.address[1], api.context, api.timeout)
        trust = f"cacert {options.cacert}" if options.cacert else "the system's CA store"
        try:
            conn.request("GET", "/healthz", headers={"User-Agent": f"satellite-client/{__version__}"})
            resp = conn.getresponse()
            body = resp.read(100)
            if resp.status == 200 and body.strip() == b"ok":
                results.append(("OK", f"satellite at {options.satellite} answers, its certificate trusted ({trust})"))
            else:
                results.append(("FAIL", f"{options.satellite}/healthz answered {resp.status}, not ok: is that "
                                        f"satellite's address (https://manage.DOMAIN)?"))
        except ssl.SSLCertVerificationError as exc:
            results.append(("FAIL", f"satellite at {options.satellite}: its certificate is not trusted with "
                                    f"{trust} ({exc.verify_message}): set cacert = your site CA's PEM file in "
                                    f"[client] of {config}, or fix the address"))
        except (OSError, http.client.HTTPException) as exc:
            results.append(("FAIL", f"cannot reach satellite at {options.satellite}: {exc}: check the address, DNS "
                                    f"and that the proxy node's firewall lets this node reach port "
                                    f"{api.address[1]}"))
        finally:
            conn.close()
    name = options.scheduler or detect_scheduler()
    if name not in SCHEDULERS:
        results.append(("FAIL", f"scheduler {name!r}: choose from {', '.join(SCHEDULER_NAMES)}"))
    else:
        scheduler = SCHEDULERS[name]()
        how = "set in the config" if options.scheduler else "found on PATH"
        if scheduler.cli and not shutil.which(scheduler.cli):
            results.append(("FAIL", f"scheduler {name} ({how}): {scheduler.cli} is not on PATH here: load its "
                                    f"module or fix PATH, or set scheduler = in [client]"))
        elif not scheduler.cli:
            results.append(("WARN", f"scheduler {name}: no batch system's command on PATH (sbatch, qsub, bsub, "
                                    f"condor_submit): jobs would run here, on the login node; set scheduler = in "
                                    f"[client] or fix PATH"))
        else:
            results.append(("OK", f"scheduler {name} ({how}: {shutil.which(scheduler.cli)})"))
    return results


def others_may_replace(path: str) -> str:
    """Why users other than root and this one could change `path` (the file or its directory), or ''."""
    for place in (path, os.path.dirname(os.path.abspath(path))):
        st = os.stat(place)
        if st.st_uid not in (0, os.geteuid()):
            return f"{place} belongs to uid {st.st_uid}"
        if st.st_mode & 0o022 and not (place != path and st.st_mode & stat.S_ISVTX):
            return f"{place} is writable by {'others' if st.st_mode & 0o002 else 'its group'}"
    return ""


def command_check() -> int:
    config = os.environ.get("SATELLITE_CLIENT_CONFIG", SITE_CONFIG)
    return print_checks([(level, printable(text)) for level, text in client_checks(enforce_site(site_options()),
                                                                                   config)])


def command_profile(action: str, name: Optional[str], options: LaunchOptions) -> int:
    root = Path.home() / PROFILE_ROOT
    if action == "list":
        for path in sorted(root.glob("*.json")) if root.is_dir() else []:
            print(path.stem)
        return 0
    if not name:
        raise UsageError(f"profile {action} needs a NAME")
    path = profile_path(name)
    if action == "save":
        if not options.given():
            raise UsageError("profile save NAME takes launch options to remember, e.g. --partition gpu --gpus 1")
        plan = plan_launch(options, need_cli=False, need_satellite=False)   # one that cannot launch is refused now
        given = {name: getattr(plan.options, name) for name in options.given()}   # paths made absolute
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(json.dumps(given, indent=1) + "\n")
        print(f"saved profile {name}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items()))
    elif action == "show":
        print(json.dumps(load_profile(name).given(), indent=1))
    elif action == "delete":
        if not path.exists():
            raise UsageError(f"no profile {name!r}")
        path.unlink()
        print(f"deleted profile {name}")
    return 0


###############################################################################
# 9. main
###############################################################################

LAUNCH_EXAMPLES = """examples:
  satellite-client launch --jupyter lab --partition debug --time-limit 2:00:00 --wait
  satellite-client launch --scheduler slurm --account abc123 --partition gpu --gpus 1 --memory 32 \\
      --conda-env torch --notebook-dir ~/project
  satellite-client launch --sif ~/images/lab.sif --bind /scratch --nv --jupyter lab
  satellite-client launch --command 'python3 -m http.server {port} --bind {host}' --quiet
  satellite-client launch --command 'code-server --socket {socket} .'
  satellite-client launch --profile gpu --time-limit 30 --dry-run
  satellite-client launch --jupyter lab --connect tunnel   # a node that accepts no inbound connections

{socket}, or {port} (and {host}), in --command are filled in on the node. Prefer {socket}: the app
serves on a Unix socket in your 0700 session directory and only the job's agent reaches it. With
{port} it listens on the node's loopback, where other users on that node could connect to it.
The link's token reaches a --command app in $SATELLITE_TOKEN, and a 0600 file holding it in
$SATELLITE_TOKEN_FILE; check it in your app. Known apps (--jupyter, --app) read it from a 0600
config file of their own (Jupyter's IdentityProvider.token, Voila's Voila.token, code-server's
password), never from the command line or the environment. Lab, Notebook and code-server serve
on a Unix socket. TensorBoard has no login of its own, and Voila and TensorBoard listen on the
node's loopback: other users on that node could use them."""


def add_launch_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("satellite")
    where.add_argument("--satellite", metavar="URL", help="satellite's management URL (or $SATELLITE_URL, site config)")
    where.add_argument("--cacert", metavar="FILE", help="CA bundle for satellite's certificate (or $SATELLITE_CACERT)")
    job = parser.add_argument_group("batch job")
    job.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="default: found from the CLIs on PATH")
    job.add_argument("--account", help="account/project to charge")
    job.add_argument("--partition", help="partition (Slurm) or queue (PBS, LSF, SGE)")
    job.add_argument("--qos", help="quality of service (Slurm)")
    job.add_argument("--reservation", help="reservation name")
    job.add_argument("--nodes", type=int, help="number of nodes")
    job.add_argument("--ntasks-per-node", type=int, help="tasks per node")
    job.add_argument("--cpus-per-task", type=int, help="CPUs per task")
    job.add_argument("--memory", metavar="GB", help="memory per node in GB (e.g. 16, 0.5)")
    job.add_argument("--gpus", type=int, help="number of GPUs")
    job.add_argument("--gres", help="generic resources, e.g. gpu:a100:1 (Slurm)")
    job.add_argument("--time-limit", metavar="TIME", help=f"walltime, read as Slurm reads it: {TIME_LIMIT_FORMS}; or 90m, 2h, 1d "
                     "(default 1:00:00; 90:00 is 90 minutes, not hours)")
    job.add_argument("--constraint", help="node features (Slurm --constraint, LSF select[])")
    app = parser.add_argument_group("app")
    app.add_argument("--jupyter", choices=("lab", "notebook", "voila"), help="Jupyter flavour (default: lab)")
    app.add_argument("--app", help=f"a known app: {', '.join(sorted(APPS))} (tensorboard has no login)")
    app.add_argument("--command", help="any web app, with {socket} (a Unix socket; preferred) or {port} (and {host}) "
                                       "to fill in")
    app.add_argument("--workdir", "--notebook-dir", dest="workdir", metavar="DIR",
                     help="directory the app starts in (default: here)")
    app.add_argument("--env-modules", metavar="A,B", help="environment modules to load")
    app.add_argument("--conda-env", metavar="ENV", help="conda environment to activate")
    app.add_argument("--venv", metavar="DIR", help="Python virtual environment to activate")
    app.add_argument("--sif", metavar="IMAGE", help="run the app in this Apptainer/Singularity image")
    app.add_argument("--bind", metavar="PATHS", help="comma-separated paths to bind into the container")
    app.add_argument("--nv", action="store_true", default=None, help="NVIDIA GPUs in the container")
    app.add_argument("--rocm", action="store_true", default=None, help="AMD GPUs in the container")
    app.add_argument("--python", metavar="PATH", help="python3 the job runs the agent with (default: this one)")
    app.add_argument("--tls", action="store_true", default=None,
                     help="encrypt satellite-to-node: on by default (the agent's gate speaks TLS with a certificate "
                          "satellite pins); only with the site's app-listens = cluster-network-unprotected does it "
                          "change anything (the app then serves HTTPS itself)")
    app.add_argument("--connect", choices=CONNECT_MODES, default=None,
                     help="how satellite reaches the app: 'direct' connects to the node (default); 'tunnel' has "
                          "the job connect out to satellite and carry the traffic back, for nodes that take no "
                          "inbound connections (the app then listens on the node's loopback only); 'auto' tries "
                          "direct and falls back to the tunnel")


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    names = {f.name for f in dataclasses.fields(LaunchOptions)}
    return LaunchOptions(**{k: v for k, v in vars(args).items() if k in names})


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    """Site defaults and the environment, then --profile, then the command line; then what the site
    enforces, which none of them can change."""
    options = site_options()
    if args.profile:
        options = options.merged(load_profile(args.profile))
    return enforce_site(options.merged(options_from_args(args)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="satellite-client",
        description="Launch Jupyter or any web app as a batch job behind a secure Satellite link.",
        epilog="Start with: satellite-client launch --help", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"satellite-client {__version__}")
    commands = parser.add_subparsers(dest="command_name", metavar="COMMAND")

    launch_parser = commands.add_parser(
        "launch", help="submit a job and print its link", epilog=LAUNCH_EXAMPLES,
        description="Ask satellite for a link, write the batch script, submit it, print the link. Options come "
                    f"from the site config ({SITE_CONFIG} or $SATELLITE_CLIENT_CONFIG), then --profile, then "
                    f"the command line; settings in the [enforced] section of {SITE_CONFIG} cannot be changed "
                    "by any of them.", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_options(launch_parser)
    out = launch_parser.add_argument_group("behaviour")
    out.add_argument("--profile", metavar="NAME", help="start from a saved profile (see: profile save)")
    out.add_argument("--wait", action="store_true", help="follow the job until the link works; fail if the job dies")
    out.add_argument("--quiet", action="store_true", help="print only the link (for portals and scripts)")
    out.add_argument("--json", action="store_true",
                     help="last line of output: one JSON object (no key); with --wait, a first line with the "
                          "link; errors too: {\"error\": ...} on stdout, exit 1 or 2")
    out.add_argument("--dry-run", action="store_true", help="print the script that would be submitted; contact nothing")

    list_parser = commands.add_parser(
        "list", help="your live sessions: state, job, time left, link",
        description="Your sessions, as satellite and the scheduler see them. STATE is the link's (queued, "
                    "running, mapped, proxied, ended); JOB is the scheduler's (pending with the reason it waits, "
                    "running, completed, failed, timeout, cancelled; done = ended, outcome not told); LEFT is "
                    "the job's time left (while it waits: the limit it asked for). Exits 1 if satellite cannot "
                    "be reached (those rows say unknown).")
    list_parser.add_argument("--all", action="store_true", help="ended sessions too, with the agent's reason")
    list_parser.add_argument("--json", action="store_true", help="one JSON array")
    commands.add_parser("prune", help="remove the records of ended sessions",
                        description="Removes ~/.satellite/sessions/<alias> of every session whose link has ended "
                                    "and whose job is gone. Sessions satellite cannot be asked about stay.")
    status_parser = commands.add_parser("status", help="one session's state, with why it waits or ended")
    status_parser.add_argument("alias")
    status_parser.add_argument("--json", action="store_true", help="one JSON object")
    cancel_parser = commands.add_parser("cancel", help="cancel the job and release the link (safe to repeat)")
    cancel_parser.add_argument("alias")

    profile_parser = commands.add_parser(
        "profile", help="save, list, show or delete launch option sets",
        description="Profiles remember launch options: `profile save gpu --partition gpu --gpus 1`, "
                    "then `launch --profile gpu`.")
    profile_parser.add_argument("action", choices=("save", "list", "show", "delete"))
    profile_parser.add_argument("name", nargs="?")
    add_launch_options(profile_parser)

    commands.add_parser(
        "check", help="check this login node: satellite reachable, its certificate trusted, scheduler found",
        description=wrapped_help(
                    f"For the admin installing the client on a login node. Reads the site config ({SITE_CONFIG} "
                    "or $SATELLITE_CLIENT_CONFIG) as launch does, then checks: satellite answers /healthz at the "
                    "configured address, with a certificate trusted by cacert (or the system's store); and which "
                    "scheduler launch would use, with its command on PATH. One line per check, OK, WARN or FAIL "
                    "with what to do; exit status 1 if any check FAILs. It asks for no link."),
        epilog="Example, after installing /etc/satellite/client.ini:\n  satellite-client check",
        formatter_class=argparse.RawDescriptionHelpFormatter)

    agent_parser = commands.add_parser("agent", help="(inside the job) start the app and serve the link")
    agent_parser.add_argument("session_dir")
    agent_parser.add_argument("--command", dest="app_command", required=True,
                              help="the app's shell command with {host} and {port}")
    agent_parser.add_argument("--start-timeout", type=float, default=600, help="seconds for the app to listen")
    relay_parser = commands.add_parser("netns-relay", help="(inside the agent's private network namespace) the app")
    relay_parser.add_argument("socket_path")
    relay_parser.add_argument("port", type=int)
    relay_parser.add_argument("line")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command_name == "launch":
            return launch(launch_options(args), args.wait, args.quiet, args.json, args.dry_run)
        if args.command_name == "list":
            return command_list(args.json, args.all)
        if args.command_name == "prune":
            return command_prune()
        if args.command_name == "status":
            return command_status(args.alias, args.json)
        if args.command_name == "cancel":
            return command_cancel(args.alias)
        if args.command_name == "profile":
            return command_profile(args.action, args.name, options_from_args(args))
        if args.command_name == "check":
            return command_check()
        if args.command_name == "agent":
            return run_agent(args.session_dir, args.app_command, args.start_timeout)
        if args.command_name == "netns-relay":
            return run_netns_relay(args.socket_path, args.port, args.line)
        parser.print_help()
        return 2
    except (UsageError, Failure) as exc:
        code = 2 if isinstance(exc, UsageError) else 1
        if getattr(args, "json", False):              # --json: the error is JSON too, where the answer would be
            print(json.dumps({"error": str(exc), "exit": code}), flush=True)
        else:
            print(f"satellite-client: {'error: ' if code == 2 else ''}{printable(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

"""satellite-client: schedulers (local for real; STAND-IN CLIs for PBS, LSF, HTCondor and Grid Engine),
rendered scripts, options, profiles and every failure path."""
import dataclasses
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ECHO_APP, ROOT, Client, wait_for

GOLDEN = Path(__file__).parent / "golden"
STANDIN_CLIS = {"pbs": ("qsub", "qstat", "qdel"), "sge": ("qsub", "qstat", "qdel"),
                "lsf": ("bsub", "bjobs", "bkill"), "htcondor": ("condor_submit", "condor_q", "condor_rm")}


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def client(tmp_path, job_satellite):
    return Client(tmp_path / "home", job_satellite)


def standin_client(tmp_path, satellite, flavour):
    """A client whose PATH has the STAND-IN CLIs of one scheduler first."""
    bin_dir, state = tmp_path / f"bin-{flavour}", tmp_path / f"standin-{flavour}"
    bin_dir.mkdir()
    state.mkdir()
    for cli in STANDIN_CLIS[flavour]:
        (bin_dir / cli).symlink_to(ROOT / "tests/standins/standin.py")
    (bin_dir / "standin.json").write_text(json.dumps({"dir": str(state), "flavour": flavour}))
    return Client(tmp_path / "home", satellite, {"PATH": f"{bin_dir}:{os.environ['PATH']}"}), state


def standin_calls(state):
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def link_status(satellite, url):
    host = url.split("/")[2].split(":")[0]
    return satellite.request(host, "/" + url.split("/", 3)[3])[0]


# end to end --------------------------------------------------------------------

@pytest.mark.parametrize("flavour, expected", [
    ("pbs", ["#PBS -l walltime=00:30:00", "#PBS -l select=1:ncpus=2:mem=2gb", "#PBS -A proj7"]),
    ("lsf", ["#BSUB -W 30", "#BSUB -n 2", '#BSUB -R "rusage[mem=2048MB]"', "#BSUB -P proj7"]),
    ("htcondor", ["request_cpus = 2", "request_memory = 2048 MB", "accounting_group = proj7"]),
])
def test_standin_scheduler_end_to_end(tmp_path, job_satellite, flavour, expected):
    """PBS, LSF and HTCondor cannot be installed here: STAND-IN CLIs. Grid Engine runs for real
    (tests/test_real_parts.py)."""
    client, state = standin_client(tmp_path, job_satellite, flavour)
    result = client.launch_json("--scheduler", flavour, "--command", ECHO_APP, "--time-limit", "30",
                                "--cpus-per-task", "2", "--memory", "2", "--account", "proj7", "--wait")
    assert result["state"] == "proxied" and result["scheduler"] == flavour
    assert link_status(job_satellite, result["url"]) == 200
    session = client.session_dir(result["alias"])
    submitted = (session / ("job.sub" if flavour == "htcondor" else "job.sh")).read_text()
    for line in expected:
        assert line in submitted
    secrets = json.loads((session / "secrets").read_text())
    calls = standin_calls(state)
    assert calls[0]["cli"] == STANDIN_CLIS[flavour][0]
    assert secrets["token"] not in json.dumps(calls) and secrets["key"] not in json.dumps(calls)
    assert client.run("cancel", result["alias"]).returncode == 0
    assert any(c["cli"] == STANDIN_CLIS[flavour][2] for c in standin_calls(state))
    wait_for(lambda: link_status(job_satellite, result["url"]) == 410, what="link released")


@pytest.mark.parametrize("flavour", ["pbs", "lsf"])
def test_a_failed_job_is_reported_failed_by_the_standin_schedulers(tmp_path, job_satellite, flavour):
    """qstat -f's Exit_status and bjobs' EXIT: the job's outcome, not just "done"."""
    client, _ = standin_client(tmp_path, job_satellite, flavour)
    result = client.run("launch", "--scheduler", flavour, "--command", "sh -c 'exit 3' {port}", "--wait")
    assert result.returncode == 1 and "could not be started" in result.stderr, result.stderr
    status = lambda: json.loads(client.run("status", client.sessions()[0], "--json").stdout)    # noqa: E731
    wait_for(lambda: status()["job"] != "running", what="the job to end")     # the agent releases, then exits
    assert status()["job"] == "failed" and "could not be started" in status()["end_reason"]


def test_local_scheduler_end_to_end_and_app_exit_releases(client, job_satellite):
    result = client.launch_json("--scheduler", "local", "--command", ECHO_APP, "--wait")
    assert result["state"] == "proxied" and result["scheduler"] == "local"
    assert link_status(job_satellite, result["url"]) == 200
    log = client.session_dir(result["alias"]) / "job.log"
    # the app ends on its own (killed here): the agent releases the link. In a network namespace of its own
    # every app has port 8000: this one is the child of the relay that serves this session's socket
    relayed = re.search(r"relayed to the Unix socket (\S+):", log.read_text())
    if relayed:
        relay = subprocess.run(["pgrep", "-f", "--", f"netns-relay {relayed.group(1)}"], capture_output=True,
                               text=True).stdout.split()
        app_pid = int(subprocess.run(["pgrep", "-P", relay[-1]], capture_output=True, text=True).stdout.split()[0])
    else:
        port = re.search(r"starting the app on 127\.0\.0\.1:(\d+)", log.read_text()).group(1)
        app_pid = int(subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True,
                                     text=True).stdout.split()[0])
    os.kill(app_pid, signal.SIGKILL)
    wait_for(lambda: link_status(job_satellite, result["url"]) == 410, what="link released after the app ended")
    wait_for(lambda: "link released" in log.read_text(), what="agent log")


def test_wait_fails_with_the_reason_when_the_job_dies(client, job_satellite):
    result = client.run("launch", "--scheduler", "local", "--command", "sh -c 'echo app broke; exit 3' {port}",
                        "--wait")
    assert result.returncode == 1
    assert "the job ended before the app was ready" in result.stderr and "app broke" in result.stderr
    alias = client.sessions()[0]
    assert "state=ended" in client.run("status", alias).stdout


def test_quiet_prints_only_the_link(client):
    result = client.run("launch", "--scheduler", "local", "--command", ECHO_APP, "--quiet")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and re.match(r"^https://[a-z]+-[a-z]+-[a-z]+\.sat\.test:\d+/\?token=\S+$", lines[0])
    client.run("cancel", client.sessions()[0], check=True)


# rendered scripts ---------------------------------------------------------------

GOLDEN_OPTIONS = {
    "slurm": ["--account", "abc123", "--partition", "gpu", "--qos", "normal", "--reservation", "res1", "--nodes", "1",
              "--ntasks-per-node", "1", "--cpus-per-task", "8", "--memory", "32", "--gpus", "1",
              "--gres", "gpu:a100:1", "--constraint", "a100", "--time-limit", "1-02:00:00",
              "--env-modules", "cuda,python/3.11", "--conda-env", "torch", "--sif", "/images/lab.sif",
              "--bind", "/scratch,/data", "--nv", "--jupyter", "lab"],
    "pbs": ["--account", "abc123", "--partition", "workq", "--nodes", "2", "--ntasks-per-node", "4",
            "--memory", "0.5", "--gpus", "2", "--time-limit", "90", "--app", "tensorboard"],
    "lsf": ["--account", "abc123", "--partition", "normal", "--reservation", "res1", "--nodes", "2",
            "--ntasks-per-node", "2", "--memory", "8", "--gpus", "1", "--constraint", "avx512",
            "--time-limit", "2:30:00", "--jupyter", "notebook"],
    "htcondor": ["--account", "group_physics", "--cpus-per-task", "4", "--memory", "16", "--gpus", "1",
                 "--time-limit", "4h", "--command", "code-server --socket {socket} ."],
    "sge": ["--account", "proj", "--partition", "all.q", "--reservation", "42", "--cpus-per-task", "4",
            "--memory", "16", "--time-limit", "45", "--jupyter", "voila"],
    "local": ["--time-limit", "15", "--command", "python3 -m http.server {port} --bind {host}"],
}


def dry_run(client, *args):
    return client.run("launch", "--dry-run", "--python", "/usr/bin/python3", *args)


@pytest.mark.parametrize("scheduler", sorted(GOLDEN_OPTIONS))
def test_rendered_script_matches_golden(tmp_path, job_satellite, scheduler):
    client = Client(tmp_path / "home", job_satellite, {"SATELLITE_URL": f"https://127.0.0.1:{closed_port()}"})
    for name in ("USER", "LOGNAME", "SHELL", "LANGUAGE", "TZ", "TMPDIR", "TERM", "MODULEPATH", "MODULESHOME"):
        client.env.pop(name, None)                      # the job environment HTCondor's job.sub names
    client.env.update(PATH="/usr/local/bin:/usr/bin:/bin", LANG="C.UTF-8")
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = dry_run(client, "--scheduler", scheduler, "--workdir", str(workdir), *GOLDEN_OPTIONS[scheduler])
    assert result.returncode == 0, result.stderr
    text = (result.stdout.replace(str(client.home), "$HOME").replace(str(workdir), "/work")
            .replace(str(ROOT), "/opt/satellite").replace(" --allow-root", ""))
    golden = GOLDEN / f"{scheduler}.sh"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert client.sessions() == []                      # a dry run creates nothing


@pytest.mark.parametrize("scheduler, args, message", [
    ("pbs", ["--qos", "high"], "--qos cannot be expressed for pbs"),
    ("pbs", ["--gres", "gpu:1"], "use --gpus"),
    ("pbs", ["--reservation", "R1"], "reservation's queue"),
    ("lsf", ["--qos", "high"], "--qos cannot be expressed for lsf"),
    ("htcondor", ["--partition", "gpu"], "--partition cannot be expressed for htcondor"),
    ("sge", ["--nodes", "2"], "SGE places slots"),
    ("local", ["--partition", "gpu"], "--partition cannot be expressed for local"),
])
def test_options_a_scheduler_cannot_express_fail_before_any_contact(tmp_path, job_satellite, scheduler, args, message):
    client, state = standin_client(tmp_path, job_satellite, "pbs") if scheduler == "pbs" else (
        Client(tmp_path / "home", job_satellite), None)
    client.env["PATH"] = f"{tmp_path}/fakebin:{client.env['PATH']}"
    (tmp_path / "fakebin").mkdir(exist_ok=True)
    for cli in ("bsub", "condor_submit", "qsub"):
        if not (tmp_path / "fakebin" / cli).exists():
            (tmp_path / "fakebin" / cli).symlink_to("/bin/false")
    before = len(job_satellite.rows())
    result = client.run("launch", "--scheduler", scheduler, "--command", ECHO_APP, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(job_satellite.rows()) == before and client.sessions() == []


@pytest.mark.parametrize("args, message", [
    (["--time-limit", "soon"], "--time-limit"),
    (["--memory", "lots"], "--memory"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--command", "serve --port 8000"], "must contain {socket}"),
    (["--command", "serve {port} {token}"], "unknown placeholder {token}"),
    (["--command", "x {port}", "--jupyter", "lab"], "choose one of"),
    (["--app", "emacs"], "--app 'emacs'"),
    (["--cacert", "/no/such/ca.pem"], "--cacert"),
    (["--satellite", "http://sat.example.edu"], "https://"),
    (["--workdir", "/no/such/dir"], "--workdir"),
    (["--venv", "/no/such/venv"], "--venv"),
    (["--nv"], "go with --sif"),
    (["--profile", "nope"], "no profile 'nope'"),
])
def test_bad_options_fail_clearly_before_any_contact(client, job_satellite, args, message):
    before = len(job_satellite.rows())
    result = client.run("launch", "--scheduler", "local", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(job_satellite.rows()) == before and client.sessions() == []


def test_unknown_scheduler_and_missing_satellite(tmp_path, job_satellite):
    client = Client(tmp_path / "home", job_satellite)
    result = client.run("launch", "--scheduler", "torque")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    del client.env["SATELLITE_URL"]
    result = client.run("launch", "--scheduler", "local")
    assert result.returncode == 2 and "where is satellite" in result.stderr


def test_unreachable_satellite_submits_nothing(tmp_path, job_satellite):
    client, state = standin_client(tmp_path, job_satellite, "lsf")
    client.env["SATELLITE_URL"] = f"https://127.0.0.1:{closed_port()}"
    result = client.run("launch", "--scheduler", "lsf", "--command", ECHO_APP)
    assert result.returncode == 1 and "cannot reach satellite" in result.stderr
    assert standin_calls(state) == [] and client.sessions() == []


def test_failed_submission_releases_the_link(tmp_path, job_satellite):
    client, state = standin_client(tmp_path, job_satellite, "pbs")
    (tmp_path / "bin-pbs" / "qsub").unlink()
    (tmp_path / "bin-pbs" / "qsub").write_text("#!/bin/sh\necho 'qsub: Unauthorized Request' >&2\nexit 159\n")
    (tmp_path / "bin-pbs" / "qsub").chmod(0o755)
    before = {row[0] for row in job_satellite.rows()}
    result = client.run("launch", "--scheduler", "pbs", "--command", ECHO_APP)
    assert result.returncode == 1 and "qsub failed: qsub: Unauthorized Request" in result.stderr
    new = [row for row in job_satellite.rows() if row[0] not in before]
    assert len(new) == 1 and new[0][3] == "ended" and client.sessions() == []


# profiles, site config, help ------------------------------------------------------

def test_profiles_and_site_config(tmp_path, job_satellite):
    site = tmp_path / "client.ini"
    site.write_text(f"[client]\nsatellite = https://127.0.0.1:{closed_port()}\nscheduler = slurm\n"
                    "partition = shared\ntime-limit = 30\n")
    client = Client(tmp_path / "home", job_satellite, {"SATELLITE_CLIENT_CONFIG": str(site)})
    del client.env["SATELLITE_URL"]
    client.env["PATH"] = f"{ROOT}/tests/nonexistent:{client.env['PATH']}"
    result = dry_run(client, "--command", ECHO_APP)
    out = result.stdout
    assert "#SBATCH --partition=shared" in out and "#SBATCH --time=00:30:00" in out, result.stderr
    assert client.run("profile", "save", "gpu", "--partition", "gpu", "--gpus", "1").returncode == 0
    assert client.run("profile", "list").stdout.split() == ["gpu"]
    assert json.loads(client.run("profile", "show", "gpu").stdout) == {"partition": "gpu", "gpus": 1}
    out = dry_run(client, "--profile", "gpu", "--command", ECHO_APP).stdout
    assert "#SBATCH --partition=gpu" in out and "#SBATCH --gpus=1" in out        # profile over site config
    out = dry_run(client, "--profile", "gpu", "--partition", "debug", "--command", ECHO_APP).stdout
    assert "#SBATCH --partition=debug" in out                                      # flags over profile
    bad = client.run("profile", "save", "x", "--scheduler", "pbs", "--qos", "high")
    assert bad.returncode == 2 and "--qos cannot be expressed for pbs" in bad.stderr
    assert client.run("profile", "delete", "gpu").returncode == 0
    assert client.run("profile", "list").stdout == ""
    site.write_text("[client]\nflavour = vanilla\n")
    bad = client.run("launch", "--dry-run")
    assert bad.returncode == 2 and "unknown setting 'flavour'" in bad.stderr


def test_help_teaches():
    result = subprocess.run([sys.executable, str(ROOT / "satellite_client.py"), "launch", "--help"],
                            capture_output=True, text=True)
    assert "examples:" in result.stdout and "--time-limit" in result.stdout and "{port}" in result.stdout
    result = subprocess.run([sys.executable, str(ROOT / "satellite_client.py")], capture_output=True, text=True)
    assert result.returncode == 2 and "launch" in result.stdout


def client_module():
    """satellite_client imported into the tests, from this checkout."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import satellite_client
    return satellite_client


def test_scheduler_detection_from_path(tmp_path, monkeypatch):
    satellite_client = client_module()
    for clis, expected in [((), "local"), (("bsub",), "lsf"), (("qsub",), "pbs"), (("qsub", "qconf"), "sge"),
                           (("condor_submit",), "htcondor"), (("sbatch", "qsub"), "slurm")]:
        bin_dir = tmp_path / "-".join(clis or ("none",))
        bin_dir.mkdir()
        for cli in clis:
            (bin_dir / cli).symlink_to("/bin/true")
        monkeypatch.setenv("PATH", str(bin_dir))
        assert satellite_client.detect_scheduler() == expected


def test_example_site_config_in_contrib(tmp_path, job_satellite):
    client = Client(tmp_path / "home", job_satellite, {"SATELLITE_CLIENT_CONFIG": str(ROOT / "contrib/client.ini")})
    del client.env["SATELLITE_URL"], client.env["SATELLITE_CACERT"]
    result = client.run("launch", "--dry-run")
    assert result.returncode == 0, result.stderr
    for line in ("#SBATCH --partition=shared", "#SBATCH --time=01:00:00", "module load anaconda3", "jupyter lab"):
        assert line in result.stdout


def test_direct_links_are_tls_to_the_agent_with_a_pinned_certificate(client, job_satellite):
    """By default (app-listens = isolated) satellite speaks TLS to the job's agent, pinned at redeem, and sends
    its proof; --tls asks for nothing more. The app serves plain HTTP behind the agent, so {certfile} and
    {keyfile} are refused (they are for app-listens = cluster-network-unprotected, with --tls)."""
    result = client.launch_json("--scheduler", "local", "--tls", "--command", ECHO_APP, "--wait")
    assert link_status(job_satellite, result["url"]) == 200
    session = client.session_dir(result["alias"])
    assert (session / "app-key.pem").stat().st_mode & 0o777 == 0o600
    shown = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "show", result["alias"], "--db",
                            str(job_satellite.db)], capture_output=True, text=True).stdout
    assert "upstream=tls, pinned sha256:" in shown and ", proof" in shown
    bad = client.run("launch", "--scheduler", "local", "--tls", "--command",
                     ECHO_APP + " --certfile {certfile} --keyfile {keyfile}")
    assert bad.returncode == 2 and "unknown placeholder {certfile}" in bad.stderr


# planning: checks only --------------------------------------------------------------

def test_launch_checks_the_satellite_url_once(tmp_path, monkeypatch, capsys):
    satellite_client = client_module()
    checked = []
    check = satellite_client.check_satellite_url
    monkeypatch.setattr(satellite_client, "check_satellite_url", lambda url: checked.append(url) or check(url))
    (tmp_path / "client.ini").write_text("[client]\n")
    monkeypatch.setenv("SATELLITE_CLIENT_CONFIG", str(tmp_path / "client.ini"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code = satellite_client.main(["launch", "--dry-run", "--scheduler", "local", "--command", "app --port {port}",
                                  "--satellite", "https://manage.sat.test"])
    assert code == 0 and "app --port {port}" in capsys.readouterr().out
    assert checked == ["https://manage.sat.test"]


def test_planning_checks_without_rendering_a_made_up_job_or_changing_the_options(tmp_path, monkeypatch):
    satellite_client = client_module()
    rendered = []
    for scheduler in satellite_client.SCHEDULERS.values():
        def directives(self, plan, session, alias, render=scheduler.directives):
            rendered.append((self.name, session, alias))
            return render(self, plan, session, alias)
        monkeypatch.setattr(scheduler, "directives", directives)
    monkeypatch.chdir(tmp_path)
    options = satellite_client.LaunchOptions(scheduler="slurm", partition="gpu", nodes="2", cpus_per_task="4",
                                             gpus="1", time_limit="30", command="app --port {port}",
                                             satellite="https://manage.sat.test")
    given = dataclasses.replace(options)
    plan = satellite_client.plan_launch(options, need_cli=False)
    assert options == given                               # the caller's options as they were: "2", not 2
    assert rendered == []                                 # checked by the scheduler's table, not by rendering
    assert (plan.options.nodes, plan.options.cpus_per_task, plan.options.gpus) == (2, 4, 1)
    script = satellite_client.render_script(plan, tmp_path / "session", "some-alias")
    assert rendered == [("slurm", tmp_path / "session", "some-alias")]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --cpus-per-task=4", "#SBATCH --gpus=1"):
        assert line in script
    for name, option, message in [("pbs", {"qos": "high"}, "--qos cannot be expressed for pbs"),
                                  ("sge", {"nodes": 2}, "SGE places slots"),
                                  ("local", {"partition": "gpu"}, "--partition cannot be expressed for local")]:
        refused = satellite_client.LaunchOptions(scheduler=name, command="app {port}", satellite=options.satellite,
                                                 **option)
        with pytest.raises(satellite_client.UsageError, match=message):
            satellite_client.plan_launch(refused, need_cli=False)
    assert rendered == [("slurm", tmp_path / "session", "some-alias")]


# a hostile or compromised satellite ---------------------------------------------------

class FakeSatellite:
    """A satellite impostor with a valid certificate (the test CA's): it answers each API call with the
    fields a test gives it, and records the calls. Plays a compromised proxy node."""

    def __init__(self, certs, replies):
        import http.server
        import ssl
        import threading
        self.certs, self.replies, self.calls = certs, replies, []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                endpoint = self.path.rsplit("/", 1)[-1]
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.calls.append(endpoint)
                reply = fake.replies.get(endpoint, {})
                body = reply if isinstance(reply, bytes) else json.dumps(reply).encode()   # bytes: sent as they are
                self.send_response(201 if endpoint == "getlink" else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


GOOD_TOKEN, GOOD_KEY = "t" * 43, "k" * 43


def link_reply(**fields):
    """A getlink answer as satellite gives it, with some fields replaced."""
    alias = fields.get("alias", "fresh-askew-depict")
    reply = {"alias": alias, "url": f"https://{alias}.sat.test:8443/?token={GOOD_TOKEN}", "token": GOOD_TOKEN,
             "key": GOOD_KEY, "state": "queued", "expires": "2026-11-25T10:00:00Z"}
    reply.update(fields)
    return reply


@pytest.fixture
def fake_satellite(certs):
    fakes = []

    def make(replies):
        fakes.append(FakeSatellite(certs, replies))
        return fakes[-1]
    yield make
    for fake in fakes:
        fake.stop()


INJECTED = "pwn\nid > pwned_by_satellite; echo INJECTED #"


@pytest.mark.parametrize("reply, field", [
    (link_reply(alias=INJECTED), "alias"),                                   # a shell line in job.sh
    (link_reply(alias="../../.ssh"), "alias"),                               # a path outside the sessions
    (link_reply(alias="fresh-askew-depict\n#SBATCH --wrap=id"), "alias"),    # a directive
    (link_reply(url="https://fresh-askew-depict.sat.test/\x1b]0;owned\x07\x1b[2J?token=" + GOOD_TOKEN), "url"),
    (link_reply(url="https://evil.example.org/?token=" + GOOD_TOKEN), "url"),       # another site's link
    (link_reply(url="https://fresh-askew-depict.sat.test/?token=" + "x" * 43), "url"),  # not the token issued
    (link_reply(token="$(id>pwned_by_satellite)" + "t" * 30), "token"),
    (link_reply(key="k" * 40 + "\nid"), "key"),
    (link_reply(state="\x1b[2Jproxied"), "state"),
])
def test_a_hostile_satellites_link_reply_is_refused_before_it_touches_disk_or_terminal(
        tmp_path, certs, fake_satellite, reply, field):
    fake = fake_satellite({"getlink": reply})
    client = Client(tmp_path / "home", fake)
    work = tmp_path / "work"
    work.mkdir()
    result = client.run("launch", "--scheduler", "local", "--workdir", str(work), "--command", ECHO_APP)
    for alias in client.sessions():                        # a launch that went ahead: let its job start
        wait_for(lambda: "satellite-agent" in (client.session_dir(alias) / "job.log").read_text(), timeout=30,
                 what="the job to start")
    assert not (work / "pwned_by_satellite").exists(), "satellite's reply ran a command in the user's job"
    assert "\x1b" not in result.stdout + result.stderr, "satellite's reply reached the terminal raw"
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"satellite's reply: {field}" in result.stderr and "Traceback" not in result.stderr
    assert client.sessions() == [] and not (client.home / ".ssh").exists()     # nothing written
    assert fake.calls == ["getlink"]                                            # nothing submitted, no more calls


def test_a_hostile_satellites_status_and_errors_reach_the_terminal_without_control_characters(
        tmp_path, certs, fake_satellite):
    fake = fake_satellite({"getlink": link_reply(), "state": {}, "redeem": {},
                           "status": {"state": "\x1b]0;owned\x07proxied", "expires": "\x1b[2Jsoon"},
                           "release": {"error": "gone \x1b[31mred"}})
    client = Client(tmp_path / "home", fake)
    launched = client.run("launch", "--scheduler", "local", "--command", ECHO_APP)
    assert launched.returncode == 0, launched.stderr
    for command in (["list"], ["status", "fresh-askew-depict"], ["list", "--json"]):
        result = client.run(*command)
        assert "\x1b" not in result.stdout + result.stderr, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
    status = client.run("status", "fresh-askew-depict")
    assert status.returncode == 1 and "satellite's reply: state" in status.stdout


# option values that would break out of a directive ------------------------------------------

@pytest.mark.parametrize("scheduler, option, value", [
    ("slurm", "--partition", "debug\ntouch PWNED #"),                   # a shell line among the #SBATCH lines
    ("slurm", "--gres", "gpu:1\n#SBATCH --wrap=id"),
    ("slurm", "--account", "abc --wrap=id"),                            # a second option on the line
    ("htcondor", "--account", "grp\nqueue 1 in (x) \nexecutable = /bin/touch"),   # a rewritten job.sub
    ("lsf", "--constraint", 'avx]" -Is -R "x'),                          # out of -R "select[...]"
    ("pbs", "--partition", "workq\ntouch PWNED"),
    ("sge", "--reservation", "42\ntouch PWNED"),
    ("sge", "--account", "proj'x"),
])
def test_option_values_that_would_break_out_of_a_directive_are_refused(tmp_path, job_satellite, scheduler,
                                                                        option, value):
    client = Client(tmp_path / "home", job_satellite)
    before = len(job_satellite.rows())
    result = dry_run(client, "--scheduler", scheduler, option, value, "--command", ECHO_APP)
    assert result.returncode == 2, "rendered:\n" + result.stdout
    assert f"{option} " in result.stderr and "letters, digits and" in result.stderr, result.stderr
    assert len(job_satellite.rows()) == before and client.sessions() == []


def test_a_shared_working_directory_named_like_a_shell_line_runs_nothing(tmp_path, job_satellite):
    """Another user names a shared project directory 'proj<newline>touch PWNED_sge #'; the victim launches
    from there (the working directory defaults to where they are). Grid Engine's -wd put it in a directive."""
    client, state = standin_client(tmp_path, job_satellite, "sge")
    shared = tmp_path / "proj\ntouch PWNED_sge #"
    shared.mkdir()
    result = client.run("launch", "--json", "--scheduler", "sge", "--command", ECHO_APP, "--wait", cwd=shared)
    assert not (shared / "PWNED_sge").exists(), "a directory name ran as a shell line in the victim's job"
    assert result.returncode == 2 and "control characters" in json.loads(result.stdout)["error"]   # refused outright
    assert client.sessions() == []


# container paths with braces ---------------------------------------------------------------

def test_braces_in_container_paths_reach_the_container_runtime_as_written(client, tmp_path):
    """--sif and --bind are paths, not templates: braces in them are the user's, and the agent fills in only
    {host}, {port} and the like (it crashed with KeyError: 'lab')."""
    result = client.run("launch", "--scheduler", "local", "--sif", "/images/{lab}.sif", "--bind", "/data/{x},/s",
                        "--command", ECHO_APP)
    assert result.returncode == 0, result.stderr
    log = client.session_dir(client.sessions()[0]) / "job.log"
    wait_for(lambda: "link released" in log.read_text(), timeout=60, what="the agent to give up on the app")
    text = log.read_text()
    assert "Traceback" not in text, text
    assert re.search(r"starting the app .*?: \S+ exec --bind '/data/\{x\}' --bind /s '/images/\{lab\}\.sif' ", text)


# relative paths ---------------------------------------------------------------------------

def test_relative_paths_are_made_absolute_at_launch_and_in_profiles(tmp_path, job_satellite, certs):
    """--cacert ca.pem given in the home directory, --workdir a shared project directory where another user
    planted their own ca.pem: the agent (which starts in the workdir) loaded theirs."""
    client = Client(tmp_path / "home", job_satellite)
    del client.env["SATELLITE_CACERT"]
    (client.home / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
    shared = tmp_path / "shared-project"
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(shared), "sat.test"], check=True)   # their own CA
    result = client.launch_json("--scheduler", "local", "--cacert", "ca.pem", "--workdir", str(shared),
                                "--command", ECHO_APP)
    log = client.session_dir(result["alias"]) / "job.log"
    wait_for(lambda: re.search(r"link ready|failed", log.read_text()), timeout=30, what="the agent to redeem")
    assert "link ready" in log.read_text(), log.read_text()
    listed = client.run("list", "--json", cwd="/")                  # anywhere, the session's files are found
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert json.loads(listed.stdout)[0]["state"] in ("mapped", "proxied")

    (client.home / "env/bin").mkdir(parents=True)
    (client.home / "env/bin/activate").write_text("")
    (client.home / "lab.sif").write_text("")
    saved = client.run("profile", "save", "mine", "--cacert", "ca.pem", "--venv", "env", "--sif", "lab.sif",
                       "--workdir", ".", "--satellite", client.env["SATELLITE_URL"])
    assert saved.returncode == 0, saved.stderr
    profile = json.loads(client.run("profile", "show", "mine", cwd="/").stdout)
    assert profile["cacert"] == str(client.home / "ca.pem") and profile["venv"] == str(client.home / "env")
    assert profile["sif"] == str(client.home / "lab.sif") and profile["workdir"] == str(client.home)
    script = client.run("launch", "--dry-run", "--profile", "mine", "--command", ECHO_APP, cwd=shared).stdout
    assert f"cd {client.home}\n" in script and f"source {client.home}/env/bin/activate" in script


# the local scheduler's job ids ---------------------------------------------------------------

def test_a_local_job_id_names_that_process_not_whatever_reuses_its_pid(client):
    result = client.launch_json("--scheduler", "local", "--command", ECHO_APP, "--wait")
    pid = int(re.match(r"[0-9]+", result["jobid"]).group())
    client.run("cancel", result["alias"], check=True)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the job's process to end")
    # the PID now belongs to an unrelated process (reuse, played by rewriting the saved id's PID part)
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        session = client.session_dir(result["alias"])
        info = json.loads((session / "session.json").read_text())
        info["jobid"] = re.sub(r"^[0-9]+", str(bystander.pid), result["jobid"])
        (session / "session.json").write_text(json.dumps(info))
        status = client.run("status", result["alias"]).stdout
        assert "job=done" in status, "status took an unrelated process for the job:\n" + status
        client.run("cancel", result["alias"])
        time.sleep(0.5)
        assert bystander.poll() is None, "cancel killed an unrelated process that reused the job's PID"
    finally:
        bystander.kill()
        bystander.wait()


# each known app logs in with the link's token, and keeps it out of argv and the environment -----------------

NOTEBOOK = {"cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [],
                       "source": "print(6 * 7)"}],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}

# app -> what another user would fetch without the token (the notebook list; the rendered notebook)
UNAUTHENTICATED = {"lab": "/api/contents", "notebook": "/api/contents", "voila": "/voila/render/report.ipynb"}


def app_process(port):
    """The pid of the process listening on 127.0.0.1:port (ss -ltnp), or on a Unix socket path (ss -lxp)."""
    if isinstance(port, str):
        out = [line for line in subprocess.run(["ss", "-Hlxp"], capture_output=True, text=True).stdout.splitlines()
               if f" {port} " in line][0]
    else:
        out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(re.search(r"pid=(\d+)", out).group(1))


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to an app on its Unix socket: what root (or the job's own user) could do on the node."""

    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


@pytest.mark.parametrize("app", sorted(UNAUTHENTICATED))
def test_a_known_app_refuses_requests_without_the_links_token_by_itself(tmp_path, job_satellite, app):
    client = Client(tmp_path / "home", job_satellite, {"JUPYTER_TOKEN": "", "PASSWORD": ""})
    work = tmp_path / "shared"
    work.mkdir()
    (work / "report.ipynb").write_text(json.dumps(NOTEBOOK))
    (work / "voila.py").write_text("open('PLANTED_CONFIG_RAN', 'w').close()\n")   # another user's plant
    result = client.launch_json("--scheduler", "local", "--app", app, "--venv", str(ROOT / ".venv"),
                                "--workdir", str(work), "--wait", timeout=240)
    token = result["url"].split("token=")[1]
    log = (client.session_dir(result["alias"]) / "job.log").read_text()
    on_socket = re.search(r"(?:starting the app on|relayed to) the Unix socket (\S+):", log)
    port = on_socket.group(1) if on_socket else int(re.search(r"starting the app on 127\.0\.0\.1:(\d+)", log).group(1))
    target = UNAUTHENTICATED[app]
    assert on_socket                 # Jupyter on its socket; Voila in a network namespace of its own, relayed to one
    # straight to the app (as root here: the socket's directory is the user's 0700 one)
    conn = UnixHTTPConnection(port) if on_socket else http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", target)
    refused = conn.getresponse()
    refused.read()
    assert refused.status in (302, 401, 403), f"{app} served {target} without the token ({refused.status})"
    conn.request("GET", f"{target}?token={token}")
    allowed = conn.getresponse()
    assert allowed.status == 200 and b"42" in allowed.read() if app == "voila" else allowed.status == 200
    pid = app_process(port) if not on_socket or on_socket.group(0).startswith("starting") else int(
        subprocess.run(["pgrep", "-n", "-f", str(client.session_dir(result["alias"]) / "app-config")],
                       capture_output=True, text=True).stdout.split()[0])     # in its own netns: ss here cannot see it
    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert token.encode() not in argv, "the token is on the app's command line (ps shows it to everyone)"
    assert token.encode() not in environ, "the token is in the app's environment: its kernels and terminals inherit it"
    assert not (work / "PLANTED_CONFIG_RAN").exists(), "the app ran a config file planted in the working directory"


# the environment a job is submitted with ----------------------------------------------------------

OUTER_SECRETS = {"SATELLITE_TOKEN": "outer-satellite-token-from-a-jupyter-terminal",
                 "JUPYTER_TOKEN": "outer-jupyter-token-from-a-jupyter-terminal",
                 "PASSWORD": "outer-code-server-password", "JPY_API_TOKEN": "outer-hub-api-token"}


@pytest.mark.parametrize("scheduler", ["htcondor", "lsf", "local"])
def test_the_launching_environments_secrets_reach_neither_the_scheduler_nor_the_app(tmp_path, job_satellite,
                                                                                     scheduler):
    """Launched from a Jupyter terminal, the environment holds that server's token (and code-server's
    password): HTCondor's getenv = true copied it into the job's ClassAd (condor_q -l shows it to everyone),
    and every scheduler handed it to the job, where the app and its children inherit it."""
    if scheduler == "local":
        client, state = Client(tmp_path / "home", job_satellite), None
    else:
        client, state = standin_client(tmp_path, job_satellite, scheduler)
    client.env.update(OUTER_SECRETS)
    work = tmp_path / "work"
    work.mkdir()
    command = f"sh -c 'env > {work}/app.env; exec {ECHO_APP}'"
    result = client.launch_json("--scheduler", scheduler, "--workdir", str(work), "--command", command, "--wait")
    if state is not None:
        submitted = standin_calls(state)[0]
        assert submitted["cli"] in ("condor_submit", "bsub")
        for name in OUTER_SECRETS:
            assert name not in submitted["env"], f"the scheduler was given the launching shell's ${name}"
    if scheduler == "htcondor":
        description = submitted["description"]
        assert "getenv" not in description, "the submit description copies the whole environment:\n" + description
        assert not set(OUTER_SECRETS.values()) & set(re.split(r"[\s\"'=]", description))
    app_env = dict(line.split("=", 1) for line in (work / "app.env").read_text().splitlines() if "=" in line)
    for name, value in OUTER_SECRETS.items():
        assert value not in app_env.values(), f"${name} of the launching shell reached the app"
    token = result["url"].split("token=")[1]
    assert app_env["SATELLITE_TOKEN"] == token                       # a --command app gets the session's own


# what a site enforces ---------------------------------------------------------------------------

def test_what_the_site_enforces_in_its_config_nothing_the_user_runs_with_can_change(tmp_path, monkeypatch, certs,
                                                                                     capsys):
    satellite_client = client_module()
    site = tmp_path / "etc/client.ini"
    site.parent.mkdir()
    site.write_text(f"[client]\npartition = shared\n[enforced]\nsatellite = https://manage.sat.test\n"
                    f"cacert = {certs / 'ca.pem'}\nconnect = tunnel\n")
    monkeypatch.setattr(satellite_client, "SITE_CONFIG", str(site))      # /etc/satellite/client.ini
    for name in ("SATELLITE_CLIENT_CONFIG", "SATELLITE_URL", "SATELLITE_CACERT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other-ca.pem").write_text("")
    (tmp_path / ".satellite/profiles").mkdir(parents=True)
    (tmp_path / ".satellite/profiles/fast.json").write_text('{"connect": "direct"}')
    (tmp_path / "mine.ini").write_text("[client]\nconnect = auto\n")
    (tmp_path / "theirs.ini").write_text("[enforced]\nconnect = direct\n")
    launch = ["launch", "--dry-run", "--scheduler", "local", "--command", "app --port {port}"]
    for args, env, message in [
        (["--connect", "direct"], {}, "connect direct: this site requires connect = tunnel"),
        (["--profile", "fast"], {}, "this site requires connect = tunnel"),
        ([], {"SATELLITE_CACERT": str(tmp_path / "other-ca.pem")}, "this site requires cacert = "),
        ([], {"SATELLITE_URL": "https://satellite.evil.example"}, "this site requires satellite = "),
        ([], {"SATELLITE_CLIENT_CONFIG": str(tmp_path / "mine.ini")}, "this site requires connect = tunnel"),
        ([], {"SATELLITE_CLIENT_CONFIG": str(tmp_path / "theirs.ini")}, "[enforced] section is read only from"),
    ]:
        with monkeypatch.context() as scoped:
            for name, value in env.items():
                scoped.setenv(name, value)
            code = satellite_client.main(launch + args)
        assert code == 2 and message in capsys.readouterr().err, (args, env)
    options = satellite_client.launch_options(satellite_client.build_parser().parse_args(
        launch + ["--cacert", str(certs / "ca.pem"), "--partition", "debug"]))
    assert (options.connect, options.satellite, options.partition) == ("tunnel", "https://manage.sat.test", "debug")


@pytest.mark.parametrize("name", ["proj\n#$ -cwd -v BASH_ENV=.rc\n", "data\n#SBATCH --wrap=id\n", "tab\there"])
def test_a_shared_directory_whose_name_holds_a_directive_is_refused(tmp_path, job_satellite, name):
    """Quoting keeps bash safe, but a newline in the working directory's name still starts a line of job.sh,
    and Grid Engine reads '#$' lines anywhere in the script."""
    shared = tmp_path / name
    shared.mkdir()
    client = Client(tmp_path / "home", job_satellite)
    result = client.run("launch", "--scheduler", "sge", "--dry-run", "--command", ECHO_APP, cwd=shared)
    assert result.returncode == 2 and "control characters" in result.stderr and "#$ -cwd" not in result.stdout


@pytest.mark.parametrize("reply", [[], "a string", None, 42])
def test_a_satellite_reply_that_is_not_an_object_is_a_clear_failure(tmp_path, certs, fake_satellite, reply):
    fake = fake_satellite({"getlink": reply})
    client = Client(tmp_path / "home", fake)
    result = client.run("launch", "--scheduler", "local", "--command", ECHO_APP)
    assert result.returncode == 1 and "not a JSON object" in result.stderr and "Traceback" not in result.stderr
    assert client.sessions() == []


def test_a_satellite_reply_too_large_is_not_read_whole(tmp_path, certs, fake_satellite):
    fake = fake_satellite({"getlink": {"alias": "x" * 4_000_000}})
    client = Client(tmp_path / "home", fake)
    result = client.run("launch", "--scheduler", "local", "--command", ECHO_APP)
    assert result.returncode == 1 and "more than 65536 bytes" in result.stderr and "Traceback" not in result.stderr


# issue 15: limits as the scheduler reads them, --json, list, prune, dry runs, CA errors -------------------

@pytest.mark.parametrize("given, directive", [
    ("90", "--time=01:30:00"), ("90:00", "--time=01:30:00"), ("1:30:00", "--time=01:30:00"),
    ("1-2", "--time=1-02:00:00"), ("1-2:30", "--time=1-02:30:00"), ("2-00:00:30", "--time=2-00:00:30"),
])
def test_time_limits_are_read_as_slurm_reads_them_and_echoed(client, given, directive):
    """`--time-limit 90:00` is 90 minutes to Slurm (MM:SS), not 90 hours; D-HH and D-HH:MM are days and hours."""
    result = dry_run(client, "--scheduler", "slurm", "--command", ECHO_APP, "--time-limit", given)
    assert result.returncode == 0, result.stderr
    assert f"#SBATCH {directive}\n" in result.stdout
    assert f"time limit {directive.split('=')[1]}" in result.stderr        # echoed, as parsed


@pytest.mark.parametrize("given", ["0", "0:00", "00:00:00", "0-0", "1:60", "90m30", "-5"])
def test_a_zero_or_malformed_time_limit_is_refused(client, given):
    """0 is "no limit" to Slurm while the link would get minutes: refused, like forms Slurm does not read."""
    result = dry_run(client, "--scheduler", "slurm", "--command", ECHO_APP, "--time-limit", given)
    assert result.returncode == 2 and "--time-limit" in result.stderr, result.stderr


def test_launch_echoes_the_parsed_time_limit(client):
    result = client.run("launch", "--scheduler", "local", "--command", ECHO_APP, "--time-limit", "90:00")
    assert result.returncode == 0, result.stderr
    assert "time limit 01:30:00" in result.stdout


def test_a_dry_run_needs_no_satellite(tmp_path, job_satellite):
    client = Client(tmp_path / "home", job_satellite)
    del client.env["SATELLITE_URL"]
    result = dry_run(client, "--scheduler", "slurm", "--command", ECHO_APP)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --time=01:00:00" in result.stdout


def test_json_errors_are_json_on_stdout(tmp_path, job_satellite):
    client = Client(tmp_path / "home", job_satellite)
    result = client.run("launch", "--json", "--scheduler", "local", "--time-limit", "soon")
    assert result.returncode == 2
    assert "--time-limit" in json.loads(result.stdout)["error"]
    client.env["SATELLITE_URL"] = f"https://127.0.0.1:{closed_port()}"
    result = client.run("launch", "--json", "--scheduler", "local", "--command", ECHO_APP)
    assert result.returncode == 1
    assert "cannot reach satellite" in json.loads(result.stdout)["error"]
    result = client.run("status", "--json", "no-such-alias")
    assert result.returncode == 2 and "no session" in json.loads(result.stdout)["error"]


def test_json_wait_prints_the_link_before_waiting(client):
    result = client.run("launch", "--json", "--wait", "--scheduler", "local", "--command", ECHO_APP)
    assert result.returncode == 0, result.stderr
    first, *_, last = [json.loads(line) for line in result.stdout.splitlines()]
    assert first["state"] == "queued" and first["url"].startswith("https://") and "key" not in first
    assert last["state"] == "proxied" and last["url"] == first["url"]


def test_a_wrong_ca_says_to_check_cacert(client):
    client.env["SATELLITE_CACERT"] = "/etc/ssl/certs/ca-certificates.crt"      # the system's CAs, not satellite's
    result = client.run("launch", "--scheduler", "local", "--command", ECHO_APP)
    assert result.returncode == 1 and "--cacert" in result.stderr and "site config" in result.stderr, result.stderr


def test_list_shows_live_sessions_prunes_ended_and_fails_when_satellite_is_unreachable(client):
    ended = client.launch_json("--scheduler", "local", "--command", ECHO_APP, "--wait")
    live = client.launch_json("--scheduler", "local", "--command", ECHO_APP, "--wait")
    client.run("cancel", ended["alias"], check=True)
    shown = client.run("list", check=True).stdout
    assert live["alias"] in shown and ended["alias"] not in shown and "--all" in shown
    assert {row["alias"] for row in json.loads(client.run("list", "--all", "--json", check=True).stdout)} == \
        {ended["alias"], live["alias"]}
    pruned = client.run("prune", check=True).stdout
    assert ended["alias"] in pruned and client.sessions() == [live["alias"]]

    info_path = client.session_dir(live["alias"]) / "session.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(dict(info, satellite=f"https://127.0.0.1:{closed_port()}")))
    try:
        result = client.run("list")
        assert result.returncode == 1 and "cannot reach satellite" in result.stderr
        assert client.run("prune").returncode == 1 and client.sessions() == [live["alias"]]   # unknown: kept
    finally:
        info_path.write_text(json.dumps(info))


def test_help_teaches_time_limits_list_and_prune():
    client = [sys.executable, str(ROOT / "satellite_client.py")]
    launch = subprocess.run([*client, "launch", "--help"], capture_output=True, text=True).stdout
    assert "90:00 is 90 minutes" in " ".join(launch.split()) and "{\"error\"" in launch
    top = subprocess.run([*client, "--help"], capture_output=True, text=True).stdout
    assert "prune" in top
    listing = " ".join(subprocess.run([*client, "list", "--help"], capture_output=True, text=True).stdout.split())
    assert "--all" in listing and "pending with the reason it waits" in listing and "Exits 1" in listing


# issue 22: low findings ----------------------------------------------------------------------------

def test_app_listens_from_a_config_file_named_like_the_enforced_section_is_refused(tmp_path, job_satellite):
    """app-listens is the site's alone: it was taken from any source whose label ended in "[enforced]", and a
    config file's label ends in its path, so a file named so (SATELLITE_CLIENT_CONFIG) set it."""
    config = tmp_path / "client.ini [enforced]"
    config.write_text("[client]\napp-listens = cluster-network-unprotected\n")
    client = Client(tmp_path / "home", job_satellite, {"SATELLITE_CLIENT_CONFIG": str(config)})
    result = dry_run(client, "--scheduler", "local", "--command", ECHO_APP)
    assert result.returncode == 2 and "app-listens is the site's alone" in result.stderr, result.stdout


@pytest.mark.parametrize("as_json", [False, True])
def test_a_satellite_reply_of_nested_brackets_is_a_clear_failure(tmp_path, certs, fake_satellite, as_json):
    """60,000 '[' fit in MAX_REPLY and nest deeper than the JSON parser recurses: RecursionError, a traceback."""
    fake = fake_satellite({"getlink": b"[" * 60_000})
    client = Client(tmp_path / "home", fake)
    result = client.run("launch", *(["--json"] if as_json else []), "--scheduler", "local", "--command", ECHO_APP)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    message = json.loads(result.stdout)["error"] if as_json else result.stderr
    assert "not a JSON object" in message
    assert client.sessions() == []


class RawTlsServer:
    """One TLS listener on loopback answering every connection with the same bytes after the request head."""

    def __init__(self, certs, answer: bytes):
        import ssl
        import threading
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.answer = self.listener.getsockname()[1], answer
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            raw, _ = self.listener.accept()
        except OSError:
            return                                  # closed before anyone came
        with self.context.wrap_socket(raw, server_side=True) as conn:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            conn.sendall(self.answer)

    def stop(self):
        self.listener.close()
        self.thread.join(timeout=30)


@pytest.mark.parametrize("body", [b"[" * 60_000, b"[]", b'"gone"'])
def test_a_hostile_tunnel_refusal_is_an_api_refusal_not_a_crash(certs, body):
    """The agent's tunnel attach reads the refusal's JSON error: nested brackets, a list or a string there
    raised RecursionError or AttributeError out of open_tunnel instead of a Failure the keeper handles."""
    satellite_client = client_module()
    server = RawTlsServer(certs, b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                                 b"Connection: close\r\n\r\n" + body)
    try:
        api = satellite_client.SatelliteApi(f"https://127.0.0.1:{server.port}", str(certs / "ca.pem"), timeout=30)
        with pytest.raises(satellite_client.ApiRefused) as refused:
            api.open_tunnel("k" * 43, 1)
        assert refused.value.status == 403 and "403 Forbidden" in refused.value.reason
    finally:
        server.stop()


FLOOD = """yes "$(head -c 1000 /dev/zero | tr '\\0' x)" | head -c {size} >> "$(dirname "$SATELLITE_TOKEN_FILE")/job.log"
echo app broke
exit 3
"""
MEASURED = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak-rss-kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(code)")


def test_wait_shows_the_end_of_a_flooded_job_log_without_reading_it_whole(tmp_path, job_satellite):
    """Anyone who can write the job log can make it huge; --wait's failure path read all of it to show its last
    lines. The job here appends 128 MB to its own log, then fails: the client's peak memory stays small."""
    flood = tmp_path / "flood.sh"
    flood.write_text(FLOOD.format(size=128_000_000))
    client = Client(tmp_path / "home", job_satellite,
                    command=[sys.executable, "-c", MEASURED, sys.executable, str(ROOT / "satellite_client.py")])
    result = client.run("launch", "--scheduler", "local", "--command", f"sh {flood} {{port}}", "--wait")
    assert result.returncode == 1 and "the job ended before the app was ready" in result.stderr, result.stderr[-3000:]
    log = client.session_dir(client.sessions()[0]) / "job.log"
    assert log.stat().st_size > 128_000_000
    tail = result.stderr.split(f"Last lines of {log}:\n", 1)[1]
    assert "app broke" in tail and len(tail) < 20_000
    peak_kb = int(re.search(r"peak-rss-kb (\d+)", result.stderr).group(1))
    assert peak_kb < 100_000, f"the client peaked at {peak_kb} KB reading a 128 MB log"


BREAKOUT = "x\n#$ -v BASH_ENV=/tmp/evil -o /tmp/job.out -l h_rt=99:00:00"


@pytest.mark.parametrize("setting", ["python", "conda-env", "env-modules", "bind", "command", "venv"])
@pytest.mark.parametrize("source", ["command line", "profile", "client.ini"])
def test_a_control_character_in_any_value_that_reaches_job_sh_is_refused(tmp_path, job_satellite, setting, source):
    """Quoting keeps bash safe, but a newline inside a quoted value still starts a line of job.sh, and Grid
    Engine reads '#$' lines anywhere: a value from a shared profile or site config set -v BASH_ENV, -o, h_rt."""
    value = ECHO_APP + BREAKOUT if setting == "command" else BREAKOUT
    client = Client(tmp_path / "home", job_satellite)
    args = ["--scheduler", "sge", "--sif", "/images/lab.sif"] + ([] if setting == "command" else ["--command", ECHO_APP])
    if source == "command line":
        args += [f"--{setting}", value]
    elif source == "profile":
        profiles = client.home / ".satellite/profiles"
        profiles.mkdir(parents=True)
        (profiles / "shared.json").write_text(json.dumps({setting.replace("-", "_"): value}))
        args += ["--profile", "shared"]
    else:                        # an INI value goes on over indented lines; a line starting with # is a comment
        config = tmp_path / "client.ini"
        config.write_text(f"[client]\n{setting} = {value.replace(chr(10), chr(10) + '  ').replace('#$', 'set')}\n")
        client.env["SATELLITE_CLIENT_CONFIG"] = str(config)
    result = client.run("launch", "--dry-run", *args)
    assert result.returncode == 2, "rendered:\n" + result.stdout
    assert f"--{setting} " in result.stderr and "control character" in result.stderr, result.stderr
    assert "BASH_ENV" not in result.stdout and client.sessions() == []


@pytest.mark.parametrize("app", ["echo_app", "http.server"])
def test_launch_wait_probes_the_link_without_its_token_so_the_apps_log_never_holds_it(client, tmp_path, app):
    """--wait asks for the link every second until the app answers: with ?token= in the URL, an app that logs
    its request lines (the README's http.server example: to the job log) logged the live token each time."""
    requests, work = tmp_path / "requests.log", tmp_path / "work"
    work.mkdir()
    command = (f"env APP_REQUEST_LOG={requests} {ECHO_APP}" if app == "echo_app"
               else f"{sys.executable} -m http.server {{port}} --bind {{host}}")
    result = client.launch_json("--scheduler", "local", "--workdir", str(work), "--command", command, "--wait")
    assert result["state"] == "proxied"
    token = result["url"].split("token=")[1]
    logged = (requests if app == "echo_app" else client.session_dir(result["alias"]) / "job.log").read_text()
    assert token not in logged and "token=" not in logged, logged
    assert re.search(r"GET /[ \n]", logged), logged           # the probe reached the app, and it logged that

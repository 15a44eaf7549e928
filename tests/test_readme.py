"""The README's API walkthrough is a script: run it verbatim against a real satellite."""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from conftest import DOMAIN, ROOT, SatelliteServer, wait_for


def readme_api_block():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(SAT=.*?)```", text, re.S)
    assert len(blocks) == 1, "expected one API walkthrough block starting with SAT="
    return blocks[0]


def test_readme_api_walkthrough_runs(tmp_path):
    # as the demo runs it: domain sat.localhost (curl resolves *.localhost), redeem from loopback
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(tmp_path / "certs"), "sat.localhost"], check=True)
    satellite = SatelliteServer(tmp_path / "certs", tmp_path, ["--domain", "sat.localhost",
                                                               "--redeem-from", "127.0.0.0/8"]).start()
    try:
        run_walkthrough(satellite, tmp_path)
    finally:
        satellite.stop()


def run_walkthrough(satellite, tmp_path):
    script = readme_api_block()
    script = re.sub(r"^SAT=\S+", f"SAT=https://127.0.0.1:{satellite.port}", script, flags=re.M)
    script = re.sub(r"^CA=\S+", f"CA={satellite.certs / 'ca.pem'}", script, flags=re.M)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^alias=[a-z]+-[a-z]+-[a-z]+$", out, re.M)
    assert '"jobid": "4242"' in out
    assert "state=mapped" in out and "target=127.0.0.1:8888" in out
    lines = out.splitlines()
    assert "404" in lines and "state=ended" in lines and lines[-1] == "410"


def readme_launch_examples():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Examples for each scheduler.*?```sh\n(.*?)```", text, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("satellite-client launch")]


def test_readme_scheduler_examples_render_what_they_say(tmp_path, job_satellite):
    from conftest import Client
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "sbatch").symlink_to("/bin/false")            # a Slurm site, as the first example assumes
    client = Client(tmp_path / "home", job_satellite, {"PATH": f"{fakebin}:/usr/bin:/bin"})
    examples = readme_launch_examples()
    assert len(examples) == 7
    outputs = []
    for line in examples:
        args = shlex.split(line)[2:]
        result = client.run("launch", "--dry-run", *args)
        assert result.returncode == 0, (line, result.stderr)
        outputs.append(result.stdout)
    slurm, pbs, lsf, condor, sge, local, container = outputs
    assert "#SBATCH --gpus=1" in slurm and "#SBATCH --gres=gpu:a100:1" in slurm
    assert "#PBS -l select=2:ncpus=4:mpiprocs=4:mem=512mb:ngpus=2" in pbs
    assert "#BSUB -W 150" in lsf and '#BSUB -R "rusage[mem=8192MB]"' in lsf and "#BSUB -M 8192MB" in lsf
    assert "# job.sub (submit description):" in condor and "request_gpus = 1" in condor
    assert "#$ -pe smp 4" in sge and "#$ -l h_vmem=4G" in sge
    assert [l for l in local.splitlines() if l.startswith("#") and not l.startswith("# ")] == ["#!/bin/bash"]
    assert "{container} exec --bind /scratch --bind /data --nv" in container


def test_the_readme_gives_the_hostile_corpus_size_once_and_right():
    """One figure for the hostile corpus, in the security table, equal to the corpus (it said 89 in one place
    and 234 in another)."""
    corpus = json.loads((ROOT / "tests/corpus/hostile_requests.json").read_text())
    figures = re.findall(r"(\d+) (?:crafted|hostile) requests", (ROOT / "README.md").read_text())
    assert figures == [str(len(corpus))]


# ---- the Deployment section, run top to bottom as root, as an admin would ----------------------------------

def readme_deployment():
    """The Deployment section's steps (text) and its shell blocks, in order, unindented."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deployment"):text.index("### Files and modes")]
    blocks = [textwrap.dedent(block) for block in re.findall(r"```sh\n(.*?)```", section, re.S)]
    steps = dict(re.findall(r"^(\d)\. \*\*(.*?)(?=^\d\. \*\*|\Z)", section, re.S | re.M))
    return steps, blocks


def edits(step_text):
    """The settings a step says to set: `name = value` in backticks."""
    return dict(re.findall(r"`([a-z-]+) = ([^`]+)`", step_text))


def edit_ini(path, settings):
    text = path.read_text()
    for name, value in settings.items():
        text, count = re.subn(rf"^#? ?{re.escape(name)} = .*$", f"{name} = {value}", text, count=1, flags=re.M)
        if not count:
            text += f"{name} = {value}\n"
    path.write_text(text)


def test_readme_deployment_runs_top_to_bottom(certs, tmp_path):
    """As root, into a temporary root (R stands for /), in a network namespace of its own (so satellite
    listens on 443 as the README says, and /etc/hosts there names the proxy node): install, edit, check, start
    (systemd-analyze verify for the unit, then the README's no-systemd line, which the unit's settings mirror),
    curl; then the login node's block. Every command is the README's, only its paths moved under R."""
    steps, blocks = readme_deployment()
    assert len(blocks) == 5, "install, check, start, start without systemd, login node"
    install, check, start, start_plain, login = blocks
    root = Path(tempfile.mkdtemp(prefix="satellite-root-", dir="/tmp"))    # the satellite user must get in
    root.chmod(0o755)
    work = tmp_path / "src"                                   # the unpacked source, the certificate beside it
    work.mkdir()
    (work / "contrib").symlink_to(ROOT / "contrib")
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output-dir", str(work / "dist")], check=True,
                   capture_output=True)
    shutil.copy(certs / "cert.pem", work / "fullchain.pem")
    shutil.copy(certs / "key.pem", work / "privkey.pem")
    for directory in ("etc/systemd/system", "etc/cron.d", "etc/logrotate.d", "usr/local/bin", "var/lib", "var/log"):
        (root / directory).mkdir(parents=True)
    netns = f"satdeploy{os.getpid()}"
    hosts_dir = Path("/etc/netns") / netns                   # ip netns exec mounts these over /etc inside
    created_user = subprocess.run(["id", "-u", "satellite"], capture_output=True).returncode != 0

    def moved(text):
        text = text.replace("sat.example.edu", DOMAIN)
        return re.sub(r"(?<![\w.~/-])/(etc|var|usr/local)/", rf"{root}/\1/", text)

    def run(script, env=None):
        result = subprocess.run(["ip", "netns", "exec", netns, "bash", "-euxo", "pipefail", "-c", script], cwd=work,
                                capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, CURL_CA_BUNDLE=str(certs / "ca.pem"), **(env or {})))
        return result
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        hosts_dir.mkdir(parents=True)
        (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost manage.{DOMAIN}\n")
        assert run("ip link set lo up").returncode == 0

        result = run(moved(install).replace("useradd ", "id -u satellite >/dev/null 2>&1 || useradd "))
        assert result.returncode == 0, result.stderr
        key = (root / "etc/satellite/tls/privkey.pem").stat()
        gid = int(subprocess.run(["id", "-g", "satellite"], capture_output=True, text=True).stdout)
        assert (key.st_uid, key.st_gid, key.st_mode & 0o777) == (0, gid, 0o640)     # others cannot read the key
        ini = root / "etc/satellite/satellite.ini"
        edit_ini(ini, {name: moved(value) for name, value in edits(steps["4"]).items()})
        assert set(edits(steps["4"])) == {"domain", "issue-from", "redeem-from"}
        ini.write_text(moved(ini.read_text()))              # its paths, too, are under R

        result = run(moved(check))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "FAIL" not in result.stdout
        assert re.search(r"^WARN listen \[::\]:443: .*CAP_NET_BIND_SERVICE", result.stdout, re.M), result.stdout
        assert f"OK   certificate covers *.{DOMAIN}" in result.stdout

        unit = root / "etc/systemd/system/satellite.service"
        serve = moved(start_plain).strip().rstrip("&") + f">{root}/serve.log 2>&1 & echo $! > {root}/satellite.pid"
        systemctl = "systemctl daemon-reload && systemctl enable --now satellite"
        assert systemctl in start
        script = moved(start).replace(systemctl, f"systemd-analyze verify {unit}\n{serve}")
        script = script.replace("curl ", "curl -sS --retry 30 --retry-connrefused --retry-delay 1 ")
        result = run(script)
        assert result.returncode == 0, result.stderr + (root / "serve.log").read_text()
        assert result.stdout.strip() == "ok"
        unit_text = unit.read_text()
        assert "User=satellite" in unit_text and "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit_text
        assert "ExecStart=/usr/bin/python3 /usr/local/lib/satellite/satellite.pyz serve -c " \
               "/etc/satellite/satellite.ini" in unit_text        # what the no-systemd line runs
        uid = int(subprocess.run(["id", "-u", "satellite"], capture_output=True, text=True).stdout)
        for path in ("var/lib/satellite/satellite.db", "var/lib/satellite/satellite.cookie-key",
                     "var/log/satellite/audit.log"):
            st = (root / path).stat()
            assert (st.st_uid, st.st_mode & 0o777) == (uid, 0o600), path
        assert ((root / "var/lib/satellite").stat().st_mode & 0o777) == 0o700

        client_ini = work / "contrib/client.ini"
        assert "contrib/client.ini" in login
        edited = tmp_path / "client.ini"                     # the admin edits a copy: contrib stays as shipped
        shutil.copy(client_ini, edited)
        edit_ini(edited, {**{name: moved(value) for name, value in edits(steps["7"]).items()},
                          "cacert": str(certs / "ca.pem")})
        assert set(edits(steps["7"])) == {"satellite"}
        result = run(moved(login).replace("contrib/client.ini", str(edited)),
                     env={"PATH": f"{root}/usr/local/bin:{os.environ['PATH']}",
                          "SATELLITE_CLIENT_CONFIG": f"{root}/etc/satellite/client.ini"})
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(rf"^OK   satellite at https://manage\.{re.escape(DOMAIN)} answers", result.stdout, re.M), \
            result.stdout
    finally:
        pid_file = root / "satellite.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="satellite to stop")   # then userdel may
        subprocess.run(["ip", "netns", "del", netns])
        shutil.rmtree(hosts_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        if created_user:
            subprocess.run(["userdel", "satellite"])

"""contrib/: each file checked by the tool that reads it, or run for real."""
import os
import shutil
import signal
import ssl
import socket
import subprocess
import sys

import pytest

from conftest import DOMAIN, ROOT, Client, stop_group, wait_for

CONTRIB = ROOT / "contrib"


def verified_unit(tmp_path, name):
    """The unit's text, once `systemd-analyze verify` found nothing to say about it."""
    unit = tmp_path / name
    shutil.copy(CONTRIB / name, unit)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and name not in result.stderr, result.stderr
    return unit.read_text()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_unit_verifies_and_is_hardened(tmp_path):
    text = verified_unit(tmp_path, "satellite.service")
    for line in ("User=satellite", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "ProtectSystem=strict",
                 "NoNewPrivileges=yes", "StateDirectory=satellite", "ExecReload=/bin/kill -HUP $MAINPID",
                 "UMask=0077", "StateDirectoryMode=0700", "LogsDirectory=satellite", "LogsDirectoryMode=0750"):
        assert line in text


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_front_sync_unit_verifies(tmp_path):
    text = verified_unit(tmp_path, "satellite-front-sync.service")
    for line in ("User=satellite", "--watch", "--group satellite-front", "NoNewPrivileges=yes", "UMask=0077"):
        assert line in text


def test_cron_entry_runs_refresh(certs, tmp_path, fresh_satellite):
    satellite = fresh_satellite()
    link = satellite.getlink()
    assert satellite.api("state", key=link["key"], state="running", jobid="4242")[0] == 200
    ini = tmp_path / "satellite.ini"
    # jobstate-command: a stand-in for squeue here; the real squeue line is run by tests/test_jobs.py
    ini.write_text(f"[satellite]\ndomain = {DOMAIN}\ndb = {satellite.db}\ncert = {certs}/cert.pem\n"
                   f"key = {certs}/key.pem\njobstate-command = echo 4242 TIMEOUT\n")
    entries = [line for line in (CONTRIB / "satellite.cron").read_text().splitlines()
               if line and not line.startswith("#")]
    assert len(entries) == 1
    fields = entries[0].split(None, 6)
    assert fields[:5] == ["*"] * 5 and fields[5] == "satellite"
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output-dir", str(tmp_path)], check=True,
                   capture_output=True)
    command = (fields[6].replace("/usr/local/lib/satellite/satellite.pyz", str(tmp_path / "satellite.pyz"))
               .replace("/etc/satellite/satellite.ini", str(ini)).replace(">/dev/null", ""))
    result = subprocess.run(command, shell=True, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("refresh: "), result.stderr
    assert "1 sessions ended with their job" in result.stdout
    assert satellite.api("status", key=link["key"])[1]["ended_because"] == "job hit its time limit"


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate not installed")
def test_logrotate_config_is_valid(tmp_path):
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "audit.log").write_text('{"event": "issue"}\n')
    config = (CONTRIB / "satellite.logrotate").read_text().replace("/var/log/satellite", str(logs))
    config = config.replace("su satellite satellite", "su root root")
    (tmp_path / "rotate.conf").write_text(config)
    result = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(tmp_path / "rotate.conf")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr
    assert "copytruncate" in result.stderr or "copying" in result.stderr or str(logs) in result.stderr


def test_certbot_hook_installs_the_new_pair_and_satellite_serves_it(fresh_satellite, tmp_path):
    live = tmp_path / "live"
    renewed = tmp_path / "renewed"
    subprocess.run([str(CONTRIB / "dev-ca.sh"), str(tmp_path / "old"), DOMAIN], check=True)
    subprocess.run([str(CONTRIB / "dev-ca.sh"), str(tmp_path / "new"), DOMAIN], check=True)
    live.mkdir()
    shutil.copy(tmp_path / "old/cert.pem", live / "fullchain.pem")
    shutil.copy(tmp_path / "old/key.pem", live / "privkey.pem")
    renewed.mkdir()
    shutil.copy(tmp_path / "new/cert.pem", renewed / "fullchain.pem")       # certbot's names in its lineage
    shutil.copy(tmp_path / "new/key.pem", renewed / "privkey.pem")
    satellite = fresh_satellite("--cert", str(live / "fullchain.pem"), "--key", str(live / "privkey.pem"))
    env = dict(os.environ, RENEWED_LINEAGE=str(renewed), SATELLITE_TLS_DIR=str(live), SATELLITE_GROUP="root",
               SATELLITE_RELOAD=f"kill -HUP {satellite.proc.pid}")
    result = subprocess.run([str(CONTRIB / "certbot-deploy-hook")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "certificate reloaded" in satellite.log_text(), what="reload")
    context = ssl.create_default_context(cafile=str(tmp_path / "new/ca.pem"))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", satellite.port)),
                             server_hostname=f"manage.{DOMAIN}") as sock:
        assert sock.version()                                   # the renewed certificate verifies
    assert (live / "privkey.pem").stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(not shutil.which("ruby"), reason="ruby (for Open OnDemand's ERB) not installed")
def test_open_ondemand_app_renders_and_its_script_launches_through_satellite(job_satellite, tmp_path):
    app = CONTRIB / "ood/satellite_jupyter"
    for template in ("submit.yml.erb", "view.html.erb", "template/script.sh.erb"):
        compiled = subprocess.run(f"erb -x -T - {app / template} | ruby -c", shell=True, capture_output=True,
                                  text=True)
        assert compiled.stdout.strip() == "Syntax OK", (template, compiled.stderr)
    render = ("require 'erb'; require 'ostruct'; context = OpenStruct.new(flavour: 'lab', bc_num_hours: '1');"
              "print ERB.new(File.read(ARGV[0])).result(binding)")
    script = subprocess.run(["ruby", "-e", render, str(app / "template/script.sh.erb")], capture_output=True,
                            text=True, check=True).stdout
    assert "--jupyter lab" in script and "--time-limit 60" in script
    (tmp_path / "script.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "script.sh")]).returncode == 0
    # run it as OnDemand would inside the job: Jupyter starts, the link works, ending the job releases it
    client = Client(tmp_path / "home", job_satellite)
    wrapper = tmp_path / "satellite-client"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'satellite_client.py'} \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(client.env, SATELLITE_CLIENT=str(wrapper), PATH=f"{ROOT / '.venv/bin'}:{os.environ['PATH']}")
    job = subprocess.Popen(["bash", "-c", f"umask 022 && exec bash {tmp_path / 'script.sh'}"], cwd=tmp_path, env=env,
                           start_new_session=True)                  # a batch job's usual umask
    try:
        url = wait_for(lambda: (tmp_path / "satellite_url").exists() and (tmp_path / "satellite_url").read_text()
                       .strip(), timeout=60, what="the link")
        assert (tmp_path / "satellite_url").stat().st_mode & 0o777 == 0o600, "the link (with its token) is readable by others"
        host = url.split("/")[2].split(":")[0]
        try:
            def lab_answers():
                assert job.poll() is None, f"the OnDemand script exited early with status {job.returncode}"
                return job_satellite.request(host, "/lab?token=" + url.split("token=")[1])[0] == 200
            wait_for(lab_answers, timeout=180, what="JupyterLab through the link")
        except AssertionError as exc:
            logs = "".join(p.read_text() for p in (tmp_path / "home/.satellite/sessions").glob("*/job.log"))
            raise AssertionError(f"{exc}; job log:\n" + logs[-3000:]) from None
    finally:
        os.killpg(job.pid, signal.SIGTERM)                            # as the scheduler ends a job
        stop_group(job, first=None, grace=30)
    wait_for(lambda: job_satellite.request(host, "/lab?token=" + url.split("token=")[1])[0] == 410,
             timeout=30, what="the link released when the job ended")


def test_the_nginx_front_holds_the_longest_host_names_export_allows(tmp_path):
    """contrib/nginx-satellite.conf's map_hash_bucket_size holds host names of NGINX_MAP_NAME_MAX characters
    (what `export --format nginx` checks the domain against), and nginx refuses one character more: the
    number in satellite.py is nginx's, not a guess."""
    import satellite
    conf = (CONTRIB / "nginx-satellite.conf").read_text()
    settings = [line for line in conf.splitlines() if line.startswith("map_hash_")]
    assert settings == ["map_hash_bucket_size 128;", "map_hash_max_size 65536;"]
    for length, builds in ((satellite.NGINX_MAP_NAME_MAX, True), (satellite.NGINX_MAP_NAME_MAX + 1, False)):
        (tmp_path / "names.map").write_text(f'"{"a" * (length - 9)}.sat.test" "x";\n'
                                            + "".join(f'"host{i}.sat.test" "x";\n' for i in range(5000)))
        (tmp_path / "nginx.conf").write_text(
            f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; events {{}}\n"
            f"http {{ {' '.join(settings)} map $host $route {{ hostnames; default \"\"; include {tmp_path}/names.map; }}\n"
            f"  server {{ listen 127.0.0.1:1; return 200 $route; }} }}\n")
        result = subprocess.run(["nginx", "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                                capture_output=True, text=True)
        assert (result.returncode == 0) == builds, (length, result.stderr)
        assert builds or "map_hash_bucket_size" in result.stderr
    assert satellite.export_domain_warning("nginx", "x" * (satellite.NGINX_MAP_NAME_MAX - 24)) is None
    assert "256" in satellite.export_domain_warning("nginx", "x" * (satellite.NGINX_MAP_NAME_MAX - 23))


def test_the_fronts_cron_lines_unit_conf_and_readme_agree(fresh_satellite, tmp_path):
    """The safety net works only if its export runs as satellite's user (export refuses a cookie key that is
    not its own), writes the file the front's configuration includes, and reloads nginx / updates HAProxy
    the way the watcher does: the cron lines, the watcher's unit, both fronts' configurations and the README
    name the same paths and commands. The nginx line then runs for real, as the cookie key's owner."""
    import shlex
    cron = (CONTRIB / "satellite.cron").read_text()
    lines = {}
    for line in cron.splitlines():
        if line.startswith("# * * * * * "):
            fields = line[2:].split(None, 6)
            assert fields[5] == "satellite", line                   # satellite's user, never root
            args = shlex.split(fields[6].replace(">/dev/null", ""))
            lines[args[args.index("--format") + 1]] = (line[2:], args)
    assert set(lines) == {"nginx", "haproxy"}
    option = {fmt: (lambda name, args=args: args[args.index(name) + 1]) for fmt, (_, args) in lines.items()}
    nginx_conf = (CONTRIB / "nginx-satellite.conf").read_text()
    haproxy_cfg = (CONTRIB / "haproxy-satellite.cfg").read_text()
    unit = (CONTRIB / "satellite-front-sync.service").read_text()
    assert f"include {option['nginx']('--output')};" in nginx_conf
    assert f"map_str({option['haproxy']('--output')})" in haproxy_cfg
    assert f"stats socket {option['haproxy']('--haproxy-socket')} " in haproxy_cfg
    reload = option["nginx"]("--reload-command")
    assert f"--reload-command '{reload}'" in nginx_conf and f"--reload-command '{reload}'" in unit
    assert f"NOPASSWD: {reload.replace('sudo -n ', '')}" in unit
    assert f"--output {option['nginx']('--output')} --group satellite-front" in unit
    assert f"--output {option['haproxy']('--output')} --group satellite-front" in unit
    assert f"--haproxy-socket {option['haproxy']('--haproxy-socket')}" in unit
    for fmt in lines:
        assert option[fmt]("--group") == "satellite-front"
    assert lines["nginx"][0] in (ROOT / "README.md").read_text()
    # the nginx line, run as the cookie key's owner (the test's user), paths adapted
    satellite = fresh_satellite()
    ini = tmp_path / "satellite.ini"
    ini.write_text(f"[satellite]\ndomain = {DOMAIN}\ndb = {satellite.db}\n")
    args = lines["nginx"][1]
    args = [sys.executable, str(ROOT / "satellite.py")] + args[args.index("export"):]
    args[args.index("-c") + 1] = str(ini)
    args[args.index("--output") + 1] = str(tmp_path / "nginx.map")
    args[args.index("--reload-command") + 1] = f"echo reloaded > {tmp_path / 'reloaded'}"
    del args[args.index("--group"):args.index("--group") + 2]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "# satellite export --format nginx" in (tmp_path / "nginx.map").read_text()
    assert (tmp_path / "reloaded").read_text() == "reloaded\n"

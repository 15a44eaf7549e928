"""Deploying as an HPC admin would: config mistakes named clearly, `satellite check` before the first start."""
import grp
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import DOMAIN, ROOT, start_group, stop_group, wait_for


def satellite(*args, timeout=30):
    return subprocess.run([sys.executable, str(ROOT / "satellite.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


def write_ini(path, certs, **settings):
    values = {"domain": DOMAIN, "listen": "127.0.0.1:0", "cert": f"{certs}/cert.pem", "key": f"{certs}/key.pem",
              "db": f"{path.parent}/state/satellite.db", "issue-from": "10.1.0.0/24", "redeem-from": "10.2.0.0/16"}
    values.update((k.replace("_", "-"), v) for k, v in settings.items())
    (path.parent / "state").mkdir(mode=0o700, exist_ok=True)
    path.write_text("[satellite]\n" + "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None))
    return path


# ---- item 3: each error names the setting at fault and what to do -----------------------------------------

def test_unwritable_audit_log_is_named_as_the_audit_log_not_the_certificate(certs, tmp_path):
    ini = write_ini(tmp_path / "satellite.ini", certs, audit_log=f"{tmp_path}/no-such-dir/audit.log")
    result = satellite("serve", "-c", str(ini))
    assert result.returncode == 1
    assert "certificate" not in result.stderr, result.stderr
    assert re.search(r"audit-log: cannot open .*no-such-dir/audit\.log", result.stderr), result.stderr
    assert "install -d" in result.stderr            # what to do


def test_a_certificate_given_as_the_key_is_named(certs, tmp_path):
    ini = write_ini(tmp_path / "satellite.ini", certs, key=f"{certs}/cert.pem")
    result = satellite("serve", "-c", str(ini))
    assert result.returncode == 1
    assert "PEM lib" not in result.stderr, result.stderr
    assert re.search(r"key: .*cert\.pem holds a certificate, not a private key", result.stderr), result.stderr


def test_a_key_that_is_not_the_certificates_is_named(certs, tmp_path):
    other = tmp_path / "other"
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(other), DOMAIN], check=True, capture_output=True)
    ini = write_ini(tmp_path / "satellite.ini", certs, key=f"{other}/key.pem")
    result = satellite("serve", "-c", str(ini))
    assert result.returncode == 1
    assert "cert/key: the key in" in result.stderr and "does not belong to the certificate" in result.stderr, \
        result.stderr


def test_an_ini_without_its_section_header_is_an_error_not_a_traceback(certs, tmp_path):
    ini = tmp_path / "satellite.ini"
    ini.write_text(f"domain = {DOMAIN}\nlisten = 127.0.0.1:0\n")
    result = satellite("serve", "-c", str(ini))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    assert f"{ini}: line 1: no [satellite] line before the settings" in result.stderr, result.stderr


def test_a_missing_state_directory_is_named_with_what_to_do(certs, tmp_path):
    ini = write_ini(tmp_path / "satellite.ini", certs, db=f"{tmp_path}/var-lib-satellite/satellite.db")
    result = satellite("serve", "-c", str(ini))
    assert result.returncode == 1
    assert f"db: the directory {tmp_path}/var-lib-satellite does not exist" in result.stderr, result.stderr
    assert "install -d -m 0700 -o satellite -g satellite" in result.stderr


# ---- item 2: satellite check ---------------------------------------------------------------------------------

def check_lines(result):
    lines = result.stdout.splitlines()
    assert all(re.match(r"(OK|WARN|FAIL) +\S", line) for line in lines), result.stdout
    return lines


def test_check_passes_a_good_config_one_line_per_check(certs, tmp_path):
    ini = write_ini(tmp_path / "satellite.ini", certs, audit_log=f"{tmp_path}/audit.log")
    result = satellite("check", "-c", str(ini))
    lines = check_lines(result)
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    for what in ("config", "certificate covers", f"anything.{DOMAIN}", f"OK   certificate covers {DOMAIN}",
                 "key matches", "listen 127.0.0.1:0", "db directory", "issue-from", "redeem-from"):
        assert what in text, (what, text)
    assert not [line for line in lines if not line.startswith("OK")], text


def test_check_fails_a_certificate_for_another_domain(tmp_path):
    other = tmp_path / "other"
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(other), "elsewhere.test"], check=True, capture_output=True)
    ini = write_ini(tmp_path / "satellite.ini", other)
    result = satellite("check", "-c", str(ini))
    check_lines(result)
    assert result.returncode == 1
    assert re.search(rf"^FAIL certificate covers \*\.{re.escape(DOMAIN)}: .*does not name anything\.{DOMAIN}",
                     result.stdout, re.M), result.stdout


def test_check_names_each_problem_with_what_to_do(certs, tmp_path):
    key = tmp_path / "key.pem"
    shutil.copy(certs / "key.pem", key)
    key.chmod(0o644)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ini = write_ini(tmp_path / "satellite.ini", certs, key=str(key), listen=f"127.0.0.1:{port}",
                        issue_from="10.1.0.5/24", db=f"{tmp_path}/nowhere/satellite.db",
                        audit_log=f"{tmp_path}/log/audit.log")
        result = satellite("check", "-c", str(ini))
    lines = check_lines(result)
    assert result.returncode == 1
    text = result.stdout
    assert re.search(r"^FAIL key file .* other users may read it.*chmod 0640", text, re.M), text
    assert re.search(rf"^FAIL listen 127\.0\.0\.1:{port}: .*in use", text, re.M), text
    assert re.search(r"^WARN issue-from 10\.1\.0\.5/24 has host bits set: it means 10\.1\.0\.0/24", text, re.M), text
    assert re.search(r"^FAIL db directory .*/nowhere does not exist: install -d -m 0700", text, re.M), text
    assert re.search(r"^FAIL audit-log directory .*/log does not exist", text, re.M), text
    assert len(lines) == len(set(lines))


def test_check_explains_binding_443_for_an_unprivileged_user(certs, tmp_path):
    ini = write_ini(tmp_path / "satellite.ini", certs, listen="127.0.0.1:443")
    result = satellite("check", "--user", "nobody", "-c", str(ini))
    check_lines(result)
    assert re.search(r"^(WARN|FAIL) listen 127\.0\.0\.1:443: .*CAP_NET_BIND_SERVICE", result.stdout, re.M), \
        result.stdout


def test_check_reports_a_broken_ini_as_one_fail_line(tmp_path):
    ini = tmp_path / "satellite.ini"
    ini.write_text("domain = x\n")
    result = satellite("check", "-c", str(ini))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert check_lines(result)[0].startswith("FAIL config")


def test_check_help_teaches():
    result = satellite("check", "--help")
    assert result.returncode == 0
    for what in ("before", "OK", "WARN", "FAIL", "--user", "exit"):
        assert what in result.stdout, (what, result.stdout)


# ---- the login node: satellite-client check ----------------------------------------------------------------

def client_check(tmp_path, config_text, path_dirs=(), mode=0o644):
    ini = tmp_path / "client.ini"
    ini.write_text(config_text)
    ini.chmod(mode)
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)                  # PATH holds only what the test puts there (this host has sbatch)
    env = {"HOME": str(tmp_path), "SATELLITE_CLIENT_CONFIG": str(ini),
           "PATH": ":".join(map(str, [*path_dirs, empty]))}
    return subprocess.run([sys.executable, str(ROOT / "satellite_client.py"), "check"], capture_output=True,
                          text=True, env=env, timeout=60)


def test_client_check_on_a_good_login_node(certs, tmp_path, satellite):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").symlink_to("/bin/false")               # found on PATH, never run
    result = client_check(tmp_path, f"[client]\nsatellite = https://127.0.0.1:{satellite.port}\n"
                                    f"cacert = {certs}/ca.pem\n", [bin_dir])
    lines = check_lines(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(line.startswith("OK   satellite at") and "certificate trusted" in line for line in lines), lines
    assert any(line.startswith(f"OK   scheduler slurm (found on PATH: {bin_dir}/sbatch)") for line in lines), lines


def test_client_check_names_the_ca_the_address_and_the_scheduler(certs, tmp_path, satellite):
    other = tmp_path / "other"
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(other), DOMAIN], check=True, capture_output=True)
    result = client_check(tmp_path, f"[client]\nsatellite = https://127.0.0.1:{satellite.port}\n"
                                    f"cacert = {other}/ca.pem\nscheduler = slurm\n")
    check_lines(result)
    assert result.returncode == 1
    assert re.search(r"^FAIL satellite at .*certificate is not trusted with cacert .*set cacert = ", result.stdout,
                     re.M), result.stdout
    assert re.search(r"^FAIL scheduler slurm \(set in the config\): sbatch is not on PATH", result.stdout,
                     re.M), result.stdout
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        result = client_check(tmp_path, f"[client]\nsatellite = https://127.0.0.1:{port}\ncacert = {certs}/ca.pem\n")
    assert re.search(r"^FAIL cannot reach satellite at .*firewall", result.stdout, re.M), result.stdout
    assert re.search(r"^WARN scheduler local: no batch system's command on PATH", result.stdout, re.M), result.stdout


def test_serve_warns_when_the_certificate_does_not_cover_the_domain(tmp_path):
    other = tmp_path / "other"
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(other), "elsewhere.test"], check=True, capture_output=True)
    ini = write_ini(tmp_path / "satellite.ini", other)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = start_group([sys.executable, str(ROOT / "satellite.py"), "serve", "-c", str(ini)], stdout=out,
                           stderr=out)
    try:
        wait_for(lambda: "serving" in log.read_text() or proc.poll() is not None, what="satellite to start")
    finally:
        stop_group(proc, grace=30)
    text = log.read_text()
    assert re.search(rf"WARNING certificate covers \*\.{re.escape(DOMAIN)}: it names \*\.elsewhere\.test, "
                     rf"elsewhere\.test and does not name anything\.{re.escape(DOMAIN)}", text), text


def test_admin_commands_name_an_audit_log_they_cannot_open(certs, tmp_path, fresh_satellite):
    server = fresh_satellite()
    alias = server.getlink()["alias"]
    ini = write_ini(tmp_path / "satellite.ini", certs, audit_log=f"{tmp_path}/no-such-dir/audit.log", db=server.db)
    for command in (["revoke", alias], ["refresh"]):
        result = satellite(*command, "-c", str(ini))
        assert result.returncode == 1 and "Traceback" not in result.stderr, (command, result.stderr)
        assert "audit-log: cannot open" in result.stderr, (command, result.stderr)
    assert server.request(f"{alias}.{DOMAIN}", "/")[0] != 410            # the failed revoke changed nothing


# ---- found by an attacker: networks open to all, a key a wide group reads, a site config others may change ------

@pytest.mark.parametrize("name,value", [("admin_from", "0.0.0.0/0"), ("trusted_fronts", "::/0"),
                                        ("metrics_from", "0.0.0.0/0"), ("jobstates_from", "::/0")])
def test_check_fails_networks_open_to_every_address(certs, tmp_path, name, value):
    ini = write_ini(tmp_path / "satellite.ini", certs, **{name: value})
    result = satellite("check", "-c", str(ini))
    assert re.search(rf"^FAIL {name.replace('_', '-')} .*every address", result.stdout, re.M), result.stdout
    assert result.returncode == 1


def test_check_warns_a_feed_from_this_host(certs, tmp_path):
    ini = write_ini(tmp_path / "satellite.ini", certs, jobstates_from="127.0.0.1/32")
    result = satellite("check", "-c", str(ini))
    assert re.search(r"^WARN jobstates-from .*any local user", result.stdout, re.M), result.stdout


def test_check_fails_a_key_a_group_other_than_the_services_reads(certs, tmp_path):
    key = tmp_path / "key.pem"
    shutil.copy(certs / "key.pem", key)
    other = next(g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getegid())
    os.chown(key, -1, other)
    key.chmod(0o640)
    result = satellite("check", "-c", str(write_ini(tmp_path / "satellite.ini", certs, key=str(key))))
    assert re.search(r"^FAIL key file .*group .* may read it", result.stdout, re.M), result.stdout


def test_client_check_fails_a_site_config_or_ca_others_may_change(certs, tmp_path, satellite):
    """Whoever may rewrite the site config or its CA file could point every user's links at their own server."""
    ca = tmp_path / "ca.pem"
    shutil.copy(certs / "ca.pem", ca)
    ca.chmod(0o664)
    result = client_check(tmp_path, f"[client]\nsatellite = https://127.0.0.1:{satellite.port}\ncacert = {ca}\n"
                                    "scheduler = local\n", mode=0o666)
    assert re.search(r"^FAIL site config .*: .* writable by others", result.stdout, re.M), result.stdout
    assert re.search(r"^FAIL cacert .*ca\.pem: .* writable by its group", result.stdout, re.M), result.stdout
    assert result.returncode == 1


# ---- issue 22: a front secret other local users may read --------------------------------------------------

SECRET = "f" * 64


@pytest.mark.parametrize("mode,refused", [(0o644, True), (0o604, True), (0o660, True), (0o640, False),
                                          (0o600, False)])
def test_a_front_secret_others_may_read_is_refused_at_start_and_fails_check(certs, tmp_path, mode, refused):
    """Issue 22 (medium): read_front_secret checked the secret's length, not its file: the contrib command
    (openssl rand -hex 32 > FILE) made it 0644, and as `nobody` on the proxy node, presenting it from the
    front's loopback address, a link as if from a login node, a redeem naming another node, and the scheduler
    feed ending another user's session. Now serve refuses such a file and check FAILs it."""
    secret = tmp_path / "front-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(mode)
    ini = write_ini(tmp_path / "satellite.ini", certs, front_secret=str(secret), trusted_fronts="127.0.0.1/32",
                    issue_from="10.1.0.0/24", redeem_from="10.2.0.0/16", listen="127.0.0.1:0")
    check = satellite("check", "-c", str(ini))
    assert bool(re.search(r"^FAIL front-secret: .*read or changed by other users", check.stdout, re.M)) == refused, \
        check.stdout
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, str(ROOT / "satellite.py"), "serve", "-c", str(ini), "--workers",
                                  "1"], stdout=out, stderr=out, cwd=tmp_path)
    try:
        if refused:
            serve.wait(30)
            assert serve.returncode != 0 and "front_secret:" in log.read_text() and "other users" in log.read_text()
        else:
            wait_for(lambda: serve.poll() is not None or "serving https" in log.read_text(), what="serve")
            assert serve.poll() is None, log.read_text()
    finally:
        if serve.poll() is None:
            serve.terminate()
            serve.wait(30)


@pytest.mark.parametrize("plant", ["owned by another user", "group-writable wal", "a symlink"])
def test_a_database_another_user_made_or_may_change_is_refused(certs, tmp_path, plant):
    """Issue 22 (low): the database file's owner and mode were never checked: where `db` sits in a directory
    others can write, another user made satellite.db first, satellite started on it silently, and the attacker
    could re-point a live session to a listener of theirs. Now serve refuses it and check FAILs it."""
    ini = write_ini(tmp_path / "satellite.ini", certs)
    db = tmp_path / "state" / "satellite.db"
    if plant == "owned by another user":
        db.write_bytes(b"")
        os.chown(db, 65534, 65534)
    elif plant == "group-writable wal":
        wal = tmp_path / "state" / "satellite.db-wal"
        wal.write_bytes(b"")
        wal.chmod(0o660)
    else:
        (tmp_path / "elsewhere.db").write_bytes(b"")
        db.symlink_to(tmp_path / "elsewhere.db")
    check = satellite("check", "-c", str(ini))
    assert re.search(r"^FAIL db: ", check.stdout, re.M), check.stdout
    serve = satellite("serve", "-c", str(ini), "--workers", "1")
    assert serve.returncode != 0 and "db: " in serve.stderr, serve.stderr[-500:]

"""Satellite's files as another local user on the proxy node sees them: the database, its WAL and
shared-memory files, the access and audit logs, and the cookie key. The attacker is the real Unix
user `nobody` (runuser); everything satellite writes lives in a directory nobody may enter, so only
the files' own modes stand between them and the attacker. The cookie key is not in the database:
a copy of it forges nothing, and rotating the key logs every browser out and changes nothing else."""
import os
import pwd
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, SatelliteServer, wait_for

sys.path.insert(0, str(ROOT))
from satellite import COOKIE_NAME, cookie_value  # noqa: E402

ATTACKER = "nobody"
KEY_FILE = "satellite.cookie-key"             # the default: the database's name with .cookie-key, beside it


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("acting as another Unix user (runuser -u nobody) needs root")


def read_as_attacker(path):
    """The file's bytes as `nobody` could read them, or None when the file's mode refused them.
    Any other failure (the file missing, runuser broken) fails the test: only a refusal counts."""
    assert Path(path).exists(), f"{path} does not exist: nothing to try"
    result = subprocess.run(["runuser", "-u", ATTACKER, "--", "cat", "--", str(path)], capture_output=True,
                            timeout=30)
    if result.returncode == 0:
        return result.stdout
    assert b"Permission denied" in result.stderr, result.stderr
    return None


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_dir():
    """A directory `nobody` may enter and list (0755, under /tmp): the files must protect themselves."""
    directory = Path(tempfile.mkdtemp(prefix="satellite-files-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def server_in(certs):
    """Start a satellite whose database and logs are in a directory of the test's choosing."""
    servers = []

    def make(workdir, *extra_args):
        server = SatelliteServer(certs, workdir, ["--access-log", str(workdir / "access.log"),
                                                  "--audit-log", str(workdir / "audit.log"), *extra_args])
        servers.append(server)
        return server.start()
    yield make
    for server in servers:
        server.stop()


def cookie_from_visit(server, host, token):
    """What a browser that opened the link holds: the cookie satellite set."""
    status, headers, _ = server.request(host, "/?token=" + token)
    assert status == 200
    return headers["Set-Cookie"].split(";")[0].split("=", 1)[1]


def with_cookie(server, host, value):
    return server.request(host, "/", headers={"Cookie": f"{COOKIE_NAME}={value}"})[0]


def database_values(path):
    """Every value in every table of the database at `path`, as (where, value)."""
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = db.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row):
                    if value is not None:
                        yield f"{table}.{column}", value


def candidate_keys(value):
    """The ways a stored value could be an HMAC key: its text, its bytes, its hex decoded."""
    if isinstance(value, (int, float)):
        return []
    raw = value if isinstance(value, bytes) else str(value).encode()
    keys = [raw]
    try:
        keys.append(bytes.fromhex(raw.decode()))
    except ValueError:
        pass
    return keys


# the attack ---------------------------------------------------------------------------------

def test_another_local_user_cannot_read_satellites_files_or_forge_a_cookie(open_dir, server_in, new_app, tmp_path):
    needs_root()
    server = server_in(open_dir)
    app = new_app()
    link = server.mapped_session(app)
    host = server.host(link["alias"])
    cookie_from_visit(server, host, link["token"])
    # a keep-alive API connection holds the server's database connection open: the WAL and SHM exist
    held = server.connection()
    try:
        held.request("GET", "/api/status?key=" + link["key"])
        assert held.getresponse().read()
        made = {p.name: p for p in open_dir.iterdir() if p.name != "satellite.log"}   # that one is the test's
        assert {"satellite.db", "satellite.db-wal", "satellite.db-shm", "access.log", "audit.log"} <= set(made)
        stolen = {name: read_as_attacker(path) for name, path in sorted(made.items())}
        modes = {name: mode(path) for name, path in made.items()}
    finally:
        held.close()

    # what nobody can do with what they read: rebuild the database, take any key it or a file holds
    forged = []
    if stolen["satellite.db"] is not None:
        copy = tmp_path / "stolen.db"
        copy.write_bytes(stolen["satellite.db"])
        if stolen["satellite.db-wal"] is not None:
            Path(f"{copy}-wal").write_bytes(stolen["satellite.db-wal"])
        with sqlite3.connect(copy) as db:             # the alias is public: it is in the link
            token_hash = db.execute("SELECT token_hash FROM sessions WHERE alias = ?", (link["alias"],)).fetchone()[0]
        keys = [(where, k) for where, v in database_values(copy) if where.startswith("meta.")
                for k in candidate_keys(v)]
        keys += [(name, k) for name, data in stolen.items() if data and name.endswith("cookie-key")
                 for k in candidate_keys(data.strip())]
        for where, key in keys:
            if with_cookie(server, host, cookie_value(key, link["alias"], token_hash)) == 200:
                forged.append(where)
    assert not forged, f"as nobody: read the database, computed the cookie with {forged}, got 200 from the app"
    readable = [f"{name} ({modes[name]:04o})" for name, data in stolen.items() if data is not None]
    assert not readable, f"nobody could read: {', '.join(readable)}"
    assert KEY_FILE in stolen                                   # the key's own file was tried too


def test_a_copy_of_the_whole_database_does_not_forge_a_cookie(open_dir, server_in, new_app, tmp_path):
    server = server_in(open_dir)
    app = new_app()
    link = server.mapped_session(app)
    host = server.host(link["alias"])
    real = cookie_from_visit(server, host, link["token"])
    assert with_cookie(server, host, real) == 200                  # the cookie to forge works
    copy = tmp_path / "copy.db"
    with sqlite3.connect(server.db) as live, sqlite3.connect(copy) as target:
        live.backup(target)                                       # everything committed, the WAL's part too
    with sqlite3.connect(copy) as db:
        token_hash = db.execute("SELECT token_hash FROM sessions WHERE alias = ?", (link["alias"],)).fetchone()[0]
    values = list(database_values(copy))
    assert len(values) > 10
    forging = sorted({where for where, value in values for key in candidate_keys(value)
                      if cookie_value(key, link["alias"], token_hash) == real})
    assert not forging, f"the cookie is computed from the database's own {forging}"


def test_rotating_the_cookie_key_logs_every_browser_out_and_changes_nothing_else(open_dir, server_in, new_app):
    server = server_in(open_dir)
    app = new_app()
    link = server.mapped_session(app)
    host = server.host(link["alias"])
    old = cookie_from_visit(server, host, link["token"])
    assert with_cookie(server, host, old) == 200
    key_file = open_dir / KEY_FILE
    old_key, owner = key_file.read_bytes(), key_file.stat().st_uid
    rows = server.rows()

    result = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "rotate-cookie-key", "--db", str(server.db)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    new_key = key_file.read_bytes()
    assert new_key != old_key and mode(key_file) == 0o600 and key_file.stat().st_uid == owner
    assert new_key.strip().decode() not in result.stdout + result.stderr + server.log_text()
    # the running server notices the new file: every cookie made with the old key stops working
    wait_for(lambda: with_cookie(server, host, old) == 403, timeout=10, what="the old cookie to be refused")
    # ... and nothing else changed: the link's token opens the app again and gets a new cookie
    new = cookie_from_visit(server, host, link["token"])
    assert new != old and with_cookie(server, host, new) == 200
    status, fields = server.api("status", key=link["key"])
    assert status == 200 and fields["state"] == "proxied"
    assert server.rows() == rows
    assert "cookie-key reloaded" in server.log_text()


def test_a_key_file_opened_to_others_while_serving_is_reported_and_refused_at_the_next_start(open_dir, server_in):
    server = server_in(open_dir)
    host = server.host(server.getlink()["alias"])
    key_file = open_dir / KEY_FILE
    key_file.chmod(0o644)
    refusal = f"ERROR cookie-key: {key_file} can be read or changed by other users (mode 0644)"
    wait_for(lambda: server.request(host, "/") and refusal in server.log_text(), timeout=10,
             what="the refusal logged")      # a session host's request looks at the key (at most once a second)
    assert "keeping the key in use" in server.log_text()
    server.stop()
    with pytest.raises(AssertionError, match="satellite exited"):
        server.start()
    assert server.proc.returncode == 1 and server.log_text().count(refusal) == 2


class ServerAs(SatelliteServer):
    """satellite serve as an unprivileged user, as the unit runs it (setpriv execs: the pid is satellite's own),
    with the system's python3: the test venv's lives under root's home."""
    PYTHON = "/usr/bin/python3"

    def __init__(self, user, certs, workdir, extra_args=()):
        super().__init__(certs, workdir, extra_args)
        self.user = user

    def command(self):
        return [*as_user(self.user), self.PYTHON, *super().command()[1:]]


def as_user(user):
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "--"]


def test_serving_as_its_own_user_only_that_user_may_rotate_the_key(certs, open_dir, new_app):
    needs_root()
    user = "nobody"                                            # plays the `satellite` user here
    tls = open_dir / "tls"                                     # like /etc/satellite/tls: the key 0640 root:<group>
    tls.mkdir()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        shutil.copy(certs / name, tls / name)
    uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
    os.chown(tls / "key.pem", 0, gid)
    (tls / "key.pem").chmod(0o640)
    state = open_dir / "state"                                 # like /var/lib/satellite
    state.mkdir(mode=0o700)
    os.chown(state, uid, gid)
    server = ServerAs(user, tls, open_dir, ["--db", str(state / "satellite.db")])
    server.db = state / "satellite.db"
    try:
        server.start()
        key_file = state / KEY_FILE
        assert key_file.stat().st_uid == uid
        assert mode(key_file) == 0o600 and mode(server.db) == 0o600 and server.db.stat().st_uid == uid
        app = new_app()
        link = server.mapped_session(app)
        host = server.host(link["alias"])
        old = cookie_from_visit(server, host, link["token"])
        before = key_file.read_bytes()
        rotate = [ServerAs.PYTHON, str(ROOT / "satellite.py"), "rotate-cookie-key", "--db", str(server.db)]
        as_root = subprocess.run(rotate, capture_output=True, text=True, timeout=60)
        assert as_root.returncode == 1 and f"belongs to uid {uid}: run this as that user" in as_root.stderr
        assert key_file.read_bytes() == before and with_cookie(server, host, old) == 200
        as_owner = subprocess.run([*as_user(user), *rotate],
                                  capture_output=True, text=True, timeout=60)
        assert as_owner.returncode == 0, as_owner.stderr
        assert key_file.stat().st_uid == uid and mode(key_file) == 0o600 and key_file.read_bytes() != before
        wait_for(lambda: with_cookie(server, host, old) == 403, timeout=10, what="the old cookie to be refused")
        assert cookie_from_visit(server, host, link["token"])
    finally:
        server.stop()


def test_rotate_needs_an_existing_key_file(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "rotate-cookie-key",
                             "--db", str(tmp_path / "nowhere.db")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no cookie key at" in result.stderr and str(tmp_path) in result.stderr
    assert list(tmp_path.iterdir()) == []                         # nothing written in the wrong place


ROTATE = "make a new key with satellite rotate-cookie-key -c FILE, as the user satellite runs as"


@pytest.mark.parametrize("file_mode, owner, content, refusal", [
    (0o640, None, None, f"can be read or changed by other users (mode 0640), so anyone may hold a copy that "
                        f"forges cookies: {ROTATE}"),
    (0o604, None, None, "can be read or changed by other users (mode 0604)"),
    (0o620, None, None, "can be read or changed by other users (mode 0620)"),
    (0o600, ATTACKER, None, "is owned by uid 65534, not by the user satellite runs as (uid 0), so that user could "
                            "replace it: remove it and satellite makes a new one at start"),
    (0o600, None, "not-a-key\n", f"is not a cookie key (64 hex digits): {ROTATE.replace('key', 'one', 1)}"),
], ids=["group-readable", "other-readable", "group-writable", "owned-by-nobody", "not-a-key"])
def test_a_cookie_key_file_others_could_read_or_replace_is_refused_at_start(certs, tmp_path, file_mode, owner,
                                                                           content, refusal):
    needs_root()
    key_file = tmp_path / KEY_FILE
    key_file.write_text(content or os.urandom(32).hex() + "\n")
    key_file.chmod(file_mode)
    if owner:
        shutil.chown(key_file, owner)
    before = key_file.read_bytes()
    server = SatelliteServer(certs, tmp_path)
    try:
        with pytest.raises(AssertionError, match="satellite exited"):
            server.start()
    finally:
        server.stop()
    assert server.proc.returncode == 1
    assert f"ERROR cookie-key: {key_file} {refusal}" in server.log_text()
    assert key_file.read_bytes() == before and mode(key_file) == file_mode      # refused, not replaced


def test_an_old_install_loses_its_database_cookie_key_and_its_files_become_private(open_dir, server_in, new_app):
    needs_root()
    server = server_in(open_dir)
    app = new_app()
    link = server.mapped_session(app)
    host = server.host(link["alias"])
    server.stop()
    # what an older satellite left: the cookie key in the database, every file 0644
    old_key = os.urandom(32)
    with sqlite3.connect(server.db) as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('cookie_secret', ?)", (old_key.hex(),))
        token_hash = db.execute("SELECT token_hash FROM sessions WHERE alias = ?", (link["alias"],)).fetchone()[0]
    files = [server.db, open_dir / "access.log", open_dir / "audit.log"]
    for path in files:
        path.chmod(0o644)
    server.start()
    status = with_cookie(server, host, cookie_value(old_key, link["alias"], token_hash))
    assert status == 403, "the cookie key an older satellite kept in the database still signs cookies"
    with sqlite3.connect(server.db) as db:
        assert db.execute("SELECT count(*) FROM meta WHERE name = 'cookie_secret'").fetchone()[0] == 0
    assert cookie_from_visit(server, host, link["token"])            # the link's token still opens it
    for path in files:
        assert mode(path) & 0o007 == 0, f"{path.name} is still {mode(path):04o}"
        assert read_as_attacker(path) is None
    assert "was open to other users" in server.log_text()


@pytest.mark.parametrize("command", [["refresh"], ["revoke", "ALIAS"]])
def test_admin_commands_make_the_audit_log_private_under_a_loose_umask(open_dir, server_in, command):
    needs_root()
    server = server_in(open_dir)
    alias = server.getlink()["alias"]
    audit = open_dir / f"{command[0]}-audit.log"
    args = [alias if word == "ALIAS" else word for word in command]
    result = subprocess.run([sys.executable, str(ROOT / "satellite.py"), *args, "--db", str(server.db),
                             "--audit-log", str(audit)],
                            capture_output=True, text=True, timeout=60, umask=0o022)
    assert result.returncode == 0, result.stderr
    assert mode(audit) == 0o600 and read_as_attacker(audit) is None


def test_exports_map_is_the_one_file_left_for_other_users(open_dir, server_in, new_app):
    """The front reads it, maybe as another user (Apache's RewriteMap children run as www-data): it
    stays 0644 under satellite's umask. It holds aliases and addresses, no secret."""
    needs_root()
    server = server_in(open_dir)
    link = server.mapped_session(new_app())
    output = open_dir / "map.conf"
    result = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "export", "--db", str(server.db),
                             "--domain", "sat.test", "--format", "apache", "--output", str(output)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = read_as_attacker(output)
    assert data is not None and mode(output) == 0o644, f"the front's map is {mode(output):04o}"
    assert link["alias"].encode() in data


def test_logs_rotated_by_the_contrib_config_stay_private_and_satellite_keeps_writing(certs, open_dir):
    needs_root()
    logs = open_dir / "log"
    logs.mkdir(mode=0o755)
    server = SatelliteServer(certs, open_dir, ["--access-log", str(logs / "access.log"),
                                               "--audit-log", str(logs / "audit.log")]).start()
    try:
        server.getlink()
        config = (ROOT / "contrib/satellite.logrotate").read_text().replace("/var/log/satellite", str(logs))
        (open_dir / "rotate.conf").write_text(config.replace("su satellite satellite", "su root root"))
        result = subprocess.run(["logrotate", "-f", "-s", str(open_dir / "state"), str(open_dir / "rotate.conf")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        for name, line in (("access.log.1", b"/api/getlink"), ("audit.log.1", b'"event": "issue"')):
            assert line in (logs / name).read_bytes()
            assert mode(logs / name) == 0o600 and read_as_attacker(logs / name) is None
        alias = server.getlink()["alias"]                     # copytruncate: the same open file goes on
        assert alias in (logs / "audit.log").read_text() and mode(logs / "audit.log") == 0o600
    finally:
        server.stop()

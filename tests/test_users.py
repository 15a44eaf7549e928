"""Login nodes are shared by hundreds of users: links are rationed per user, so one user cannot use up
everyone's. Who asks is a claim (user=, a label) unless the site asks for proof: a real MUNGE credential,
checked with the real unmunge, made by real Unix users (root and nobody)."""
import json
import re
import subprocess
import sys
import urllib.parse

import pytest

from conftest import ROOT, start_munge


def getlink(satellite, **params):
    return satellite.api("getlink", **{k: urllib.parse.quote(v, safe="") for k, v in params.items()})


def test_one_users_links_do_not_use_up_another_users(fresh_satellite):
    satellite = fresh_satellite("--max-live-per-user", "3", "--max-live-per-source", "100")
    for _ in range(3):
        assert getlink(satellite, user="alice")[0] == 201
    status, fields = getlink(satellite, user="alice")
    assert status == 429 and "3 live sessions for user alice" in fields["error"]
    assert getlink(satellite, user="bob")[0] == 201                 # same login node, another user: served
    assert getlink(satellite)[0] == 201                              # unnamed: only the node's ceiling applies
    assert getlink(satellite, user="bad name")[0] == 400


def test_unredeemed_links_wait_half_a_day_by_default(fresh_satellite):
    satellite = fresh_satellite()
    _, fields = getlink(satellite, user="alice")
    status, info = satellite.api("status", key=fields["key"])
    created = info["created"]
    assert status == 200 and info["issued_for"] == "alice (claim)"
    hours = (int(info["expires"][11:13]) - int(created[11:13])) % 24
    assert hours == 12


def test_per_user_counts_in_stats_and_metrics(fresh_satellite):
    satellite = fresh_satellite("--metrics-from", "127.0.0.1/32")
    for user in ("alice", "alice", "bob"):
        getlink(satellite, user=user)
    getlink(satellite)
    _, _, body = satellite.request("127.0.0.1", "/metrics")
    text = body.decode()
    assert 'satellite_live_sessions_by_user{user="alice"} 2' in text
    assert 'satellite_live_sessions_by_user{user="bob"} 1' in text
    assert 'satellite_live_sessions_by_user{user=""} 1' in text
    stats = subprocess.run([sys.executable, str(ROOT / "satellite.py"), "stats", "--db", str(satellite.db)],
                           capture_output=True, text=True).stdout
    assert "live by user: alice 2, bob 1, (none named) 1" in stats or \
           re.search(r"live by user: .*alice 2.*bob 1", stats), stats


@pytest.fixture(scope="module")
def munge():
    started = start_munge()
    yield
    if started:
        subprocess.run(["pkill", "-x", "munged"])


def credential(user=None):
    command = ["munge", "-n"] if user is None else ["runuser", "-u", user, "--", "munge", "-n"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_with_user_proof_munge_only_a_real_credential_names_the_user(fresh_satellite, munge):
    satellite = fresh_satellite("--user-proof", "munge", "--max-live-per-user", "1")
    status, fields = getlink(satellite, user="root")                      # a claim alone is not enough
    assert status == 403 and "munge" in fields["error"]
    mine = credential()
    status, fields = getlink(satellite, munge=mine)
    assert status == 201
    assert satellite.api("status", key=fields["key"])[1]["issued_for"] == "root (munge)"
    assert getlink(satellite, munge=mine)[0] == 403                       # replayed
    status, fields = getlink(satellite, munge=credential("nobody"))       # another user, same node: own quota
    assert status == 201 and satellite.api("status", key=fields["key"])[1]["issued_for"] == "nobody (munge)"
    status, fields = getlink(satellite, munge=credential("nobody"))
    assert status == 429                                                  # nobody's own quota of 1
    status, fields = getlink(satellite, munge=credential("nobody"), user="root")
    assert status == 403 and "made by nobody, not root" in fields["error"]
    assert getlink(satellite, munge="MUNGE:" + "A" * 40 + ":")[0] == 403  # forged
    # a payload that reads like metadata names nobody but its maker: credentials with a payload are refused
    forged = subprocess.run(["runuser", "-u", "nobody", "--", "munge"], input="UID: root (0)\n", capture_output=True,
                            text=True, check=True).stdout.strip()
    status, fields = getlink(satellite, munge=forged)
    assert status == 403 and "no payload" in fields["error"]


def test_satellite_client_says_who_asks_and_proves_it_with_munge(job_satellite_munge, munge, tmp_path):
    from conftest import Client, ECHO_APP
    client = Client(tmp_path / "home", job_satellite_munge)
    result = client.launch_json("--scheduler", "local", "--command", ECHO_APP, "--time-limit", "5")
    key = json.loads((client.session_dir(result["alias"]) / "secrets").read_text())["key"]
    status, info = job_satellite_munge.api("status", key=key)
    assert status == 200 and info["issued_for"] == "root (munge)"
    client.run("cancel", result["alias"])


@pytest.fixture
def job_satellite_munge(fresh_satellite):
    return fresh_satellite("--redeem-from", "127.0.0.0/8", "--user-proof", "munge")


def test_munge_checks_are_limited_per_address_before_the_user_is_known(fresh_satellite, munge):
    """unmunge runs a process for every credential: an address gets five times its getlink rate of checks."""
    satellite = fresh_satellite("--getlink-rate", "1/1m")
    forged = "MUNGE:" + "A" * 40 + ":"
    statuses = [getlink(satellite, munge=forged)[0] for _ in range(6)]
    assert statuses == [403] * 5 + [429]

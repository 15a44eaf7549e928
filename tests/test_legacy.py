"""--legacy-api: SDSC Satellite's CGI endpoints, driven with curl the way galyleo and start-jupyter call them."""
import json
import re
import subprocess

from conftest import LOGIN, NODE, OTHER_NODE
from test_operations import admin


def curl(satellite, path, source=None):
    """As the SDSC clients do: curl -s https://manage.<domain>/<path>; returns (status, body)."""
    iface = ["--interface", source] if source else []
    result = satellite.curl("-s", "-w", "\n%{http_code}", *iface, satellite.url(LOGIN, path))
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def test_legacy_api_is_off_by_default(satellite):
    assert curl(satellite, "/getlink.cgi")[0] == 404


def test_legacy_flow_as_galyleo_runs_it(fresh_satellite, new_app):
    satellite = fresh_satellite("--legacy-api", "--jobstates-from", "127.0.0.1/32")
    app = new_app(APP_TOKEN="jupyter-own-token")
    # login node: getlink.cgi, then the alias is the second line of the reply
    status, body = curl(satellite, "/getlink.cgi")
    assert status == 200 and body.startswith("Your token is \n")
    alias = body.splitlines()[1]
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "PE")
    assert curl(satellite, f"/linktoken.cgi?token={alias}&jobid=4242") == (200, "Success!\n")
    assert curl(satellite, f"/linktoken.cgi?token={alias}&jobid=4243")[0] == 409
    # the scheduler feed (update-jobs.cgi) makes it Q, then the job redeems from its node: M
    result = subprocess.run(["curl", "-s", "--cacert", str(satellite.certs / "ca.pem"), "--data-urlencode",
                             "jobstates=4242 PENDING", satellite.url(LOGIN, "/update-jobs.cgi")],
                            capture_output=True, text=True)
    assert result.stdout == "Success!\n"
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}.sat.test") == (200, "Q")
    assert curl(satellite, f"/redeemtoken.cgi?token={alias}&port={app.port}", source=NODE) == (200, "Success!\n")
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "M")
    # no proxy-level token: the app's own token is the only protection (why it is off by default)
    host = satellite.host(alias)
    assert satellite.request(host, "/?token=jupyter-own-token")[0] == 200
    assert satellite.request(host, "/")[0] == 403                               # the app's own refusal
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "PR")
    # errors: real status codes, bodies still start with "Oops!" as the old clients expect
    status, body = curl(satellite, f"/redeemtoken.cgi?token={alias}&port=80", source=NODE)
    assert status == 400 and body.startswith("Oops!")
    status, body = curl(satellite, f"/redeemtoken.cgi?token={alias}&port=9999", source=OTHER_NODE)
    assert status == 409 and body.startswith("Oops!")
    status, body = curl(satellite, "/redeemtoken.cgi?token=no-such-token&port=9999", source=NODE)
    assert status == 404 and body.startswith("Oops!")
    assert curl(satellite, f"/destroytoken.cgi?token={alias}", source=OTHER_NODE)[0] == 403   # not the mapped host
    assert curl(satellite, f"/destroytoken.cgi?token={alias}", source=NODE) == (200, "Success! Token destroyed.\n")
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "D")
    assert satellite.request(host, "/?token=jupyter-own-token")[0] == 410
    assert curl(satellite, "/tokenjobstate.cgi?token=never-issued-here") == (200, "U")


def test_legacy_links_do_not_weaken_new_ones(fresh_satellite, app):
    satellite = fresh_satellite("--legacy-api")
    link = satellite.getlink()
    # a new-style link cannot be redeemed or destroyed through the legacy endpoints by its alias
    assert curl(satellite, f"/redeemtoken.cgi?token={link['alias']}&port={app.port}", source=NODE)[0] == 404
    assert curl(satellite, f"/destroytoken.cgi?token={link['alias']}")[0] == 404
    assert satellite.api("status", key=link["key"])[1]["state"] == "queued"


def legacy_link(satellite):
    status, body = curl(satellite, "/getlink.cgi")
    assert status == 200, body
    return body.splitlines()[1]


def expires(satellite, alias):
    return {row[0]: row[5] for row in satellite.rows()}[alias]


def test_another_user_on_the_node_cannot_repoint_a_redeemed_legacy_session(fresh_satellite, new_app):
    satellite = fresh_satellite("--legacy-api")
    job = new_app(APP_TOKEN="jupyter-own-token")            # the user's JupyterLab on the compute node
    attacker = new_app()                                     # another user's server on the same node
    alias = legacy_link(satellite)
    assert curl(satellite, f"/redeemtoken.cgi?token={alias}&port={job.port}", source=NODE) == (200, "Success!\n")
    mapped_until = expires(satellite, alias)
    # the attack: the alias is in the job's script and the link; re-point it from the same node, then elsewhere
    same_node = curl(satellite, f"/redeemtoken.cgi?token={alias}&port={attacker.port}", source=NODE)
    other_node = curl(satellite, f"/redeemtoken.cgi?token={alias}&port={attacker.port}", source=OTHER_NODE)
    # the user's next visit carries Jupyter's token: it must reach the user's app and nobody else's
    assert satellite.request(satellite.host(alias), "/?token=jupyter-own-token")[0] == 200
    assert attacker.seen() == []
    assert job.seen()[-1] == "GET /?token=jupyter-own-token"
    assert same_node[0] == 409 and same_node[1].startswith("Oops! nonce already used")
    assert other_node[0] == 409 and other_node[1].startswith("Oops! nonce already used")
    # the same host and port again is a retried redeem: Success!, and nothing changes (not even the expiry)
    assert curl(satellite, f"/redeemtoken.cgi?token={alias}&port={job.port}", source=NODE) == (200, "Success!\n")
    assert expires(satellite, alias) == mapped_until


def test_the_new_api_takes_no_legacy_key(fresh_satellite, new_app):
    """A legacy session's key is its alias: through the new API it would end a mapped session from a login node
    (where destroytoken.cgi refuses), re-point it from its node, or attach a tunnel to a pending one."""
    satellite = fresh_satellite("--legacy-api")
    job, attacker = new_app(APP_TOKEN="jupyter-own-token"), new_app()
    alias = legacy_link(satellite)
    assert curl(satellite, f"/redeemtoken.cgi?token={alias}&port={job.port}", source=NODE) == (200, "Success!\n")
    assert curl(satellite, f"/destroytoken.cgi?token={alias}")[0] == 403             # the rule of the legacy API
    assert satellite.api("release", key=alias)[0] == 404                             # the same from the new API
    assert satellite.api("release", key=alias, source=NODE)[0] == 404
    assert satellite.api("redeem", key=alias, port=attacker.port, source=NODE)[0] == 404
    assert satellite.api("state", key=alias, state="running")[0] == 404
    assert satellite.api("status", key=alias)[0] == 404
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "M")
    assert satellite.request(satellite.host(alias), "/?token=jupyter-own-token")[0] == 200
    assert attacker.seen() == []
    pending = legacy_link(satellite)
    status, _, _ = satellite.request("127.0.0.1", "/api/tunnel", headers={
        "Upgrade": "satellite-tunnel/1", "Connection": "Upgrade", "Authorization": "Bearer " + pending,
        "Satellite-Tunnel-Attach": "1"}, source=NODE)
    assert status == 404
    assert curl(satellite, f"/tokenjobstate.cgi?token={pending}") == (200, "PE")


def test_legacy_getlink_has_the_getlink_rate_and_the_live_quota(fresh_satellite):
    satellite = fresh_satellite("--legacy-api", "--getlink-rate", "3/1m")
    for _ in range(3):
        legacy_link(satellite)
    result = satellite.curl("-s", "-D", "-", satellite.url(LOGIN, "/getlink.cgi"))
    assert result.stdout.startswith("HTTP/1.1 429") and "\nOops! too many links" in result.stdout
    assert "Retry-After: " in result.stdout
    assert satellite.api("getlink")[0] == 429                          # one limit for both APIs
    quota = fresh_satellite("--legacy-api", "--max-live-per-source", "2")
    first = legacy_link(quota)
    quota.getlink()
    status, body = curl(quota, "/getlink.cgi")
    assert status == 429 and body.startswith("Oops! 2 live sessions")
    assert curl(quota, f"/destroytoken.cgi?token={first}") == (200, "Success! Token destroyed.\n")
    assert curl(quota, "/getlink.cgi")[0] == 200


def test_tokenjobstate_answers_the_cluster_only_and_only_for_legacy_aliases(fresh_satellite):
    satellite = fresh_satellite("--legacy-api")
    alias, new_style = legacy_link(satellite), satellite.getlink()["alias"]
    status, body = curl(satellite, f"/tokenjobstate.cgi?token={alias}", source="127.0.0.5")
    assert status == 403 and body.startswith("Oops!")                  # not from outside the cluster
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "PE")               # login node
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}.sat.test", source=NODE) == (200, "PE")
    assert curl(satellite, f"/tokenjobstate.cgi?token={new_style}") == (200, "U")  # new-style: unknown here
    assert curl(satellite, "/tokenjobstate.cgi?token=never-issued-here") == (200, "U")


def test_a_legacy_alias_is_in_no_log(fresh_satellite, new_app):
    """In legacy mode the alias is the redeem secret: the access log, the audit log and satellite's own log name
    a legacy session by a digest that is not derived from it."""
    satellite = fresh_satellite("--legacy-api", "--audit-log", "audit.log")
    job = new_app(APP_TOKEN="jupyter-own-token")
    alias = legacy_link(satellite)
    assert curl(satellite, f"/linktoken.cgi?token={alias}&jobid=4242")[0] == 200
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}.sat.test")[0] == 200
    result = satellite.curl("-s", "--interface", NODE, "-d", f"token={alias}", "-d", f"port={job.port}",
                            satellite.url(LOGIN, "/redeemtoken.cgi"))
    assert result.stdout == "Success!\n"
    host = satellite.host(alias)
    assert satellite.request(host, "/?token=jupyter-own-token")[0] == 200
    assert satellite.request(host, "/tree?token=jupyter-own-token", headers={"Host": f"{host}:{satellite.port}"})[0] \
        in (200, 404)
    job.stop()
    assert satellite.request(host, "/")[0] == 502                      # the app is gone: satellite logs why
    assert curl(satellite, f"/redeemtoken.cgi?token={alias}&port={job.port}", source=OTHER_NODE)[0] == 409
    assert curl(satellite, f"/destroytoken.cgi?token={alias}", source=NODE)[0] == 200
    assert satellite.request(host, "/")[0] == 410
    revoked = legacy_link(satellite)                                    # the admin's command names it too
    assert admin(satellite, "revoke", revoked).returncode == 0
    audit = [json.loads(line) for line in (satellite.workdir / "audit.log").read_text().splitlines()]
    log = satellite.log_text()
    assert alias not in log + json.dumps(audit) and revoked not in log + json.dumps(audit)
    first, second = audit[0]["legacy_session"], audit[-1]["legacy_session"]
    assert re.fullmatch(r"legacy-[0-9a-f]{12}", first) and second != first
    named = [(line["event"], line["legacy_session"]) for line in audit if line["alias"] is None]
    assert named == [(e, first) for e in ("issue", "redeem", "release")] + [(e, second) for e in ("issue", "revoke")]
    assert f'"{first}.sat.test' in log and "REDACTED" in log           # the access log's Host and target


def test_only_the_mapped_host_may_link_a_redeemed_legacy_session_to_a_job(fresh_satellite, new_app):
    """Issue 22 (low): linktoken.cgi let any node attach a job id of its own to a mapped legacy session that had
    none; the scheduler's word on that job (its end) then ended the session: "only the mapped host may
    destroy" bypassed. Now a redeemed session is linked only from its mapped host."""
    satellite = fresh_satellite("--legacy-api", "--jobstates-from", "127.0.0.1/32")
    app = new_app()
    alias = curl(satellite, "/getlink.cgi")[1].splitlines()[1]
    assert curl(satellite, f"/redeemtoken.cgi?token={alias}&port={app.port}", source=NODE) == (200, "Success!\n")
    status, body = curl(satellite, f"/linktoken.cgi?token={alias}&jobid=6666", source=OTHER_NODE)
    assert status == 403 and body.startswith("Oops!"), (status, body)
    result = subprocess.run(["curl", "-s", "--cacert", str(satellite.certs / "ca.pem"), "--data-urlencode",
                             "jobstates=6666 CANCELLED", satellite.url(LOGIN, "/update-jobs.cgi")],
                            capture_output=True, text=True)
    assert result.stdout == "Success!\n"
    assert curl(satellite, f"/tokenjobstate.cgi?token={alias}") == (200, "M")        # still served
    assert curl(satellite, f"/linktoken.cgi?token={alias}&jobid=4242", source=NODE) == (200, "Success!\n")

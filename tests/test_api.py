"""The management API, driven by real curl and wget over real TLS, every endpoint and error."""
import calendar
import json
import re
import sqlite3
import subprocess
import time

from conftest import DOMAIN, LOGIN, NODE, OTHER_NODE, parse_fields

ALIAS = re.compile(r"^[a-z]{3,7}-[a-z]{3,7}-[a-z]{3,7}$")


def curl_api(satellite, target, *args, source=None):
    """(status, body) of a curl call to the management API."""
    iface = ["--interface", source] if source else []
    result = satellite.curl("-w", "\n%{http_code}", *iface, *args, satellite.url(LOGIN, target))
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def wget(satellite, target, *args, source=None):
    bind = ["--bind-address", source] if source else []
    return subprocess.run(["wget", "-q", "-O", "-", "--content-on-error",
                           "--ca-certificate", str(satellite.certs / "ca.pem"), *bind, *args,
                           satellite.url(LOGIN, target)], capture_output=True, text=True, timeout=60)


def test_healthz_with_curl_and_wget(satellite):
    assert curl_api(satellite, "/healthz") == (200, "ok\n")
    result = wget(satellite, "/healthz")
    assert result.returncode == 0 and result.stdout == "ok\n"


def test_getlink_gives_alias_url_token_and_a_different_key(satellite):
    status, body = curl_api(satellite, "/api/getlink")
    assert status == 201
    fields = parse_fields(body)
    assert ALIAS.match(fields["alias"])
    assert fields["url"] == f"https://{fields['alias']}.{DOMAIN}:{satellite.port}/?token={fields['token']}"
    assert len(fields["token"]) >= 40 and len(fields["key"]) >= 40
    assert fields["token"] != fields["key"]
    assert fields["state"] == "queued"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", fields["expires"])


def test_aliases_are_not_reused(satellite):
    aliases = {satellite.getlink()["alias"] for _ in range(30)}
    assert len(aliases) == 30


def test_getlink_json_by_accept_header_and_by_format_parameter(satellite):
    status, body = curl_api(satellite, "/api/getlink", "-H", "Accept: application/json")
    assert status == 201 and ALIAS.match(json.loads(body)["alias"])
    status, body = curl_api(satellite, "/api/getlink?format=json")
    assert status == 201 and set(json.loads(body)) >= {"alias", "url", "token", "key", "expires"}


def granted_lifetime(satellite, key):
    """(lowest, highest) the session's lifetime can be, from the redeem answer: it runs from the redeem."""
    before = time.time()
    status, fields = satellite.api("redeem", source=NODE, key=key, port=5000)
    after = time.time()
    assert status == 200, fields
    expires = calendar.timegm(time.strptime(fields["expires"], "%Y-%m-%dT%H:%M:%SZ"))   # whole seconds, floored
    return expires - after, expires - int(before)


def test_getlink_by_post_form_with_lifetime(satellite):
    status, body = curl_api(satellite, "/api/getlink", "-d", "lifetime=2h")
    assert status == 201
    low, high = granted_lifetime(satellite, parse_fields(body)["key"])
    assert low <= 2 * 3600 <= high, (low, high)                       # the lifetime asked for
    status, body = curl_api(satellite, "/api/getlink", "-d", "")
    assert status == 201
    low, high = granted_lifetime(satellite, parse_fields(body)["key"])
    assert low <= 12 * 3600 <= high, (low, high)                      # the default, session-lifetime 12h


def test_getlink_refused_outside_issue_networks(satellite):
    status, body = curl_api(satellite, "/api/getlink", source="127.0.0.5")
    assert status == 403 and body.startswith("error=") and "127.0.0.5" in body


def test_getlink_bad_parameters(satellite):
    assert curl_api(satellite, "/api/getlink?lifetime=soon")[0] == 400
    assert curl_api(satellite, "/api/getlink?lifetime=30")[0] == 400        # below a minute
    assert curl_api(satellite, "/api/getlink?lifetime=100d")[0] == 400      # beyond the maximum
    status, body = curl_api(satellite, "/api/getlink?colour=blue")
    assert status == 400 and "colour" in body
    status, body = curl_api(satellite, "/api/getlink?lifetime=1h&lifetime=2h")
    assert status == 400 and "twice" in body


def test_redeem_maps_the_callers_own_address(satellite):
    link = satellite.getlink()
    status, body = curl_api(satellite, f"/api/redeem?key={link['key']}&port=8888", source=NODE)
    assert status == 200
    fields = parse_fields(body)
    assert fields["state"] == "mapped" and fields["target"] == f"{NODE}:8888"


def test_redeem_cannot_name_another_host(satellite):
    link = satellite.getlink()
    status, body = curl_api(satellite, f"/api/redeem?key={link['key']}&port=8888&host=10.9.9.9", source=NODE)
    assert status == 400 and "host" in body


def test_redeem_errors(satellite):
    link = satellite.getlink()
    key = link["key"]
    # wrong network
    status, body = curl_api(satellite, f"/api/redeem?key={key}&port=8888", source="127.0.0.9")
    assert status == 403
    # unknown key; the job's token is not its key
    assert curl_api(satellite, "/api/redeem?key=nope&port=8888", source=NODE)[0] == 404
    assert curl_api(satellite, f"/api/redeem?key={link['token']}&port=8888", source=NODE)[0] == 404
    # port outside the range, or not a number
    assert curl_api(satellite, f"/api/redeem?key={key}&port=80", source=NODE)[0] == 400
    assert curl_api(satellite, f"/api/redeem?key={key}&port=http", source=NODE)[0] == 400
    # nothing above changed the session
    assert satellite.api("status", key=key)[1]["state"] == "queued"
    # first redeem wins; again from the same host is fine (the app moved port), another host is 409
    assert curl_api(satellite, f"/api/redeem?key={key}&port=8888", source=NODE)[0] == 200
    assert curl_api(satellite, f"/api/redeem?key={key}&port=8889", source=NODE)[0] == 200
    status, body = curl_api(satellite, f"/api/redeem?key={key}&port=8888", source=OTHER_NODE)
    assert status == 409
    assert satellite.api("status", key=key)[1]["target"] == f"{NODE}:8889"


def test_state_reports_and_jobid(satellite):
    link = satellite.getlink()
    status, body = curl_api(satellite, f"/api/state?key={link['key']}&state=queued&jobid=12345")
    assert status == 200 and parse_fields(body)["jobid"] == "12345"
    status, body = curl_api(satellite, f"/api/state?key={link['key']}&state=running", source=NODE)
    assert status == 200 and parse_fields(body)["state"] == "running"
    # a stale 'queued' after 'running' does not move the session back
    status, body = curl_api(satellite, f"/api/state?key={link['key']}&state=queued")
    assert parse_fields(body)["state"] == "running"
    assert curl_api(satellite, f"/api/state?key={link['key']}&state=proxied")[0] == 400
    assert curl_api(satellite, f"/api/state?key={link['key']}&state=running&jobid=1;rm")[0] == 400
    assert curl_api(satellite, "/api/state?key=wrong&state=running")[0] == 404
    assert curl_api(satellite, f"/api/state?key={link['key']}&state=running", source="127.0.0.9")[0] == 403


def test_release_ends_the_session_and_its_alias_answers_410(satellite, app):
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    assert satellite.request(host, "/?token=" + link["token"])[0] == 200
    status, body = curl_api(satellite, f"/api/release?key={link['key']}", source=NODE)
    assert status == 200 and parse_fields(body)["state"] == "ended"
    assert satellite.request(host, "/?token=" + link["token"])[0] == 410
    assert satellite.request(host, "/")[0] == 410
    assert curl_api(satellite, f"/api/redeem?key={link['key']}&port=8888", source=NODE)[0] == 410
    assert curl_api(satellite, f"/api/state?key={link['key']}&state=running")[0] == 410
    # releasing twice is not an error (cancel is idempotent), an unknown key is, and so is a wrong network
    assert curl_api(satellite, f"/api/release?key={link['key']}")[0] == 200
    assert curl_api(satellite, "/api/release?key=unknown")[0] == 404
    other = satellite.getlink()
    assert curl_api(satellite, f"/api/release?key={other['key']}", source="127.0.0.9")[0] == 403
    assert satellite.api("status", key=other["key"])[1]["state"] == "queued"


def test_status_by_key_or_token(satellite):
    link = satellite.getlink()
    for credential in (f"key={link['key']}", f"token={link['token']}"):
        status, body = curl_api(satellite, f"/api/status?{credential}")
        fields = parse_fields(body)
        assert status == 200 and fields["alias"] == link["alias"] and fields["state"] == "queued"
        assert set(fields) >= {"alias", "state", "created", "expires"}
        assert link["token"] not in body and link["key"] not in body
    assert curl_api(satellite, "/api/status?key=nope")[0] == 404
    assert curl_api(satellite, "/api/status")[0] == 400


def test_unknown_endpoint_and_method(satellite):
    status, body = curl_api(satellite, "/api/nothing")
    assert status == 404 and body.startswith("error=")
    status, body = curl_api(satellite, "/api/getlink", "-X", "PUT")
    assert status == 405


def test_wget_drives_the_api_and_sees_real_error_codes(satellite):
    result = wget(satellite, "/api/getlink")
    assert result.returncode == 0
    link = parse_fields(result.stdout)
    result = wget(satellite, f"/api/redeem?key={link['key']}&port=9000", source=NODE)
    assert result.returncode == 0 and parse_fields(result.stdout)["state"] == "mapped"
    result = wget(satellite, "/api/redeem?key=bad&port=9000", source=NODE)
    assert result.returncode == 8 and result.stdout.startswith("error=")     # 8: server error response
    result = wget(satellite, "/api/getlink", "--post-data", "lifetime=1h")
    assert result.returncode == 0 and "alias=" in result.stdout
    result = wget(satellite, "/api/getlink", source="127.0.0.6")
    assert result.returncode == 8 and "not allowed" in result.stdout


def test_secrets_are_stored_only_hashed_and_never_logged(satellite, app):
    link = satellite.mapped_session(app)
    host = satellite.host(link["alias"])
    satellite.request(host, "/?token=" + link["token"])
    satellite.api("status", key=link["key"])
    satellite.api("status", token=link["token"])
    with sqlite3.connect(satellite.db) as db:
        dump = "\n".join(db.iterdump())
    assert link["alias"] in dump
    assert link["token"] not in dump and link["key"] not in dump
    log = satellite.log_text()
    assert link["alias"] in log and "REDACTED" in log
    assert link["token"] not in log and link["key"] not in log


def test_release_keeps_a_short_printable_reason_socketlessly(tmp_path):
    """The agent's release carries why the job ended; satellite keeps it as the session's end_reason, and
    refuses one that is long or holds control characters (it reaches logs and terminals)."""
    import pytest
    import satellite
    settings = satellite.Settings(domain="sat.test", cert="c", key="k", db=str(tmp_path / "s.db"))
    store = satellite.Store(settings.db)
    api = satellite.ManagementApi(settings, store, satellite.Events(store, ""), satellite.Metrics())
    links = [api.getlink({}, "127.0.0.1")[1] for _ in range(2)]
    for bad in ("x" * 121, "two\nlines", "esc \x1b[31m", "", "caf\u00e9"):
        with pytest.raises(satellite.ApiError) as refused:
            api.release({"key": links[0]["key"], "reason": bad}, "127.0.0.1")
        assert refused.value.status == 400
    status, fields = api.release({"key": links[0]["key"], "reason": "the app exited with status 3"}, "127.0.0.1")
    assert status == 200 and fields["ended_because"] == "released: the app exited with status 3"
    assert store.session(fields["alias"]).end_reason == "released: the app exited with status 3"
    assert api.release({"key": links[1]["key"]}, "127.0.0.1")[1]["ended_because"] == "released"

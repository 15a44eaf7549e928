"""Sessions are siblings under one domain, so browsers treat them as same-site: an app (or a page) of one
session must not reach into another. Real satellite, real TLS, the echo app as each session's app."""
import json
import urllib.parse

import websocket

from conftest import DOMAIN


def app_cookies(headers):
    return [c for c in headers.get_all("Set-Cookie") or [] if not c.startswith("__Host-satellite=")]


def get(satellite, link, target, headers=None, method="GET", body=None):
    headers = dict(headers or {}, Authorization="token " + link["token"])
    return satellite.request(satellite.host(link["alias"]), target, method=method, headers=headers, body=body)


def test_an_apps_cookies_stay_on_its_own_host(satellite, new_app):
    link = satellite.mapped_session(new_app())
    for cookie, expected in [
        (f"bomb=1; Domain={DOMAIN}; Path=/", "bomb=1; Path=/"),                 # would ride along to every alias
        (f"fix=1; Path=/; domain=.{DOMAIN}; Secure", "fix=1; Path=/; Secure"),
        ("plain=1; Path=/; HttpOnly", "plain=1; Path=/; HttpOnly"),
    ]:
        status, headers, _ = get(satellite, link, "/set-cookie?v=" + urllib.parse.quote(cookie))
        assert status == 200 and app_cookies(headers) == [expected], headers.get_all("Set-Cookie")
    # an app cannot set (or overwrite) satellite's own cookie
    status, headers, _ = get(satellite, link, "/set-cookie?v=" + urllib.parse.quote("__Host-satellite=x; Path=/"))
    assert status == 200 and app_cookies(headers) == []


def test_state_changing_requests_and_websockets_from_another_session_are_refused(satellite, new_app):
    app = new_app()
    victim, attacker = satellite.mapped_session(app), satellite.getlink()
    own = f"https://{satellite.host(victim['alias'])}:{satellite.port}"
    sibling = f"https://{satellite.host(attacker['alias'])}:{satellite.port}"
    seen = len(app.seen())
    for origin, fetch_site in [(sibling, None), ("https://evil.example", None), ("null", None), (None, "same-site"),
                               (None, "cross-site")]:
        headers = {k: v for k, v in (("Origin", origin), ("Sec-Fetch-Site", fetch_site)) if v}
        status, _, body = get(satellite, victim, "/upload", headers, "POST", b"x")
        assert status == 403 and b"another site" in body, (origin, fetch_site, status)
        try:
            ws = websocket.create_connection(f"wss://{satellite.host(victim['alias'])}:{satellite.port}/ws",
                                             socket=satellite.tls_socket(satellite.host(victim["alias"])), timeout=10,
                                             header=[f"Authorization: token {victim['token']}"]
                                             + [f"{k}: {v}" for k, v in headers.items() if k != "Origin"],
                                             origin=origin or own, suppress_origin=origin is None)
            ws.close()
            raise AssertionError(f"WebSocket from {origin or fetch_site} was let through")
        except websocket.WebSocketBadStatusException as exc:
            assert exc.status_code == 403
    assert len(app.seen()) == seen                                      # the app saw none of them
    # the session's own pages, and clients that send no Origin, keep working
    assert get(satellite, victim, "/upload", {"Origin": own, "Sec-Fetch-Site": "same-origin"}, "POST", b"x")[0] == 200
    assert get(satellite, victim, "/upload", {}, "POST", b"x")[0] == 200
    assert get(satellite, victim, "/headers", {"Origin": sibling})[0] == 200          # a GET changes nothing
    ws = websocket.create_connection(f"wss://{satellite.host(victim['alias'])}:{satellite.port}/ws",
                                     socket=satellite.tls_socket(satellite.host(victim["alias"])), timeout=10,
                                     header=[f"Authorization: token {victim['token']}"], origin=own)
    ws.send("same origin")
    assert ws.recv() == "same origin"
    ws.close()


def test_a_cookie_bomb_gets_a_page_that_says_how_to_recover(satellite, app):
    link = satellite.mapped_session(app)
    status, _, body = get(satellite, link, "/", {"Cookie": "; ".join(f"c{i}={'x' * 1000}" for i in range(36))})
    assert status == 431 and b"Clear the cookies of this site" in body and b"open your link again" in body


def test_an_app_cannot_clear_the_cookies_of_every_session(satellite, new_app):
    """Clear-Site-Data clears a whole site's cookies, and sessions share a site: satellite drops it."""
    link = satellite.mapped_session(new_app())
    status, headers, _ = get(satellite, link, "/set-cookie?v=a%3D1&clear=1")
    assert status == 200 and headers["Clear-Site-Data"] is None

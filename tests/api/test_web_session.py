"""The web console's login: the refresh token in an HttpOnly cookie, spent only by the
console itself (CSRF header and trusted Origin), rotated like any refresh token; sign out
of one session or of all of them. The API in this process, on real Postgres and Redis."""

from __future__ import annotations

from http.cookies import SimpleCookie

import httpx
import pytest
from starlette.responses import Response

from cloudbot_api.auth.cookies import set_refresh_cookie
from cloudbot_common.settings import Settings
from tests.support.leaks import SECRETS
from tests.support.problems import assert_problem
from tests.support.users import User, make_user, whoami

pytestmark = pytest.mark.fast

COOKIE = "cloudbot_refresh"


def origin_of(settings: Settings) -> str:
    return settings.public_api_url  # where the console is served from


def browser_headers(settings: Settings, cookie: str | None = None) -> dict[str, str]:
    headers = {"Origin": origin_of(settings), "X-CloudBot-CSRF": "1"}
    if cookie is not None:
        headers["Cookie"] = f"{COOKIE}={cookie}"
    return headers


def set_cookie(r: httpx.Response) -> tuple[str, dict[str, str | bool]]:
    """The refresh cookie the response sets: its value and attributes."""
    headers = r.headers.get_list("set-cookie")
    assert len(headers) == 1, headers
    jar: SimpleCookie = SimpleCookie()
    jar.load(headers[0])
    morsel = jar[COOKIE]
    attributes = {k: morsel[k] for k in ("path", "httponly", "secure", "samesite", "max-age")}
    return morsel.value, attributes


async def web_login(http: httpx.AsyncClient, settings: Settings, user: User) -> tuple[str, str]:
    r = await http.post(
        "/api/auth/web/login",
        json={"email": user.email, "password": user.password},
        headers=browser_headers(settings),
    )
    assert r.status_code == 200, r.text
    cookie, _ = set_cookie(r)
    SECRETS.add(cookie, r.json()["access_token"])
    return r.json()["access_token"], cookie


async def test_web_login_puts_the_refresh_token_in_a_strict_httponly_cookie(http, settings, user):
    r = await http.post(
        "/api/auth/web/login",
        json={"email": user.email, "password": user.password},
        headers=browser_headers(settings),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}  # no refresh token
    cookie, attributes = set_cookie(r)
    SECRETS.add(cookie, body["access_token"])
    assert attributes["path"] == "/api/auth/web"
    assert attributes["httponly"] is True
    assert attributes["samesite"] == "strict"
    # Served on 127.0.0.1, which browsers treat as secure: the cookie is Secure.
    assert attributes["secure"] is True
    assert int(str(attributes["max-age"])) > 0
    assert (await whoami(http, body["access_token"])).status_code == 200


async def test_the_cookie_refreshes_rotates_and_a_reused_one_ends_the_session(http, settings, user):
    access, first = await web_login(http, settings, user)
    r = await http.post("/api/auth/web/refresh", headers=browser_headers(settings, first))
    assert r.status_code == 200, r.text
    second, _ = set_cookie(r)
    SECRETS.add(second, r.json()["access_token"])
    assert second != first
    assert "refresh_token" not in r.json()
    assert (await whoami(http, r.json()["access_token"])).status_code == 200

    # The old cookie again (a stolen copy): the whole login session ends, cookie dropped.
    r = await http.post("/api/auth/web/refresh", headers=browser_headers(settings, first))
    assert_problem(r, 401, "refresh_token_reused")
    _, dropped = set_cookie(r)
    assert dropped["max-age"] == "0"
    r = await http.post("/api/auth/web/refresh", headers=browser_headers(settings, second))
    assert_problem(r, 401, "invalid_refresh_token")
    assert (await whoami(http, access)).status_code == 401


@pytest.mark.parametrize(
    "headers",
    [
        # A form or fetch from another site: no custom header (it would need a preflight).
        {"Origin": "https://evil.example"},
        # The header, but from another origin of the same site (a sibling port).
        {"Origin": "http://127.0.0.1:5555", "X-CloudBot-CSRF": "1"},
        # The header and no Origin at all.
        {"X-CloudBot-CSRF": "1"},
        # The API's own origin, but no header.
        {"Origin": "PUBLIC"},
    ],
    ids=["other-site", "sibling-origin", "no-origin", "no-header"],
)
async def test_cookie_requests_from_anywhere_but_the_console_are_refused(
    http, settings, user, headers
):
    _, cookie = await web_login(http, settings, user)
    headers = {k: origin_of(settings) if v == "PUBLIC" else v for k, v in headers.items()}
    headers["Cookie"] = f"{COOKIE}={cookie}"
    for path in ("/api/auth/web/refresh", "/api/auth/web/logout"):
        assert_problem(await http.post(path, headers=headers), 403, "csrf_refused")
    r = await http.post(
        "/api/auth/web/login",
        json={"email": user.email, "password": user.password},
        headers=headers,
    )
    assert_problem(r, 403, "csrf_refused")
    # Nothing was spent: the console itself still refreshes with the same cookie.
    r = await http.post("/api/auth/web/refresh", headers=browser_headers(settings, cookie))
    assert r.status_code == 200, r.text
    SECRETS.add(set_cookie(r)[0], r.json()["access_token"])


async def test_refresh_without_a_cookie_is_unauthorized(http, settings):
    r = await http.post("/api/auth/web/refresh", headers=browser_headers(settings))
    assert_problem(r, 401, "invalid_refresh_token")


async def test_web_logout_ends_the_session_and_drops_the_cookie(http, settings, user):
    access, cookie = await web_login(http, settings, user)
    r = await http.post("/api/auth/web/logout", headers=browser_headers(settings, cookie))
    assert r.status_code == 204
    _, dropped = set_cookie(r)
    assert dropped["max-age"] == "0"
    assert (await whoami(http, access)).status_code == 401
    r = await http.post("/api/auth/web/refresh", headers=browser_headers(settings, cookie))
    assert_problem(r, 401, "invalid_refresh_token")
    # The program's session of the same account is not this one: it goes on.
    assert (await whoami(http, user.access_token)).status_code == 200


async def test_logout_all_ends_every_session_of_the_account_only(http, settings, user):
    web_access, cookie = await web_login(http, settings, user)
    other = await make_user(http)
    r = await http.post("/api/auth/logout-all", headers=user.headers)
    assert r.status_code == 204
    for token in (web_access, user.access_token):
        assert (await whoami(http, token)).status_code == 401
    r = await http.post("/api/auth/web/refresh", headers=browser_headers(settings, cookie))
    assert_problem(r, 401, "invalid_refresh_token")
    r = await http.post("/api/auth/refresh", json={"refresh_token": user.refresh_token})
    assert_problem(r, 401, "invalid_refresh_token")
    # Another account is untouched, and the account can log in again.
    assert (await whoami(http, other.access_token)).status_code == 200
    r = await http.post("/api/auth/login", json={"email": user.email, "password": user.password})
    assert r.status_code == 200
    SECRETS.add(r.json()["access_token"], r.json()["refresh_token"])


async def test_the_json_refresh_for_programs_still_works(http, user):
    r = await http.post("/api/auth/refresh", json={"refresh_token": user.refresh_token})
    assert r.status_code == 200, r.text
    SECRETS.add(r.json()["access_token"], r.json()["refresh_token"])
    assert set(r.json()) >= {"access_token", "refresh_token"}
    assert "set-cookie" not in r.headers


@pytest.mark.parametrize(
    ("public_api_url", "secure"),
    [
        ("https://cloudbot.example.com", True),
        ("http://127.0.0.1:8000", True),
        ("http://localhost:8000", True),
        ("http://[::1]:8000", True),
        # Plain HTTP elsewhere: browsers would drop a Secure cookie, so it is not marked.
        ("http://192.168.1.20:8000", False),
        ("http://cloudbot.lan", False),
    ],
)
def test_the_cookie_is_secure_unless_served_over_plain_http_off_loopback(
    settings, public_api_url, secure
):
    response = Response()
    set_refresh_cookie(
        response, "token", settings.model_copy(update={"public_api_url": public_api_url})
    )
    assert ("; secure" in response.headers["set-cookie"].lower()) is secure

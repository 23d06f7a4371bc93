"""The browser's login: its refresh token in a cookie the page's scripts cannot read.

The cookie is HttpOnly, SameSite=Strict and scoped to the cookie endpoints' path, so it is
sent nowhere else and never to another site's requests. Secure too, unless the API is
served over plain HTTP on a host that is not loopback (browsers would drop it there;
Chromium sends Secure cookies to http://127.0.0.1 and http://localhost).

A request that spends the cookie must also prove it comes from the console itself: it
carries the `X-CloudBot-CSRF` header (which a cross-origin page cannot add without a CORS
preflight that fails) and an `Origin` the API trusts (its own public URL or
`CORS_ORIGINS`). SameSite alone would still let a page on a sibling port of the same host
spend the cookie.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from fastapi import Request, Response

from cloudbot_api.errors import ProblemError
from cloudbot_common.settings import Settings

COOKIE_PATH = "/api/auth/web"
REFRESH_COOKIE = "cloudbot_refresh"
CSRF_HEADER = "X-CloudBot-CSRF"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _secure(settings: Settings) -> bool:
    parts = urlsplit(settings.public_api_url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def set_refresh_cookie(response: Response, token: str, settings: Settings) -> None:
    response.set_cookie(
        REFRESH_COOKIE,
        token,
        max_age=settings.refresh_token_ttl_seconds,
        path=COOKIE_PATH,
        secure=_secure(settings),
        httponly=True,
        samesite="strict",
    )


def clear_refresh_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(
        REFRESH_COOKIE,
        path=COOKIE_PATH,
        secure=_secure(settings),
        httponly=True,
        samesite="strict",
    )


def check_browser_request(request: Request, settings: Settings) -> None:
    """Refuse (403) a cookie-spending request that is not the console's own."""
    trusted = {_origin(settings.public_api_url), *(o.lower() for o in settings.cors_origins)}
    origin = request.headers.get("origin", "").lower()
    if not request.headers.get(CSRF_HEADER) or origin not in trusted:
        raise ProblemError(
            403,
            "csrf_refused",
            f"Cookie requests need the {CSRF_HEADER} header and a trusted Origin.",
        )


def refresh_cookie(request: Request) -> str:
    token = request.cookies.get(REFRESH_COOKIE)
    if not token:
        raise ProblemError(401, "invalid_refresh_token", "Not signed in.")
    return token

"""The web console, served at /app/: sign up and in, provider keys, machines with their live
state, and each machine's desktop (noVNC through the gateway, with single-use tickets) with
its agent beside it. The console uses the public API like any client.

Its files are `web/app/` and noVNC from npm (`web/node_modules/@novnc/novnc`), installed by
`make install`. WEB_DIR points at that `web/` folder; unset, the checkout's own is used.
Without them the API runs as before and says once that the page is not served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from cloudbot_common.logging import get_logger
from cloudbot_common.settings import Settings

_log = get_logger(__name__)


def page_headers(public_gateway_url: str) -> dict[str, str]:
    """The page's own files only, and WebSockets to the configured gateway alone; nothing
    inline, nothing framed."""
    gateway = urlsplit(public_gateway_url)
    return {
        "Content-Security-Policy": (
            f"default-src 'self'; connect-src 'self' {gateway.scheme}://{gateway.netloc}; "
            "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


class _PageFiles(StaticFiles):
    def __init__(self, *, headers: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._headers = headers

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(self._headers)
        return response


# services/api/src/cloudbot_api/webapp.py -> the repository root
_CHECKOUT_WEB_DIR = Path(__file__).resolve().parents[4] / "web"


def web_root(web_dir: str) -> Path:
    """WEB_DIR, or the checkout's own web/ when it is unset."""
    return Path(web_dir) if web_dir else _CHECKOUT_WEB_DIR


def mount_web_app(app: FastAPI, settings: Settings) -> None:
    root = web_root(settings.web_dir)
    page, novnc = root / "app", root / "node_modules" / "@novnc" / "novnc"
    if not (page / "index.html").is_file() or not (novnc / "core" / "rfb.js").is_file():
        _log.warning("desktop page not served: web files missing (make install)", web_dir=str(root))
        return
    # The more specific mount first: Starlette tries them in order.
    headers = page_headers(settings.public_gateway_url)
    app.mount("/app/novnc", _PageFiles(directory=novnc, headers=headers), name="novnc")
    app.mount("/app", _PageFiles(directory=page, html=True, headers=headers), name="app")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/app/")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> RedirectResponse:
        return RedirectResponse("/app/favicon.svg")

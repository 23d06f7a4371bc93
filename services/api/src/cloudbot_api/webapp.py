"""The desktop page, served at /app/: log in, pick a running machine, watch and drive its
desktop in the browser (noVNC through the gateway, with a single-use ticket).

Its files are `web/app/` and noVNC from npm (`web/node_modules/@novnc/novnc`), installed by
`make install`. WEB_DIR points at that `web/` folder; unset, the checkout's own is used.
Without them the API runs as before and says once that the page is not served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from cloudbot_common.logging import get_logger

_log = get_logger(__name__)

# The page's own files only, and WebSockets to the gateway (on another origin); nothing
# inline, nothing framed.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _PageFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(_HEADERS)
        return response


# services/api/src/cloudbot_api/webapp.py -> the repository root
_CHECKOUT_WEB_DIR = Path(__file__).resolve().parents[4] / "web"


def mount_web_app(app: FastAPI, web_dir: str) -> None:
    root = Path(web_dir) if web_dir else _CHECKOUT_WEB_DIR
    page, novnc = root / "app", root / "node_modules" / "@novnc" / "novnc"
    if not (page / "index.html").is_file() or not (novnc / "core" / "rfb.js").is_file():
        _log.warning("desktop page not served: web files missing (make install)", web_dir=str(root))
        return
    # The more specific mount first: Starlette tries them in order.
    app.mount("/app/novnc", _PageFiles(directory=novnc), name="novnc")
    app.mount("/app", _PageFiles(directory=page, html=True), name="app")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/app/")

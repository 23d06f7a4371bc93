"""Swagger UI at /docs and ReDoc at /redoc, with their assets served from here (npm's
`swagger-ui-dist` and `redoc`, pinned in web/package-lock.json and installed by `make
install`), so that the pages work on a machine without internet. FastAPI's own pages load
them from a CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from cloudbot_common.logging import get_logger

_log = get_logger(__name__)

# The pages may load only what this service serves (their inline start-up scripts and
# styles included): nothing from a CDN, not even ReDoc's decorative logo.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; worker-src 'self' blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

SWAGGER_ASSETS = "/docs/assets"
REDOC_ASSETS = "/redoc/assets"


def mount_docs(app: FastAPI, web_root: Path) -> None:
    """Serve /docs and /redoc from the npm packages under `web_root`/node_modules."""
    modules = web_root / "node_modules"
    swagger, redoc = modules / "swagger-ui-dist", modules / "redoc" / "bundles"
    if (
        not (swagger / "swagger-ui-bundle.js").is_file()
        or not (redoc / "redoc.standalone.js").is_file()
    ):
        _log.warning("API docs pages not served: their npm packages are missing (make install)")
        return
    app.mount(SWAGGER_ASSETS, StaticFiles(directory=swagger), name="swagger-ui")
    app.mount(REDOC_ASSETS, StaticFiles(directory=redoc), name="redoc")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
        )
        page.headers.update(_HEADERS)
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc_page() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{REDOC_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
            with_google_fonts=False,
        )
        page.headers.update(_HEADERS)
        return page

"""/docs and /redoc work without internet: their assets come from the API itself (npm's
swagger-ui-dist and redoc), shown in Debian's Chromium with every request to anything but
127.0.0.1 refused."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.support.api import ApiServer

ROOT = Path(__file__).resolve().parents[2]
PLAYWRIGHT = ROOT / "web" / "node_modules" / "playwright-core" / "index.mjs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


async def test_the_docs_pages_load_nothing_from_elsewhere(api_server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api_server.url) as http:
        for path in ("/docs", "/redoc"):
            page = await http.get(path)
            assert page.status_code == 200
            assert "cdn." not in page.text
            assert "googleapis" not in page.text
        swagger = await http.get("/docs/assets/swagger-ui-bundle.js")
        assert swagger.status_code == 200
        assert "SwaggerUIBundle" in swagger.text
        redoc = await http.get("/redoc/assets/redoc.standalone.js")
        assert redoc.status_code == 200
        assert "Redoc" in redoc.text


async def test_the_docs_pages_render_every_operation_offline(api_server: ApiServer) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: apt-get install chromium fonts-dejavu-core")
    async with httpx.AsyncClient(base_url=api_server.url) as http:
        document = (await http.get("/openapi.json")).json()
    operations = {
        f"{method.upper()} {path}" for path, ops in document["paths"].items() for method in ops
    }
    driver = await asyncio.create_subprocess_exec(
        "node",
        str(Path(__file__).with_name("open_docs.mjs")),
        env={
            **os.environ,
            "PLAYWRIGHT_CORE": str(PLAYWRIGHT),
            "CHROMIUM": CHROMIUM,
            "API_URL": api_server.url,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await driver.communicate()
    assert driver.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    # Swagger UI shows every operation of the document; ReDoc one section per operation.
    assert set(result["swagger"]) == operations
    assert len(result["redoc"]) == len(operations)
    # Nothing was even asked of the outside world.
    assert result["refused"] == []

"""The anchor for the API's figures: a bare FastAPI app with one JSON endpoint, served by
uvicorn with the API's own settings (`cloudbot_api.main.run`: same loop, same HTTP parser,
no access log, no proxy headers).

    python -m bench.bare_app PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )

"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from cloudbot_api.deps import ResourcesDep
from cloudbot_common.health import check_database, check_redis

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Postgres and Redis reachable, migrations at head")
async def readyz(resources: ResourcesDep) -> JSONResponse:
    checks = {
        **await check_database(resources.engine),
        **await check_redis(resources.redis),
    }
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )

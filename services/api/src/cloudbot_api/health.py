"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from cloudbot_api.deps import ResourcesDep
from cloudbot_common.migrate import head_revision

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Postgres and Redis reachable, migrations at head")
async def readyz(resources: ResourcesDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        async with resources.engine.connect() as conn:
            current = await conn.scalar(text("SELECT version_num FROM alembic_version"))
        checks["postgres"] = "ok"
        checks["migrations"] = "ok" if current == head_revision() else f"at {current}"
    except Exception as exc:
        checks["postgres"] = f"unreachable: {type(exc).__name__}"
    try:
        await resources.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values()) and "migrations" in checks
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )

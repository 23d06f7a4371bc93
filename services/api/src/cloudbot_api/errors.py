"""One error shape everywhere: RFC 9457 problem details (`application/problem+json`)."""

from __future__ import annotations

import re
from functools import lru_cache
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloudbot_common.logging import get_logger
from cloudbot_common.outages import PEER_ERRORS, is_peer_outage

PROBLEM_JSON = "application/problem+json"
log = get_logger(__name__)


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where the bad value is, e.g. ['body', 'email']")
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field("about:blank", description="A URI naming the kind of problem")
    title: str
    status: int
    detail: str | None = None
    code: str = Field(description="Stable machine-readable code, e.g. `instance_state_conflict`")
    errors: list[FieldError] | None = Field(None, description="Validation errors, field by field")
    state: str | None = Field(None, description="For state conflicts: the instance's current state")


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or code)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.extra = extra


def problem_response(
    status: int,
    code: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = Problem(
        title=HTTPStatus(status).phrase, status=status, detail=detail, code=code, **extra
    ).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Never echo the submitted value back: it may be a password or an API key.
    return [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


@lru_cache(maxsize=256)
def _path_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)))


def _documented_methods(request: Request) -> set[str]:
    """Every method the document gives this path: Starlette's 405 names only the first
    matching route's, and FastAPI makes one route per method."""
    paths: dict[str, dict[str, object]] = request.app.openapi().get("paths", {})
    path = request.url.path
    if path in paths:  # a literal path beats a template it also fits (/instances/events)
        return {method.upper() for method in paths[path]}
    return {
        method.upper()
        for template, ops in paths.items()
        if _path_pattern(template).fullmatch(path)
        for method in ops
    }


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(_: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(
            422,
            "validation_failed",
            "The request is not valid; see `errors`.",
            errors=_validation_errors(exc),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else None
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405 and (methods := _documented_methods(request)):
            headers = {**(headers or {}), "Allow": ", ".join(sorted(methods))}
        return problem_response(exc.status_code, code, detail, headers=headers)

    async def _peer_away(request: Request, exc: Exception) -> JSONResponse:
        # Nothing was committed: the unit of work rolls back on the way out.
        log.warning("dependency unavailable", path=request.url.path, error=type(exc).__name__)
        return problem_response(
            503,
            "dependency_unavailable",
            "A service we depend on is unavailable; nothing was changed. Try again shortly.",
            headers={"Retry-After": "5"},
        )

    for kind in PEER_ERRORS:
        app.add_exception_handler(kind, _peer_away)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        if is_peer_outage(exc):
            return await _peer_away(request, exc)
        log.exception("unhandled error", path=request.url.path)
        return problem_response(500, "internal_error", "Something went wrong on our side.")


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the problem shape for each status."""
    return {
        status: {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }

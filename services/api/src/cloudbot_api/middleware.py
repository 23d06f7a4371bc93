"""Pure ASGI middleware: request ids with an access log and route metrics, and a cap on
request bodies. Pure ASGI (no BaseHTTPMiddleware) and few layers: each layer costs every
request a call and a wrapped `send`."""

from __future__ import annotations

import logging
import random
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import DEBUG

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudbot_api.errors import problem_response
from cloudbot_common.instance_contract import HEARTBEAT_PATH
from cloudbot_common.logging import get_logger

log = get_logger("cloudbot_api.access")
_access = logging.getLogger("cloudbot_api.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A request at least this slow always gets its access line, whatever the sampling.
_SLOW_SECONDS = 0.5
# Answered many times a minute by design: one line each would bury everything else.
_ROUTINE_PATHS = frozenset({HEARTBEAT_PATH, "/healthz", "/readyz"})


@dataclass(frozen=True, slots=True)
class RouteMetrics:
    """Request counts and latency by route template (never the raw path, whose ids would
    make a series per instance), method and status."""

    requests: Counter
    duration: Histogram
    # Routes not counted: probes and the scrape itself would drown the request figures.
    excluded: frozenset[str]
    # The full template of each route included under a prefix, by the route's id: a route
    # knows only its own router's part of the path.
    templates: dict[int, str] = field(default_factory=dict)

    @classmethod
    def create(cls, registry: CollectorRegistry, excluded: frozenset[str]) -> RouteMetrics:
        return cls(
            Counter(
                "http_requests_total",
                "HTTP requests by route template, method and status",
                ["handler", "method", "status"],
                registry=registry,
            ),
            Histogram(
                "http_request_duration_seconds",
                "Time to answer HTTP requests by route template and method",
                ["handler", "method"],
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=registry,
            ),
            excluded,
        )

    def name_routes(self, routes: Iterable[BaseRoute], prefix: str) -> None:
        for route in routes:
            path = getattr(route, "path", None)
            if path is not None:
                self.templates[id(route)] = prefix + path

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        # Unmatched paths (404s, scanners) share one series.
        handler = self.templates.get(id(route)) or getattr(route, "path", None) or "none"
        if handler in self.excluded:
            return
        method = scope["method"]
        self.requests.labels(handler, method, str(status)).inc()
        self.duration.labels(handler, method).observe(seconds)


class RequestContextMiddleware:
    """The outermost layer, once per request: a request id (the caller's X-Request-ID if
    sane, else a new one) bound to every log line of the request and to the commands it
    enqueues, the route's metrics, and an access line.

    Access lines of successful, quick requests are sampled at `access_log_sample` (1:
    all), the routine ones (machines' heartbeats, health probes) at DEBUG only; errors
    (status >= 400) and slow requests are always logged.
    """

    def __init__(
        self, app: ASGIApp, *, metrics: RouteMetrics | None = None, access_log_sample: float = 1.0
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.sample = access_log_sample

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(16)
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        started = answered = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                answered = time.perf_counter()
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                seconds = time.perf_counter() - started
                if self.metrics is not None:
                    # Until the response starts: an event stream's length is not latency.
                    self.metrics.observe(scope, status, max(answered - started, 0.0))
                # Sampling needs no secure randomness.
                sampled = random.random() < self.sample  # noqa: S311
                noteworthy = status >= 400 or seconds >= _SLOW_SECONDS
                # Routine requests that went well show at LOG_LEVEL=DEBUG only: asked of
                # the standard library first, since structlog would build the line anyway.
                routine = scope["path"] in _ROUTINE_PATHS and not noteworthy
                if (noteworthy or sampled) and (not routine or _access.isEnabledFor(DEBUG)):
                    # The path only: query strings are never logged.
                    (log.debug if routine else log.info)(
                        "request",
                        method=scope["method"],
                        path=scope["path"],
                        status=status,
                        duration_ms=round(seconds * 1000, 1),
                    )


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413 before reading them, by Content-Length
    or, when streamed, as soon as the count passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413, "payload_too_large", f"Request bodies are limited to {self.max_bytes} bytes."
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass

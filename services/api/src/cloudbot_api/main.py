"""The API application: `create_app()` for tests and servers, `run()` for the console script."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from cloudbot_api import health, openapi
from cloudbot_api.api_keys.router import router as api_keys_router
from cloudbot_api.audit.router import router as audit_router
from cloudbot_api.auth.router import router as auth_router
from cloudbot_api.docs import mount_docs
from cloudbot_api.errors import install_error_handlers
from cloudbot_api.headers import SecurityHeadersMiddleware
from cloudbot_api.instance_agent.router import router as instance_agent_router
from cloudbot_api.instances.router import router as instances_router
from cloudbot_api.instances.streams import EventStreams
from cloudbot_api.metrics import install_metrics
from cloudbot_api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from cloudbot_api.proxies import TrustedProxies
from cloudbot_api.ratelimit import RateLimiter
from cloudbot_api.resources import Resources
from cloudbot_api.sizes.router import router as sizes_router
from cloudbot_api.tokens.router import router as tokens_router
from cloudbot_api.webapp import mount_web_app, web_root
from cloudbot_api.webhooks.router import router as webhooks_router
from cloudbot_common.commands import make_celery
from cloudbot_common.db import create_engine, create_session_factory
from cloudbot_common.events import EventHub
from cloudbot_common.logging import configure_logging
from cloudbot_common.redis_client import redis_client, redis_timeouts
from cloudbot_common.revocations import RevocationWatch
from cloudbot_common.security.jwt_tokens import TokenCodec
from cloudbot_common.security.passwords import Passwords
from cloudbot_common.security.vault import Vault
from cloudbot_common.settings import Settings, get_settings

MAX_BODY_BYTES = 64 * 1024

DESCRIPTION = """
Sign up, keep your model providers' API keys encrypted, and run your own CloudBot machine.

Every error is an [RFC 9457](https://www.rfc-editor.org/rfc/rfc9457) problem document
(`application/problem+json`) with a stable `code`.
"""


def build_resources(settings: Settings) -> Resources:
    # No overflow (see create_engine): a request waits briefly for a pooled connection.
    engine = create_engine(settings, max_overflow=0)
    read_engine = create_engine(settings, max_overflow=0, autocommit=True)
    redis = redis_client(settings, decode_responses=True)
    events = EventHub(redis)
    return Resources(
        settings=settings,
        engine=engine,
        sessions=create_session_factory(engine),
        read_engine=read_engine,
        read_sessions=create_session_factory(read_engine),
        read_connections=read_engine.connect,
        redis=redis,
        celery=make_celery(settings, "cloudbot-api"),
        passwords=Passwords(settings),
        tokens=TokenCodec(settings),
        vault=Vault(settings.encryption_key.get_secret_value()),
        limiter=RateLimiter(
            settings.redis_url,
            enabled=settings.rate_limit_enabled,
            options=redis_timeouts(settings),
        ),
        proxies=TrustedProxies(settings.trusted_proxies),
        revocations=RevocationWatch(
            engine,
            redis,
            events,
            remember_seconds=settings.access_token_ttl_seconds + 60,
            in_memory=True,
        ),
        streams=EventStreams(
            redis,
            events,
            max_per_user=settings.sse_max_streams_per_user,
            max_seconds=settings.sse_max_stream_seconds,
        ),
        events=events,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resources = build_resources(settings)
        app.state.resources = resources
        resources.events.start()
        resources.revocations.start()
        try:
            yield
        finally:
            await resources.close()

    app = FastAPI(
        title="CloudBot control plane",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Served by cloudbot_api.docs from local assets, not FastAPI's CDN pages.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    install_error_handlers(app)
    app.openapi = openapi.document(app, settings)  # type: ignore[method-assign]
    routers = (
        (health.router, ""),
        (auth_router, "/api"),
        (api_keys_router, "/api"),
        (sizes_router, "/api"),
        (instances_router, "/api"),
        (tokens_router, "/api"),
        (audit_router, "/api"),
        (webhooks_router, "/api"),
        (instance_agent_router, ""),
    )
    for router, prefix in routers:
        app.include_router(router, prefix=prefix)
    mount_docs(app, web_root(settings.web_dir))
    mount_web_app(app, settings)
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=True,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=[
            "Authorization",
            "Content-Type",
            "Idempotency-Key",
            "Last-Event-ID",
            "X-CloudBot-CSRF",
            "X-Request-ID",
        ],
        expose_headers=["Retry-After", "X-Request-ID", "Location"],
    )
    app.add_middleware(SecurityHeadersMiddleware, proxies=TrustedProxies(settings.trusted_proxies))
    app.state.metrics_app, metrics = install_metrics(app)
    for router, prefix in routers:
        metrics.name_routes(router.routes, prefix)
    app.add_middleware(
        RequestContextMiddleware, metrics=metrics, access_log_sample=settings.api_access_log_sample
    )
    return app


class ByListener:
    """One ASGI app for the two listeners of the process: requests that came in on the
    metrics port go to the metrics app, all others (and the lifespan) to the API."""

    def __init__(self, api: FastAPI, metrics: ASGIApp, metrics_port: int) -> None:
        self.api = api
        self.metrics = metrics
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] != "lifespan" and server is not None and server[1] == self.metrics_port:
            await self.metrics(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def run() -> None:
    settings = get_settings()
    configure_logging("api", level=settings.log_level, json_output=settings.log_json)
    app = create_app(settings)
    listeners = [(settings.api_host, settings.api_port)]
    if settings.api_metrics_port:
        listeners.append((settings.api_metrics_host, settings.api_metrics_port))
    config = uvicorn.Config(
        ByListener(app, app.state.metrics_app, settings.api_metrics_port),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=20,
    )
    # uvicorn's own binding, once per listener; one server serves both.
    sockets = [
        uvicorn.Config(config.app, host=host, port=port, log_config=None).bind_socket()
        for host, port in listeners
    ]
    # Ctrl-C (or a reload under `make dev`) ends it; uvicorn has already said so.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=sockets)

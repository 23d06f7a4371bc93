"""The gateway process: one websockets server answering the WebSocket routes and the
health endpoints, deciding every refusal before the handshake completes, and another on
the internal metrics listener (GATEWAY_METRICS_HOST:GATEWAY_METRICS_PORT) for /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import InvalidHandshake
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from cloudbot_common.audit import Origin
from cloudbot_common.db import create_engine, create_session_factory
from cloudbot_common.events import EventHub
from cloudbot_common.health import check_database, check_redis
from cloudbot_common.logging import get_logger
from cloudbot_common.redis_client import redis_client
from cloudbot_common.revocations import RevocationWatch
from cloudbot_common.security.jwt_tokens import TokenCodec
from cloudbot_common.security.opaque import agent_credential
from cloudbot_common.settings import Settings
from cloudbot_common.tickets import Channel
from cloudbot_gateway import zerocopy
from cloudbot_gateway.auth import Authenticator
from cloudbot_gateway.connection import GatewayConnection
from cloudbot_gateway.journal import Journal
from cloudbot_gateway.metrics import Metrics
from cloudbot_gateway.refusals import Refusal, http_response, not_found
from cloudbot_gateway.relay import MAX_QUEUE, open_agent
from cloudbot_gateway.sessions import CLOSE_SHUTDOWN, Session, SessionRegistry, Upstream
from cloudbot_gateway.targets import TargetDirectory
from cloudbot_gateway.vnc import CLIENT_WRITE_LIMIT, open_tcp

_log = get_logger(__name__)

_ROUTE = re.compile(r"/api/instances/([0-9A-Fa-f-]{32,36})/(vnc|cloudbot)")
_BINARY = Subprotocol("binary")
UPSTREAM_CONNECT_TIMEOUT = 5.0
PING_INTERVAL = 20.0
# Frames queued per direction before the socket stops being read; with max_size this
# bounds what one client can make us hold.


def _json(status: HTTPStatus, payload: dict[str, Any]) -> Response:
    return http_response(
        status, json.dumps(payload).encode(), [("Content-Type", "application/json")]
    )


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.draining = False
        # websockets logs request lines and headers at DEBUG; those carry tickets and
        # tokens. Its logger is held at WARNING whatever LOG_LEVEL says.
        self._ws_logger = logging.getLogger("cloudbot_gateway.websockets")
        self._ws_logger.setLevel(max(logging.WARNING, logging.getLogger().level))
        self._server: Server | None = None
        self._metrics_server: Server | None = None

    async def start(self, *, sock: Any = None, reuse_port: bool = False) -> None:
        """Listen on `sock`, or on the configured address (shared with the other workers of
        the same gateway when `reuse_port`)."""
        s = self.settings
        self.engine = create_engine(s, pool_size=min(s.database_pool_size, 5))
        self.redis = redis_client(s, decode_responses=True, health_check_interval=30)
        self.hub = EventHub(self.redis)
        self.revocations = RevocationWatch(
            self.engine, self.redis, self.hub, remember_seconds=s.access_token_ttl_seconds + 60
        )
        self.targets = TargetDirectory(self.engine, self.redis)
        self.sessions = SessionRegistry(
            self.redis,
            self.hub,
            self.metrics,
            self.targets.states,
            max_per_user=s.gateway_max_sessions_per_user,
            idle_timeout=s.gateway_idle_timeout_seconds,
            revocations=self.revocations,
        )
        db_sessions = create_session_factory(self.engine)
        self.auth = Authenticator(
            TokenCodec(s),
            self.redis,
            db_sessions,
            s.allowed_ws_origins,
            revocations=self.revocations,
        )
        self.journal = Journal(db_sessions, self.redis)
        self.journal.start()
        self._agent_secret = s.agent_token_secret.get_secret_value()
        self.zero_copy = s.gateway_zero_copy and zerocopy.supported()
        self.metrics.zero_copy.set(self.zero_copy)
        self.hub.on_instance(None, self.targets.on_state_event)
        self.hub.start()
        self.revocations.start()
        self.sessions.start()
        self._server = await serve(
            self._handle,
            None if sock is not None else s.gateway_host,
            None if sock is not None else s.gateway_port,
            sock=sock,
            create_connection=GatewayConnection,
            process_request=self._process_request,
            select_subprotocol=self._select_subprotocol,
            compression=None,
            server_header=None,
            max_size=s.gateway_max_message_bytes,
            max_queue=MAX_QUEUE,
            write_limit=CLIENT_WRITE_LIMIT,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_INTERVAL,
            close_timeout=5,
            open_timeout=10,
            logger=self._ws_logger,
            backlog=4096,
            reuse_port=reuse_port or None,
        )
        if s.gateway_metrics_port:
            # Workers share this port too; whichever answers reports them all (metrics.py).
            self._metrics_server = await serve(
                self._never_upgraded,
                s.gateway_metrics_host,
                s.gateway_metrics_port,
                process_request=self._metrics_request,
                server_header=None,
                logger=self._ws_logger,
                reuse_port=reuse_port or None,
            )
        self.metrics.workers.set(1)
        _log.info(
            "gateway listening", host=s.gateway_host, port=s.gateway_port, zero_copy=self.zero_copy
        )

    async def drain_and_stop(self, grace_seconds: float) -> None:
        """Stop accepting, let live sessions run up to `grace_seconds`, close the rest (1012)."""
        self.draining = True
        assert self._server is not None
        self._server.close(close_connections=False)
        self.metrics.workers.set(0)
        live = len(self.sessions)
        _log.info("draining", sessions=live, grace_seconds=grace_seconds)
        if live and not await self.sessions.wait_empty(grace_seconds):
            self.sessions.end_all(CLOSE_SHUTDOWN, "gateway restarting", "shutdown")
        try:
            async with asyncio.timeout(10):
                await self._server.wait_closed()
        except TimeoutError:
            _log.warning("connections still open at exit", sessions=len(self.sessions))
        await self.sessions.aclose()
        await self.journal.aclose()
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        await self.targets.aclose()
        await self.revocations.stop()
        await self.hub.stop()
        await self.redis.aclose()
        await self.engine.dispose()
        _log.info("gateway stopped")

    # --- the opening handshake ---------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        # Never log request.path: its query string may hold a ticket.
        path, _, query = request.path.partition("?")
        route = _ROUTE.fullmatch(path)
        if route is None:
            return await self._plain_http(path)
        started = time.perf_counter()
        channel = Channel(route.group(2))
        try:
            session = await self._admit(request, route.group(1), channel, query)
        except Refusal as refusal:
            self.metrics.refusals.labels(refusal.code).inc()
            return refusal.response()
        except Exception as exc:
            _log.error("upgrade check failed", error=type(exc).__name__, channel=channel.value)
            self.metrics.refusals.labels("unavailable").inc()
            return Refusal(
                HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", "Try again shortly."
            ).response()
        assert isinstance(connection, GatewayConnection)
        assert session.upstream is not None
        connection.session = session
        peer = connection.remote_address
        session.origin = Origin(
            address=str(peer[0]) if peer else None,
            user_agent=request.headers.get("User-Agent"),
            request_id=None,
        )
        session.upstream.bind(connection, session)
        # If the handshake never completes (client gone, server closing), the handler does
        # not run: release what the session holds when the connection goes.
        connection.connection_lost_waiter.add_done_callback(lambda _: self._abandon(session))
        self.metrics.connect_latency.labels(channel.value).observe(time.perf_counter() - started)
        return None

    async def _admit(self, request: Request, raw_id: str, channel: Channel, query: str) -> Session:
        if self.draining:
            raise Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "draining", "Gateway restarting.")
        headers = request.headers
        if "websocket" not in headers.get("Upgrade", "").lower():
            raise Refusal(
                HTTPStatus.UPGRADE_REQUIRED, "upgrade_required", "WebSocket upgrade expected."
            )
        try:
            instance_id = uuid.UUID(raw_id)
        except ValueError:
            raise not_found() from None
        self.auth.check_origin(headers)
        principal = await self.auth.authenticate(
            headers, parse_qs(query, keep_blank_values=True), instance_id, channel
        )
        target = await self.targets.resolve(instance_id, principal.user_id)
        port = target.vnc_port if channel is Channel.VNC else target.agent_port
        if target.host is None or port is None:
            raise Refusal(
                HTTPStatus.BAD_GATEWAY, "upstream_unreachable", "The instance is not reachable."
            )
        session = self.sessions.new_session(
            principal.user_id, principal.session_id, instance_id, channel, principal.via
        )
        await self.sessions.acquire(session)
        upstream: Upstream
        try:
            # The machine's gate admits us on this credential, and so does its agent.
            credential = agent_credential(self._agent_secret, instance_id)
            if channel is Channel.VNC:
                upstream = await open_tcp(
                    target.host,
                    port,
                    credential,
                    UPSTREAM_CONNECT_TIMEOUT,
                    zero_copy=self.zero_copy,
                )
            else:
                upstream = await open_agent(
                    target.host,
                    port,
                    credential,
                    connect_timeout=UPSTREAM_CONNECT_TIMEOUT,
                    max_size=self.settings.gateway_max_message_bytes,
                    logger=self._ws_logger,
                )
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self.sessions.release_soon(session)
            _log.warning(
                "upstream unreachable",
                instance_id=str(instance_id),
                channel=channel.value,
                error=type(exc).__name__,
            )
            raise Refusal(
                HTTPStatus.BAD_GATEWAY, "upstream_unreachable", "The instance is not reachable."
            ) from None
        except BaseException:
            self.sessions.release_soon(session)
            raise
        session.upstream = upstream
        return session

    def _abandon(self, session: Session) -> None:
        if session.started:
            return
        session.started = True  # run once
        if session.upstream is not None:
            session.upstream.abandon()
        self.sessions.release_soon(session)

    def _select_subprotocol(
        self, connection: ServerConnection, offered: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        # noVNC asks for "binary"; a client that asks for nothing gets binary frames anyway.
        session = getattr(connection, "session", None)
        if session is not None and session.channel is Channel.VNC and _BINARY in offered:
            return _BINARY
        return None

    async def _plain_http(self, path: str) -> Response:
        if path == "/healthz":
            return _json(HTTPStatus.OK, {"status": "ok"})
        if path == "/readyz":
            return await self._readyz()
        return not_found().response()

    async def _metrics_request(self, _: ServerConnection, request: Request) -> Response:
        if request.path.partition("?")[0] != "/metrics":
            return not_found().response()
        body, content_type = self.metrics.render()
        return http_response(HTTPStatus.OK, body, [("Content-Type", content_type)])

    async def _never_upgraded(self, connection: ServerConnection) -> None:
        """The metrics listener answers every request in `_metrics_request`."""

    async def _readyz(self) -> Response:
        checks = {**await check_database(self.engine), **await check_redis(self.redis)}
        checks["events"] = "ok" if self.hub.ready.is_set() else "subscribing"
        if self.draining:
            checks["gateway"] = "draining"
        ready = all(v == "ok" for v in checks.values())
        return _json(
            HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
            {"status": "ok" if ready else "unavailable", "checks": checks},
        )

    # --- a live session ----------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        assert isinstance(connection, GatewayConnection)
        session = connection.session
        if session is None or session.upstream is None or session.started:
            return
        self.sessions.attach(session)
        self.journal.opened(session)
        _log.info(
            "session opened",
            session=session.id,
            instance_id=str(session.instance_id),
            user_id=str(session.user_id),
            channel=session.channel.value,
            via=session.via,
        )
        cause = "error"
        try:
            cause = await session.upstream.relay(connection, session)
        finally:
            self.sessions.detach(session, cause)
            self.journal.closed(session, cause)
            _log.info(
                "session closed",
                session=session.id,
                instance_id=str(session.instance_id),
                channel=session.channel.value,
                cause=cause,
                seconds=round(time.monotonic() - session.opened_at, 3),
                bytes_up=session.bytes_up,
                bytes_down=session.bytes_down,
            )

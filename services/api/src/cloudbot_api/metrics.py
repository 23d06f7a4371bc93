"""Prometheus metrics of the API at `/metrics` on its own internal listener
(API_METRICS_HOST:API_METRICS_PORT), never on the public port.

Request counts and latency by route are counted by the request middleware. The
platform gauges (instances per state, provisioning queue depth, outbox lag) are read from
Postgres and the broker when Prometheus scrapes, so they are never stale and cost nothing
between scrapes. Every API replica reports the same platform figures: aggregate them with
`max`, not `sum`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Route

from cloudbot_api.middleware import RouteMetrics
from cloudbot_api.resources import Resources
from cloudbot_common.commands import PROVISIONING_QUEUE
from cloudbot_common.models import Instance, InstanceState, OutboxCommand
from cloudbot_common.redis_client import redis_client

METRICS_PATH = "/metrics"
# Probes and the scrape itself would drown the request figures.
_NOT_INSTRUMENTED = frozenset({METRICS_PATH, "/healthz", "/readyz"})
# kombu's Redis transport keeps one list per priority step; unprioritised messages sit in
# the plain queue name, the others in "<queue>\x06\x16<priority>".
_PRIORITY_STEPS = (0, 3, 6, 9)


def _queue_keys(queue: str) -> list[str]:
    return [queue if step == 0 else f"{queue}\x06\x16{step}" for step in _PRIORITY_STEPS]


@dataclass
class PlatformGauges:
    """Gauges filled at scrape time, in the app's own registry."""

    registry: CollectorRegistry
    instances: Gauge = field(init=False)
    queue_depth: Gauge = field(init=False)
    outbox_pending: Gauge = field(init=False)
    outbox_lag: Gauge = field(init=False)
    source_up: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.instances = Gauge(
            "cloudbot_instances", "Instances by lifecycle state", ["state"], registry=r
        )
        self.queue_depth = Gauge(
            "cloudbot_provisioning_queue_depth",
            f"Commands waiting in the Celery '{PROVISIONING_QUEUE}' queue",
            registry=r,
        )
        self.outbox_pending = Gauge(
            "cloudbot_outbox_pending", "Outbox commands not yet completed", registry=r
        )
        self.outbox_lag = Gauge(
            "cloudbot_outbox_lag_seconds",
            "Age of the oldest outbox command not yet completed (0 when none)",
            registry=r,
        )
        self.source_up = Gauge(
            "cloudbot_metrics_source_up",
            "Whether the last scrape could read this source (1) or not (0)",
            ["source"],
            registry=r,
        )

    async def refresh(self, resources: Resources) -> None:
        await self._refresh_database(resources.engine)
        await self._refresh_queue(resources)

    async def _refresh_database(self, engine: AsyncEngine) -> None:
        try:
            async with engine.connect() as conn:
                rows = (
                    await conn.execute(
                        select(Instance.state, func.count()).group_by(Instance.state)
                    )
                ).all()
                pending, oldest_age = (
                    await conn.execute(
                        select(
                            func.count(),
                            func.extract("epoch", func.now() - func.min(OutboxCommand.created_at)),
                        ).where(OutboxCommand.completed_at.is_(None))
                    )
                ).one()
        except Exception:
            self.source_up.labels("postgres").set(0)
            return
        counts = {state: int(n) for state, n in rows}
        for state in InstanceState:
            self.instances.labels(state.value).set(counts.get(state.value, 0))
        self.outbox_pending.set(int(pending))
        self.outbox_lag.set(max(float(oldest_age or 0), 0.0))
        self.source_up.labels("postgres").set(1)

    async def _refresh_queue(self, resources: Resources) -> None:
        broker_url = resources.settings.broker_url
        same = broker_url == resources.settings.redis_url
        if not broker_url.startswith(("redis://", "rediss://", "unix://")):
            return
        client = resources.redis if same else redis_client(resources.settings, broker_url)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for key in _queue_keys(PROVISIONING_QUEUE):
                    pipe.llen(key)
                lengths = await pipe.execute()
            self.queue_depth.set(sum(int(n) for n in lengths))
            self.source_up.labels("broker").set(1)
        except Exception:
            self.source_up.labels("broker").set(0)
        finally:
            if not same:
                await client.aclose()


class RevocationChecks(Collector):
    """How each authenticated request's revocation check was answered: from memory (the
    event hub caught up), by Redis, or by Postgres; read from the watch at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "cloudbot_revocation_checks",
            "Login-session revocation checks, by what answered them",
            labels=["by"],
        )
        resources: Resources | None = getattr(self.app.state, "resources", None)
        if resources is not None:
            for by, count in sorted(resources.revocations.answered_by.items()):
                family.add_metric([by], count)
        yield family


def install_metrics(app: FastAPI) -> tuple[Starlette, RouteMetrics]:
    """The app that serves the metrics at `/metrics` (on the internal listener only), and
    the request figures for the request middleware to fill.

    Each app gets its own registry, so several apps in one process (tests) never clash.
    """
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    route_metrics = RouteMetrics.create(registry, _NOT_INSTRUMENTED)
    registry.register(RevocationChecks(app))
    gauges = PlatformGauges(registry)
    scrape_seconds = Gauge(
        "cloudbot_metrics_scrape_seconds",
        "Time spent reading the platform gauges in the last scrape",
        registry=registry,
    )

    async def metrics(request: Request) -> Response:
        started = time.perf_counter()
        await gauges.refresh(app.state.resources)
        scrape_seconds.set(time.perf_counter() - started)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route(METRICS_PATH, metrics, methods=["GET"])]), route_metrics

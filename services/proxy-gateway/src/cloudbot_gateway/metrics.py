"""Prometheus metrics of the gateway, served at /metrics.

Nothing here is touched per frame: relays count bytes in plain integers on their session
and the session registry folds them into these counters on its periodic tick and at close.

Under a supervisor (GATEWAY_WORKERS, see workers.py) each worker keeps its values in
prometheus_client's multiprocess files and /metrics reports the sum over the workers.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.open_sessions = Gauge(
            "cloudbot_gateway_open_sessions",
            "Relay sessions open now",
            ["channel"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.sessions = Counter(
            "cloudbot_gateway_sessions",
            "Relay sessions opened",
            ["channel"],
            registry=self.registry,
        )
        self.bytes_relayed = Counter(
            "cloudbot_gateway_relayed_bytes",
            "Payload bytes relayed; direction is seen from the client (up: towards the instance)",
            ["channel", "direction"],
            registry=self.registry,
        )
        self.connect_latency = Histogram(
            "cloudbot_gateway_connect_seconds",
            "From the upgrade request to the upstream being connected (auth, lookup, connect)",
            ["channel"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.refusals = Counter(
            "cloudbot_gateway_refusals",
            "Upgrade requests refused before the handshake, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.session_closes = Counter(
            "cloudbot_gateway_session_closes",
            "Sessions ended, by why they ended",
            ["channel", "cause"],
            registry=self.registry,
        )

        self.zero_copy = Gauge(
            "cloudbot_gateway_zero_copy",
            "1 when the desktop is relayed with splice(2), 0 when it is copied",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.workers = Gauge(
            "cloudbot_gateway_workers",
            "Gateway processes listening (more than one with GATEWAY_WORKERS)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        # What /metrics reports: this process's registry, or every worker's files.
        self._exposed = self.registry
        if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self._exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._exposed, directory)  # type: ignore[no-untyped-call]

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self._exposed), CONTENT_TYPE_LATEST

"""Every route's dependencies run on the event loop: FastAPI runs a plain `def`
dependency or endpoint in a worker thread, a hop that cost more than most dependencies do
(README, Performance of the API). A new one written as `def` fails here."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from cloudbot_api.main import create_app
from cloudbot_common.settings import Settings

pytestmark = pytest.mark.fast


def _api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)  # a router included lazily
        if included is not None:
            yield from _api_routes(included.routes)


def _calls(dependant: Dependant) -> Iterator[Any]:
    if dependant.call is not None:
        yield dependant.call
    for sub in dependant.dependencies:
        yield from _calls(sub)


def _on_the_loop(call: Any) -> bool:
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return True
    # A dependency that is an object (FastAPI's security schemes) is called.
    method = getattr(call, "__call__", None)  # noqa: B004
    return not inspect.isfunction(call) and inspect.iscoroutinefunction(method)


def test_no_dependency_or_endpoint_runs_in_a_worker_thread(settings: Settings) -> None:
    routes = list(_api_routes(create_app(settings).router.routes))
    assert len(routes) > 30  # the walk found the included routers
    threaded = {
        f"{route.path}: {getattr(call, '__qualname__', call)}"
        for route in routes
        for call in _calls(route.dependant)
        if not _on_the_loop(call)
    }
    assert not threaded, sorted(threaded)

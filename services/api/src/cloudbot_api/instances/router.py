from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, status
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from cloudbot_api.deps import (
    AuditorDep,
    ClientAddress,
    CurrentPrincipal,
    Principal,
    ResourcesDep,
    UowDep,
)
from cloudbot_api.errors import problem_responses
from cloudbot_api.instances.schemas import (
    InstanceCreate,
    InstanceList,
    InstanceOut,
    InstanceUpdate,
    TicketCreate,
    TicketOut,
)
from cloudbot_api.instances.service import InstanceFeed, InstanceQueries, InstanceService
from cloudbot_api.instances.streams import Stream
from cloudbot_common.lifecycle import START, STOP, TERMINATE
from cloudbot_common.models import InstanceState

router = APIRouter(prefix="/instances", tags=["instances"])

SSE_KEEPALIVE_SECONDS = 15


async def get_service(
    uow: UowDep, resources: ResourcesDep, request: Request, audit: AuditorDep
) -> InstanceService:
    return InstanceService(
        uow,
        settings=resources.settings,
        redis=resources.redis,
        celery=resources.celery,
        sessions=resources.sessions,
        audit=audit,
        request_id=getattr(request.state, "request_id", None),
    )


async def get_feed(resources: ResourcesDep) -> InstanceFeed:
    return InstanceFeed(
        sessions=resources.sessions, reads=resources.read_connections, settings=resources.settings
    )


FeedDep = Annotated[InstanceFeed, Depends(get_feed)]


async def get_queries(resources: ResourcesDep) -> InstanceQueries:
    return InstanceQueries(resources.read_connections, settings=resources.settings)


QueriesDep = Annotated[InstanceQueries, Depends(get_queries)]


ServiceDep = Annotated[InstanceService, Depends(get_service)]


@router.get(
    "", response_model=InstanceList, summary="Your instances", responses=problem_responses(401)
)
async def list_instances(
    principal: CurrentPrincipal,
    queries: QueriesDep,
    include_terminated: Annotated[bool, Query()] = False,
) -> InstanceList:
    return InstanceList(items=await queries.list(principal.user_id, include_terminated))


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=InstanceOut,
    summary="Create a CloudBot machine",
    description=(
        "Answers 202 with the instance in `pending`; watch `/events` for progress. "
        "Send an `Idempotency-Key` to retry safely: a retry returns the first answer, and "
        "the same key with a different body is refused (409)."
    ),
    responses=problem_responses(401, 403, 409, 413, 422, 429),
)
async def create_instance(
    body: InstanceCreate,
    principal: CurrentPrincipal,
    service: ServiceDep,
    resources: ResourcesDep,
    client: ClientAddress,
    idempotency_key: Annotated[str | None, Header(max_length=255, min_length=1)] = None,
) -> JSONResponse:
    # Per account first; the per-address limit is only a backstop against many accounts
    # from one address, high enough for people sharing one (an office, a NAT).
    settings = resources.settings
    await resources.limiter.hit(
        settings.rate_limit_instance_create, "instance-create", f"user:{principal.user_id}"
    )
    await resources.limiter.hit(
        settings.rate_limit_instance_create_per_address, "instance-create-address", "ip:" + client
    )
    status_code, payload = await service.create(
        principal.user_id, body, idempotency_key, actor=principal.actor
    )
    return JSONResponse(
        payload,
        status_code=status_code,
        headers={"Location": f"/api/instances/{payload['id']}"},
    )


@router.get(
    "/events",
    summary="Server-Sent Events of all your instances: the list, then each change",
    description=(
        'The first event is `event: snapshot` with `{"items": [...]}` as `GET /instances` '
        "answers it; then `event: instance` with the whole instance each time one is "
        'created or changes state or health, `event: removed` with `{"id": ...}` when '
        'one is terminated, and `event: idle_warning` with `{"id", "reason", "at"}` when '
        "one will soon be stopped for being unused. Each connection starts with a "
        "snapshot, so a client that reconnects needs no event id. The stream ends when "
        "the login session does and after SSE_MAX_STREAM_SECONDS, and counts against "
        "SSE_MAX_STREAMS_PER_USER (429 beyond)."
    ),
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **problem_responses(401, 429)},
)
async def my_instance_events(
    principal: CurrentPrincipal, resources: ResourcesDep, feed: FeedDep
) -> EventSourceResponse:
    stream = await resources.streams.open(principal.user_id, principal.session_id)
    return EventSourceResponse(
        _owner_stream(resources, feed, principal, stream), ping=SSE_KEEPALIVE_SECONDS
    )


def _shown(out: dict[str, Any]) -> tuple[Any, ...]:
    # What a person sees change; heartbeat times alone are not news.
    health = out["health"]
    return (out["name"], out["state"], out["state_reason"], health["desktop"], health["agent"])


async def _owner_stream(
    resources: ResourcesDep, feed: InstanceFeed, principal: Principal, stream: Stream
) -> AsyncIterator[dict[str, str]]:
    wake = anyio.Event()

    def on_change() -> None:
        wake.set()

    unsubscribe = resources.events.on_owner(str(principal.user_id), on_change)
    sent: dict[str, dict[str, Any]] | None = None
    warned_after = 0  # the last instance event seen, for idle warnings
    try:
        while not stream.ended.is_set():
            wake = anyio.Event()  # armed before reading, so nothing published after is missed
            if sent is None:
                warned_after = await feed.last_event_id()
            now, warnings = await feed.owner_view(principal.user_id, warned_after)
            if sent is None:
                yield {"event": "snapshot", "data": json.dumps({"items": list(now.values())})}
            else:
                for key, out in now.items():
                    if key not in sent or _shown(sent[key]) != _shown(out):
                        yield {"event": "instance", "data": json.dumps(out)}
                for key in sent.keys() - now.keys():
                    yield {"event": "removed", "data": json.dumps({"id": key})}
            for warning in warnings:
                warned_after = warning.id
                data = {
                    "id": str(warning.instance_id),
                    "reason": warning.reason,
                    "at": warning.created_at.isoformat(),
                }
                yield {"event": "idle_warning", "data": json.dumps(data)}
            sent = now
            # Woken by the event hub; the timeout re-reads in case a message was lost and
            # to notice health going stale.
            await stream.wait(wake, SSE_KEEPALIVE_SECONDS)
    finally:
        unsubscribe()
        stream.close()


@router.get(
    "/{instance_id:uuid}",
    response_model=InstanceOut,
    summary="One instance, with its state and health",
    responses=problem_responses(401, 404, 422),
)
async def get_instance(
    instance_id: uuid.UUID, principal: CurrentPrincipal, queries: QueriesDep
) -> InstanceOut:
    return await queries.get(principal.user_id, instance_id)


# Each route asks for one command of the lifecycle table; its states are the table's.
_COMMAND_ROUTE: dict[str, Any] = {
    "status_code": status.HTTP_202_ACCEPTED,
    "response_model": InstanceOut,
    "responses": problem_responses(401, 404, 409, 422),
}


@router.delete(
    "/{instance_id:uuid}",
    summary="Delete (terminate) the machine; its disk is gone",
    **_COMMAND_ROUTE,
)
async def delete_instance(
    instance_id: uuid.UUID, principal: CurrentPrincipal, service: ServiceDep
) -> InstanceOut:
    return service.out(
        await service.request(principal.user_id, instance_id, TERMINATE, actor=principal.actor)
    )


@router.post(
    "/{instance_id:uuid}/stop", summary="Stop the machine, keeping its disk", **_COMMAND_ROUTE
)
async def stop_instance(
    instance_id: uuid.UUID, principal: CurrentPrincipal, service: ServiceDep
) -> InstanceOut:
    return service.out(
        await service.request(principal.user_id, instance_id, STOP, actor=principal.actor)
    )


@router.post("/{instance_id:uuid}/start", summary="Start a stopped machine", **_COMMAND_ROUTE)
async def start_instance(
    instance_id: uuid.UUID, principal: CurrentPrincipal, service: ServiceDep
) -> InstanceOut:
    return service.out(
        await service.request(principal.user_id, instance_id, START, actor=principal.actor)
    )


@router.patch(
    "/{instance_id:uuid}",
    response_model=InstanceOut,
    summary="Change a machine's settings (its idle stop)",
    responses=problem_responses(401, 403, 404, 413, 422),
)
async def update_instance(
    instance_id: uuid.UUID, body: InstanceUpdate, principal: CurrentPrincipal, service: ServiceDep
) -> InstanceOut:
    return service.out(await service.update(principal.user_id, instance_id, body))


@router.post(
    "/{instance_id:uuid}/tickets",
    status_code=status.HTTP_201_CREATED,
    response_model=TicketOut,
    summary="A one-time ticket for a browser to open the desktop or agent WebSocket",
    responses=problem_responses(401, 404, 409, 422),
)
async def create_ticket(
    instance_id: uuid.UUID, body: TicketCreate, principal: CurrentPrincipal, service: ServiceDep
) -> TicketOut:
    return await service.ticket(principal.user_id, principal.session_id, instance_id, body.channel)


@router.get(
    "/{instance_id:uuid}/events",
    summary="Server-Sent Events of the instance's state changes",
    description=(
        "Each event is `event: state` with the state history entry as data and its id as "
        "the event id, or `event: idle_warning` when the machine will soon be stopped for "
        "being unused (its reason says when). Reconnect with `Last-Event-ID` to resume "
        "after the last one seen. The stream ends after `terminated`, when the login session "
        "ends, and after SSE_MAX_STREAM_SECONDS; at most SSE_MAX_STREAMS_PER_USER streams "
        "are open per user (429 beyond)."
    ),
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        **problem_responses(401, 404, 422, 429),
    },
)
async def instance_events(
    instance_id: uuid.UUID,
    principal: CurrentPrincipal,
    resources: ResourcesDep,
    feed: FeedDep,
    last_event_id: Annotated[
        str | None,
        Header(
            pattern=r"^[0-9]{1,18}$",
            description="The id of the last event seen; the stream resumes after it",
        ),
    ] = None,
) -> EventSourceResponse:
    await feed.check_owned(principal.user_id, instance_id)
    stream = await resources.streams.open(principal.user_id, principal.session_id)
    return EventSourceResponse(
        _event_stream(resources, feed, instance_id, int(last_event_id or 0), stream),
        ping=SSE_KEEPALIVE_SECONDS,
    )


async def _event_stream(
    resources: ResourcesDep,
    feed: InstanceFeed,
    instance_id: uuid.UUID,
    after: int,
    stream: Stream,
) -> AsyncIterator[dict[str, str]]:
    wake = anyio.Event()

    def on_event(_: object) -> None:
        wake.set()

    unsubscribe = resources.events.on_instance(str(instance_id), on_event)
    try:
        while not stream.ended.is_set():
            wake = anyio.Event()  # armed before reading, so nothing published after is missed
            rows = await feed.history(instance_id, after)
            for row in rows:
                after = row.id
                data = {
                    "instance_id": str(instance_id),
                    "state": row.state,
                    "reason": row.reason,
                    "at": row.created_at.isoformat(),
                }
                # "state", or "idle_warning" when an idle stop is near (state unchanged).
                yield {"id": str(row.id), "event": row.kind, "data": json.dumps(data)}
                if row.kind == "state" and row.state == InstanceState.TERMINATED:
                    return
            if not rows:
                # Woken by the event hub; the timeout re-reads in case a message was lost.
                await stream.wait(wake, SSE_KEEPALIVE_SECONDS)
    finally:
        unsubscribe()
        stream.close()

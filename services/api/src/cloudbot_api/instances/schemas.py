from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from cloudbot_common.models import InstanceState
from cloudbot_common.tickets import Channel

IDLE_STOP_MAX_MINUTES = 7 * 24 * 60


def _a_number(value: object) -> object:
    # A JSON number, as the schema says (165.0 is 165): not `true`, not "165".
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a whole number of minutes")
    return value


Minutes = Annotated[int, BeforeValidator(_a_number)]


class InstanceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$",
        description="A name you recognise: letters, digits, space, dot, dash, underscore",
    )
    # Omitted: DEFAULT_INSTANCE_SIZE (the empty default is never validated, and an explicit
    # empty string is refused). The document lists the offered sizes as an enum.
    size: str = Field(
        "",
        min_length=1,
        max_length=32,
        description="One of the offered sizes (GET /api/sizes); omitted, the default one",
    )
    idle_stop_minutes: Minutes | None = Field(
        default=None,
        ge=0,
        le=IDLE_STOP_MAX_MINUTES,
        description="Stop the machine after this many minutes unused (no desktop or agent "
        "session, no input, the agent idle); 0: never; omitted: the operator's default",
    )


class InstanceUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    idle_stop_minutes: Minutes = Field(
        ge=0,
        le=IDLE_STOP_MAX_MINUTES,
        description="Minutes unused before an idle stop; 0: never",
    )


class Health(BaseModel):
    desktop: bool | None = Field(description="The desktop (VNC) is up, as last reported")
    agent: bool | None = Field(description="The CloudBot agent is up, as last reported")
    last_heartbeat_at: datetime | None


class InstanceOut(BaseModel):
    id: uuid.UUID
    name: str
    size: str
    state: InstanceState
    state_reason: str | None
    state_changed_at: datetime
    health: Health
    idle_stop_minutes: int = Field(description="Minutes unused before an idle stop; 0: never")
    created_at: datetime
    updated_at: datetime


class InstanceList(BaseModel):
    items: list[InstanceOut]


class TicketCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: Channel


class TicketOut(BaseModel):
    ticket: str = Field(description="Single use; valid for `expires_in` seconds")
    channel: Channel
    expires_in: int
    url: str = Field(description="The gateway WebSocket URL, ticket included")

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from cloudbot_common.models import InstanceState
from cloudbot_common.tickets import Channel


class InstanceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$",
        description="A name you recognise: letters, digits, space, dot, dash, underscore",
    )
    size: str = Field(
        min_length=1, max_length=32, description="One of the sizes the operator offers"
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

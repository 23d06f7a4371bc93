from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class BootstrapIn(BaseModel):
    """Which machine is asking: without a proof that verifies, the token is refused.

    The bounds are generous for what a machine sends (an EC2 document is under 1 KiB, its
    signature under 400 characters) and keep any over-long body within the API's body limit,
    so it gets a 422."""

    model_config = ConfigDict(extra="forbid")

    identity_document: str | None = Field(
        default=None,
        max_length=2048,
        description="On EC2 the instance identity document as IMDS gives it, byte for byte;"
        " for a local desktop the document its backend wrote into the sandbox",
    )
    identity_signature: str | None = Field(
        default=None,
        max_length=1024,
        description="The document's base64 signature (IMDS's instance-identity/signature)",
    )


class BootstrapOut(BaseModel):
    instance_id: uuid.UUID
    credential: str = Field(description="The instance credential for heartbeats; shown once")
    agent_token: str = Field(description="What the agent requires from the gateway")
    config: dict[str, Any] = Field(description="The CloudBot configuration, provider keys included")
    heartbeat_url: str
    heartbeat_interval_seconds: int


def _iso_text(value: object) -> object:
    # A number is not a time here (pydantic would read it as a Unix timestamp).
    if isinstance(value, str | datetime):
        return value
    raise ValueError("expected an ISO 8601 date-time string")


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_text)]


class HeartbeatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Strict: `0` or "yes" is not a health report.
    desktop: bool = Field(strict=True, description="The desktop's VNC server answers")
    agent: bool = Field(strict=True, description="The CloudBot agent answers")
    working: bool | None = Field(
        default=None,
        strict=True,
        description="The agent is working on a task now (holds off idle stop)",
    )
    last_active_at: IsoDateTime | None = Field(
        default=None,
        description="When the agent last worked on a task or the desktop last saw input",
    )

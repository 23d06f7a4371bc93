from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AuditEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime = Field(validation_alias="created_at")
    action: str = Field(description="What was done, e.g. `auth.login` or `instance.command`")
    actor: str = Field(
        description="Who did it: `session:<login session id>`, `token:<token id>`, "
        "`system`, or `anonymous` (e.g. a failed login)"
    )
    target: str | None = Field(description="What it was done to, e.g. `instance:<id>`")
    address: str | None = Field(description="The client's address")
    user_agent: str | None
    request_id: str | None
    details: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    next_before: int | None = Field(
        description="Pass as `before` for the next (older) page; null on the last page"
    )

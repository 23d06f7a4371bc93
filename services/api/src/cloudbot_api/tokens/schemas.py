from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Scope = Literal["read", "write"]


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._@:-]*$",
        description="What the token is for: letters, digits, space and . _ @ : -",
    )
    scope: Scope = Field(
        default="write",
        description="`read`: GET requests only; `write`: everything a login may do on "
        "instances, keys and webhooks (never the account or token routes)",
    )
    expires_in_days: int | None = Field(
        default=None, ge=1, le=3650, description="Days until it stops working; null: never"
    )


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    scope: Scope
    hint: str = Field(description="The token's start and end, to tell tokens apart")
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself. Shown this once; store it now.")


class TokenList(BaseModel):
    items: list[TokenOut]

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cloudbot_common.providers import Provider

KEY_MAX = 512


def _clean_key(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("the key is empty")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("the key must not contain spaces or control characters")
    return value


SecretKey = Annotated[
    str, Field(min_length=1, max_length=KEY_MAX, repr=False), AfterValidator(_clean_key)
]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: Provider
    key: SecretKey


class ApiKeyReplace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: SecretKey


class ApiKeyOut(BaseModel):
    """What is shown of a stored key: never the key itself."""

    model_config = ConfigDict(from_attributes=True)

    provider: Provider
    hint: str = Field(description="A masked hint, e.g. `sk-…a1b2`")
    created_at: datetime
    updated_at: datetime

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from cloudbot_common.providers import Provider

KEY_MAX = 512


# Provider keys are printable ASCII without spaces; the schema says so, so that clients
# can check a key before sending it.
KEY_PATTERN = r"^[!-~]+$"

SecretKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=KEY_MAX,
        pattern=KEY_PATTERN,
        repr=False,
        description="The provider's API key: printable ASCII, no spaces",
    ),
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

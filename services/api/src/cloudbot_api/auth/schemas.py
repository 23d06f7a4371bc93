from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field

PASSWORD_MIN = 12
# Long passphrases are welcome and hashed whole; the cap only bounds the work per request.
PASSWORD_MAX = 1024


def _normalise_email(value: str) -> str:
    return value.strip().lower()


Email = Annotated[EmailStr, AfterValidator(_normalise_email)]


class SignupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email = Field(max_length=320)
    password: str = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX, repr=False)


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email = Field(max_length=320)
    password: str = Field(min_length=1, max_length=PASSWORD_MAX, repr=False)


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: str = Field(min_length=1, max_length=4096, repr=False)


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105
    expires_in: int = Field(description="Seconds until the access token expires")
    refresh_expires_in: int


class AccessToken(BaseModel):
    """The browser's answer: the refresh token went into an HttpOnly cookie instead."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105
    expires_in: int = Field(description="Seconds until the access token expires")

    @classmethod
    def of(cls, pair: TokenPair) -> AccessToken:
        return cls(access_token=pair.access_token, expires_in=pair.expires_in)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    created_at: datetime

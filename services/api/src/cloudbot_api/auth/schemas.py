from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

PASSWORD_MIN = 12
# Long passphrases are welcome and hashed whole; the cap only bounds the work per request.
PASSWORD_MAX = 1024


# What an address must look like, stated in the document as a pattern so that what a
# client can check is exactly what is enforced: dot-separated ASCII local part, a host name
# with a letters-only top-level domain.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL_PATTERN = rf"^[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@(?:{_LABEL}\.)+[A-Za-z]{{2,63}}$"


def _normalise_email(value: str) -> str:
    return value.lower()


Email = Annotated[
    str,
    Field(max_length=254, pattern=EMAIL_PATTERN, examples=["ada@example.com"]),
    AfterValidator(_normalise_email),
]
# At login any string may be tried: an address that cannot exist is simply not found.
LoginEmail = Annotated[str, Field(min_length=1, max_length=320), AfterValidator(_normalise_email)]


class SignupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email
    password: str = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX, repr=False)


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: LoginEmail
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

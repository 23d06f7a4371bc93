"""Accounts made through the API itself, as a person would."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass

import httpx

from tests.support.leaks import SECRETS, SecretRegistry


@dataclass
class User:
    email: str
    password: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def make_user(http: httpx.AsyncClient, registry: SecretRegistry | None = None) -> User:
    """Sign up and log in a new user; its password and tokens join the registry."""
    email = f"user-{uuid.uuid4().hex[:12]}@example.com"
    password = "correct horse battery " + secrets.token_urlsafe(12)
    r = await http.post("/api/auth/signup", json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    r = await http.post("/api/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    tokens = r.json()
    user = User(email, password, tokens["access_token"], tokens["refresh_token"])
    (registry or SECRETS).add(password, user.access_token, user.refresh_token)
    return user


async def user_id(http: httpx.AsyncClient, user: User) -> uuid.UUID:
    """The user's id, as the API reports it."""
    return uuid.UUID((await http.get("/api/auth/me", headers=user.headers)).json()["id"])


async def whoami(http: httpx.AsyncClient, token: str) -> httpx.Response:
    """GET /api/auth/me with `token` as the bearer."""
    return await http.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})

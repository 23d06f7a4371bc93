"""The audit log: one row per security-relevant action, written in the transaction of the
action itself (so it is there exactly when the action is), by the API, the gateway and
the provisioner alike. Details are names and ids, never a secret."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.models import AuditEvent


class Action(StrEnum):
    SIGNUP = "auth.signup"
    LOGIN = "auth.login"
    LOGIN_FAILED = "auth.login_failed"
    LOGOUT = "auth.logout"
    REFRESH_REUSED = "auth.refresh_reused"
    API_KEY_ADDED = "api_key.added"
    API_KEY_REPLACED = "api_key.replaced"
    API_KEY_REMOVED = "api_key.removed"
    TOKEN_CREATED = "token.created"  # noqa: S105 (an action name)
    TOKEN_REVOKED = "token.revoked"  # noqa: S105 (an action name)
    WEBHOOK_CREATED = "webhook.created"
    WEBHOOK_DELETED = "webhook.deleted"
    INSTANCE_COMMAND = "instance.command"
    SESSION_OPENED = "gateway.session_opened"
    SESSION_CLOSED = "gateway.session_closed"


SYSTEM = "system"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request came from."""

    address: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


def record(
    session: AsyncSession,
    action: Action,
    *,
    user_id: uuid.UUID | None,
    actor: str,
    origin: Origin,
    target: str | None = None,
    **details: Any,
) -> None:
    """Stage an audit row in the caller's transaction."""
    session.add(
        AuditEvent(
            user_id=user_id,
            actor=actor[:64],
            action=action.value,
            target=target,
            address=origin.address,
            user_agent=(origin.user_agent or None) and origin.user_agent[:512],
            request_id=origin.request_id,
            details=details,
        )
    )

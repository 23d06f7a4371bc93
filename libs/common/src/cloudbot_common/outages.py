"""Telling a peer that is away (Postgres or Redis stalled, dead, restarting) from a bug,
so callers can answer 503 and try again later instead of reporting an internal error."""

from __future__ import annotations

from redis.exceptions import RedisError
from sqlalchemy import exc as sa

# Postgres SQLSTATEs of a server going away or cancelling a statement: admin shutdown,
# crash shutdown, cannot connect now, query cancelled (statement_timeout).
_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "57014"}

# What the drivers raise for a peer that does not answer or hangs up: timeouts of our
# own bounds, refused and reset connections, a pool with no connection to give.
PEER_ERRORS: tuple[type[Exception], ...] = (
    RedisError,
    TimeoutError,
    ConnectionError,
    sa.TimeoutError,
    sa.OperationalError,
    sa.InterfaceError,
)


def is_peer_outage(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) says a peer is away, not that we erred."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, PEER_ERRORS):
            return True
        if isinstance(current, sa.DBAPIError) and (
            current.connection_invalidated
            or getattr(current.orig, "sqlstate", None) in _UNAVAILABLE_SQLSTATES
        ):
            return True
        current = current.__cause__ or current.__context__
    return False

"""Keyset pages, newest first: repositories fetch `limit + 1` rows older than a cursor (an
id); the extra row only tells whether there is a next page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Protocol, TypeVar

from fastapi import Query

# Ids are Postgres bigints: a larger cursor is refused as a 422, not sent to the database.
MAX_ID = 2**63 - 1

Before = Annotated[
    int | None, Query(ge=1, le=MAX_ID, description="Only entries older than this id")
]
Limit = Annotated[int, Query(ge=1, le=200, description="At most this many entries")]


class _HasId(Protocol):
    id: int


T = TypeVar("T", bound=_HasId)


def page(rows: Sequence[T], limit: int) -> tuple[list[T], int | None]:
    """The page's rows and the cursor (`before`) of the next page, None on the last."""
    shown = list(rows[:limit])
    return shown, shown[-1].id if len(rows) > limit and shown else None

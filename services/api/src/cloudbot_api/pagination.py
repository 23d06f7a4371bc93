"""Keyset pages, newest first: repositories fetch `limit + 1` rows older than a cursor (an
id); the extra row only tells whether there is a next page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class _HasId(Protocol):
    id: int


T = TypeVar("T", bound=_HasId)


def page(rows: Sequence[T], limit: int) -> tuple[list[T], int | None]:
    """The page's rows and the cursor (`before`) of the next page, None on the last."""
    shown = list(rows[:limit])
    return shown, shown[-1].id if len(rows) > limit and shown else None

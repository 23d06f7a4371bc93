"""What every domain's repository shares: the unit of work's session, and adding rows; and,
for requests that only read, statements on the read engine without a session."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy import Executable, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from cloudbot_common.models import Base


class Repository:
    """All SQL of a domain lives in its subclass; repositories flush, never commit."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, row: Base) -> None:
        self.session.add(row)
        await self.session.flush()

    async def add_unless_taken(self, row: Base) -> bool:
        """Add `row`, or return False if a unique constraint says it exists already (a
        concurrent request may have won the race); the transaction stays usable."""
        try:
            async with self.session.begin_nested():
                self.session.add(row)
        except IntegrityError:
            return False
        return True

    async def save(self, row: Base) -> None:
        """Write changes made to `row` and read back what the database set (timestamps)."""
        await self.session.flush()
        await self.session.refresh(row)


# Where read-only requests get a connection: the read engine's `connect` (autocommit
# connections, a pool of their own); the fast tests put their transaction's here.
ReadConnections = Callable[[], AbstractAsyncContextManager[AsyncConnection]]


class ReadRepository:
    """The reads of a domain that serve read-only requests: Core statements on the read
    engine (autocommit connections), a pooled connection per statement and no ORM session.

    A row through the ORM session costs several times the query itself (the session, the
    identity map, the unit of work's commit); these answer with plain rows, whose columns
    read as attributes. Nothing here writes."""

    def __init__(self, connect: ReadConnections) -> None:
        self.connect = connect

    async def first(self, statement: Executable) -> Row[Any] | None:
        async with self.connect() as conn:
            return (await conn.execute(statement)).first()

    async def all(self, statement: Executable) -> Sequence[Row[Any]]:
        async with self.connect() as conn:
            return (await conn.execute(statement)).all()

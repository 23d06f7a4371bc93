"""What every domain's repository shares: the unit of work's session, and adding rows; and,
for requests that only read, statements on the read engine without a session."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from asyncpg import Record
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

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

_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class Query:
    """A Core statement compiled once, at import, for the driver itself: its SQL (with $n
    parameters), its parameters' names in order and the values bound at compile time."""

    sql: str
    names: tuple[str, ...]
    bound: dict[str, Any]

    @classmethod
    def of(cls, statement: ClauseElement) -> Query:
        compiled = statement.compile(dialect=_DIALECT)
        assert isinstance(compiled, SQLCompiler)
        return cls(str(compiled), tuple(compiled.positiontup or ()), dict(compiled.params))

    def args(self, values: dict[str, Any]) -> list[Any]:
        merged = {**self.bound, **values}
        return [merged[name] for name in self.names]


class Fields:
    """A row from the driver, its columns read as attributes (as an ORM object's are)."""

    __slots__ = ("_record",)

    def __init__(self, record: Record) -> None:
        self._record = record

    def __getattr__(self, name: str) -> Any:
        try:
            return self._record[name]
        except KeyError:
            raise AttributeError(name) from None


class ReadRepository:
    """The reads of a domain that serve read-only requests: statements written with Core
    and compiled once (`Query`), run by the driver (asyncpg) itself on a connection of the
    read engine (autocommit), one checkout per statement, with no ORM session.

    Measured per request in the API process: the ORM session's read cost about 400 us of
    CPU more than this, and the same statement executed through Core about 300 us more
    (its execution context, result processing and greenlet hops). Nothing here writes."""

    def __init__(self, connect: ReadConnections) -> None:
        self.connect = connect

    async def first(self, query: Query, **values: Any) -> Fields | None:
        async with self.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            record = await driver.fetchrow(query.sql, *query.args(values))
        return None if record is None else Fields(record)

    async def all(self, query: Query, **values: Any) -> list[Fields]:
        async with self.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            records = await driver.fetch(query.sql, *query.args(values))
        return [Fields(record) for record in records]

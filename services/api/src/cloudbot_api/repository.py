"""What every domain's repository shares: the unit of work's session, and adding rows."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

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

"""The request's unit of work: one transaction, committed before the response is sent, and
work that must only happen once the commit succeeded (publishing commands and events)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.logging import get_logger

log = get_logger(__name__)
AfterCommit = Callable[[], Awaitable[None]]


class UnitOfWork:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._after_commit: list[tuple[AfterCommit, bool]] = []
        self._keep_on_error = False

    def after_commit(self, action: AfterCommit, *, required: bool = False) -> None:
        """Run `action` once the transaction has committed. Its failure is logged, not
        raised: what it does must be recoverable from what was committed (the outbox).
        A `required` action's failure is raised instead, replacing the answer (the action
        raises the ProblemError to answer with): for work the caller must not be told is
        done when it is not."""
        self._after_commit.append((action, required))

    def keep_on_error(self) -> None:
        """Commit what was written so far even if the request then fails: for a change
        that must stick although the answer is an error."""
        self._keep_on_error = True

    async def commit(self) -> None:
        await self.session.commit()
        await self._run_after_commit()

    async def _run_after_commit(self) -> None:
        actions, self._after_commit = self._after_commit, []
        failure: Exception | None = None
        for action, required in actions:
            try:
                await action()
            except Exception as exc:
                if required:
                    failure = failure or exc
                else:
                    log.warning("after-commit action failed; it will be retried", exc_info=True)
        if failure is not None:
            raise failure

    async def fail(self) -> None:
        """The request failed: roll back, unless the service asked to keep its changes.
        (Then a required after-commit action that fails replaces the request's error.)"""
        if self._keep_on_error:
            try:
                await self.session.commit()
            except Exception:
                log.warning("could not keep the failed request's changes", exc_info=True)
            else:
                await self._run_after_commit()
                return
        self._after_commit = []
        await self.session.rollback()

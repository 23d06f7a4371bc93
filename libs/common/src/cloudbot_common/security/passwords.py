"""argon2id password hashing, run off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from cloudbot_common.settings import Settings

# Niceness of the hashing threads: with logins flat out they would otherwise share the CPUs
# evenly with the event loop's thread, and every other request would wait its turn behind
# them; at 10 the kernel gives the loop the CPU whenever it wants it, and the hashes
# everything left over.
HASHING_NICENESS = 10


def _yield_to_the_loop() -> None:
    with contextlib.suppress(OSError):
        # On Linux a thread's own niceness (PRIO_PROCESS with a thread id); lowering one's
        # priority needs no privilege.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)


class Passwords:
    """Hashes and verifies passwords in a thread pool of one thread per CPU by default.

    argon2-cffi releases the GIL while hashing, so the pool keeps the event loop free while
    logins use every core; its size bounds how many hashes run at once, and so their
    memory (ARGON2_MEMORY_COST_KIB each).
    """

    def __init__(self, settings: Settings, *, threads: int | None = None) -> None:
        threads = threads or len(os.sched_getaffinity(0))
        self._hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_cost_kib,
            parallelism=settings.argon2_parallelism,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="argon2", initializer=_yield_to_the_loop
        )
        # Verified against when the account does not exist, so that an unknown email costs
        # the same time as a wrong password.
        self._dummy_hash = self._hasher.hash("not-a-real-password-but-same-cost")

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool,
            self._verify_sync,
            password_hash or self._dummy_hash,
            password,
            password_hash is not None,
        )

    def _verify_sync(self, password_hash: str, password: str, real: bool) -> bool:
        try:
            ok = self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return ok and real

    def needs_rehash(self, password_hash: str) -> bool:
        return self._hasher.check_needs_rehash(password_hash)

    def close(self) -> None:
        self._pool.shutdown(wait=False)

"""The anchor for login throughput: argon2id verifications per second with the API's
parameters (ARGON2_* settings), one thread per CPU at the niceness of the API's password
pool (on a machine shared with other work, niceness decides what share hashing gets).

    python -m bench.argon2_raw SECONDS     prints the rate
"""

from __future__ import annotations

import os
import sys
import threading
import time

from argon2 import PasswordHasher

from cloudbot_common.security.passwords import HASHING_NICENESS
from cloudbot_common.settings import Settings


def main() -> None:
    seconds = float(sys.argv[1])
    settings = Settings()
    hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_cost=settings.argon2_memory_cost_kib,
        parallelism=settings.argon2_parallelism,
    )
    stored = hasher.hash("correct horse battery staple")
    done = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def work() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)
        n = 0
        while time.perf_counter() < deadline:
            hasher.verify(stored, "correct horse battery staple")
            n += 1
        with lock:
            done[0] += n

    started = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in os.sched_getaffinity(0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(done[0] / (time.perf_counter() - started))


if __name__ == "__main__":
    main()

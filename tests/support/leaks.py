"""Secrets the tests handle, and the scan run over every log the test session wrote."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKEN_SHAPES = re.compile(
    rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}|\bcb[a-z]_[A-Za-z0-9_-]{20,}"
)


@dataclass
class SecretRegistry:
    """Every secret a test handles; none may appear in any log of the run."""

    values: set[str] = field(default_factory=set)

    def add(self, *values: str) -> None:
        self.values.update(v for v in values if v and len(v) >= 8)


SECRETS = SecretRegistry()
# Names of settings and arguments that hold secrets.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ENCRYPTION_KEY|ACCESS_KEY|CREDENTIAL", re.I)


def fake_key(prefix: str = "sk-ant-") -> str:
    """A provider API key of the right shape, registered as a secret."""
    key = prefix + secrets.token_urlsafe(32)
    SECRETS.add(key)
    return key


def find_leaks(log_dir: Path, values: Iterable[str]) -> list[str]:
    """Each log file holding a registered secret, or text shaped like one of our tokens."""
    needles = [s.encode() for s in values if s]
    leaks: set[str] = set()
    for path in sorted(log_dir.glob("*.log")):
        data = path.read_bytes()
        if any(n in data for n in needles):
            leaks.add(f"{path.name}: a registered secret")
        if TOKEN_SHAPES.search(data):
            leaks.add(f"{path.name}: token-shaped text")
    return sorted(leaks)


def redis_leaks(redis: Any, secrets: Iterable[str]) -> list[str]:
    """Each Redis key whose value holds a registered secret or text shaped like one of
    our tokens; the queued tasks' messages, arguments included, are values too."""
    needles = [s.encode() for s in secrets if s]
    leaks = []
    for key in redis.scan_iter(count=500):
        kind = redis.type(key)
        if kind == b"string":
            values = [redis.get(key)]
        elif kind == b"list":
            values = redis.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [v for pair in redis.hgetall(key).items() for v in pair]
        elif kind == b"set":
            values = list(redis.smembers(key))
        elif kind == b"zset":
            values = redis.zrange(key, 0, -1)
        else:
            values = [repr(redis.xrange(key)).encode()] if kind == b"stream" else []
        data = b"\n".join([key, *(v for v in values if isinstance(v, bytes))])
        if any(n in data for n in needles) or TOKEN_SHAPES.search(data):
            leaks.append(key.decode(errors="replace"))
    return sorted(leaks)

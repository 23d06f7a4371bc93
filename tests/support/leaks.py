"""The scan run over every log the test session wrote."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

TOKEN_SHAPES = re.compile(
    rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}|\bcb[a-z]_[A-Za-z0-9_-]{20,}"
)


def find_leaks(log_dir: Path, secrets: Iterable[str]) -> list[str]:
    """Each log file holding a registered secret, or text shaped like one of our tokens."""
    needles = [s.encode() for s in secrets if s]
    leaks: set[str] = set()
    for path in sorted(log_dir.glob("*.log")):
        data = path.read_bytes()
        if any(n in data for n in needles):
            leaks.add(f"{path.name}: a registered secret")
        if TOKEN_SHAPES.search(data):
            leaks.add(f"{path.name}: token-shaped text")
    return sorted(leaks)

"""Fixtures for the operations tests: the stack as `make dev` runs it, on a private
database and Redis db (`private_env`, in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dev_stack import Stack, run_stack


@pytest.fixture(scope="module")
def stack(private_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack exactly as `make dev` runs it, on the module's private database and Redis
    db (a module may override `private_env` for what `make dev` itself sets)."""
    yield from run_stack(private_env, tmp_path_factory.mktemp("stack"))

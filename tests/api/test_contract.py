"""The API against its own OpenAPI document: schemathesis (every check; the examples,
coverage, fuzzing and stateful phases) on the live service, authenticated as a user and as
an instance, following the document's links from a created instance to its operations.
It must find nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from cloudbot_common.instance_contract import BOOTSTRAP_PREFIX, CREDENTIAL_PREFIX
from cloudbot_common.security.opaque import new_token, token_digest
from tests.support.api import api_process
from tests.support.harness import (
    AWS_ENV,
    FAST_RETRIES,
    moto_network,
    moto_server,
    provisioner,
    redis_server,
)
from tests.support.processes import LOG_DIR

CONFIG = Path(__file__).with_name("schemathesis.toml")
ST = Path(sys.executable).with_name("st")
# A bounded share of CI: the fuzzing and stateful phases repeat until the budget is spent.
MAX_SECONDS = int(os.environ.get("CONTRACT_MAX_SECONDS", "120"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def contract_api(
    base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The API with a real provisioner driving EC2 (a moto server), so that the instances
    the run creates move through their states. Rate limits are off: the run logs in again
    after every logout, and a 429 would hide what a request was about (rate limits and the
    quota have their own tests)."""
    with moto_server() as moto_url, redis_server() as broker:
        env = {
            **base_env,
            **AWS_ENV,
            **FAST_RETRIES,
            "CELERY_BROKER_URL": broker.url,
            "LOCAL_DEV_MODE": "false",
            "AWS_ENDPOINT_URL": moto_url,
            **moto_network(moto_url),
            "RATE_LIMIT_ENABLED": "false",
            # Room for every instance the run creates, so that the stateful phase meets
            # the instances it made rather than the quota.
            "MAX_LIVE_INSTANCES_PER_USER": "100000",
            "LOG_LEVEL": "WARNING",
        }
        with api_process(env, "api-contract") as url:
            state_dir = tmp_path_factory.mktemp("contract")
            with provisioner({**env, "PUBLIC_API_URL": url}, state_dir, name="contract-worker"):
                yield url


def _signup(client: httpx.Client) -> tuple[str, str, str]:
    email = f"contract-{secrets.token_hex(6)}@example.com"
    password = "contract " + secrets.token_urlsafe(16)
    r = client.post("/api/auth/signup", json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    return email, password, r.json()["id"]


@contextlib.contextmanager
def _machine_tokens(owner: str, database_url: str) -> Iterator[tuple[str, str]]:
    """A bootstrap token and an instance credential of two instances of `owner` (another
    account than the run's), stored as the provisioner and bootstrap store them, so that
    the instance-facing operations are exercised too (bootstrap replaces its instance's
    credential, hence two). No command is queued for them and the worker drives EC2 only:
    nothing touches them during the run, and they end with it (a stack of local desktops
    on this database would otherwise take them up later)."""
    bootstrap, credential = new_token(BOOTSTRAP_PREFIX), new_token(CREDENTIAL_PREFIX)
    ids = [uuid.uuid4(), uuid.uuid4()]
    dsn = database_url.replace("+asyncpg", "")

    async def store() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for instance_id, name, column, token in (
                (ids[0], "contract-boot", "bootstrap_token_hash", bootstrap),
                (ids[1], "contract-beat", "credential_hash", credential),
            ):
                await conn.execute(
                    "INSERT INTO instances (id, owner_id, name, size, instance_type, backend,"
                    f" state, {column}, bootstrap_expires_at)"
                    " VALUES ($1, $2, $3, 'small', 't3.small', 'local', 'provisioning', $4,"
                    " now() + interval '1 hour')",
                    instance_id,
                    uuid.UUID(owner),
                    name,
                    token_digest(token),
                )
        finally:
            await conn.close()

    async def end() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "UPDATE instances SET state = 'terminated', bootstrap_token_hash = NULL,"
                " bootstrap_expires_at = NULL, credential_hash = NULL WHERE id = ANY($1)",
                ids,
            )
        finally:
            await conn.close()

    asyncio.run(store())
    try:
        yield bootstrap, credential
    finally:
        asyncio.run(end())


def test_schemathesis_finds_nothing(contract_api: str, database_url: str) -> None:
    with httpx.Client(base_url=contract_api, timeout=15) as client:
        email, password, _ = _signup(client)
        _, _, other = _signup(client)
    with _machine_tokens(other, database_url) as (bootstrap, credential):
        LOG_DIR.mkdir(exist_ok=True)
        argv = [
            str(ST),
            "--config-file",
            str(CONFIG),
            "--no-color",
            "run",
            f"{contract_api}/openapi.json",
            "--checks",
            "all",
            # Every check but one: DELETE /api/instances/{id} is asynchronous by contract (202:
            # the machine is being terminated) and the instance stays readable, with its state
            # and event stream, until it is terminated, as EC2, GCE and Kubernetes objects do.
            # `use_after_free` expects a 404 right after any 2xx DELETE.
            "--exclude-checks",
            "use_after_free",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-time",
            str(MAX_SECONDS),
            "--generation-database",
            "none",
        ]
        result = subprocess.run(
            argv,
            env={
                **os.environ,
                "ST_EMAIL": email,
                "ST_PASSWORD": password,
                "ST_BOOTSTRAP_TOKEN": bootstrap,
                "ST_INSTANCE_CREDENTIAL": credential,
            },
            capture_output=True,
            text=True,
            timeout=MAX_SECONDS + 240,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-20000:]
        # The run really tested: every phase ran (warnings, such as an operation that only
        # ever answered 401, fail the run by the config).
        assert "Tested: " in output, output[-5000:]
        for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
            assert f"✅ {phase}" in output, output[-5000:]

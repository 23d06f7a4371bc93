"""LOCAL_DEV_MODE through the whole stack: the API, a real worker and a real local desktop
(Xvfb, x11vnc, a terminal, the agent). Create, reach running, a real RFB greeting, stop,
start, delete, and nothing left running."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.api import api_process
from tests.support.harness import (
    FAST_RETRIES,
    RFB,
    Db,
    instance_key,
    kill_local_machines,
    machine_group,
    port_closed,
    processes_of,
    provisioner,
    rfb_greeting,
    wait_api_state,
)
from tests.support.users import make_user

pytestmark = pytest.mark.vnc


@pytest.fixture
async def store(database_url, broker_url) -> AsyncIterator[Db]:
    database = Db(database_url, broker_url)
    yield database
    await database.close()


@pytest.fixture
def local_env(base_env, broker_url, tmp_path) -> Iterator[dict[str, str]]:
    yield {
        **base_env,
        **FAST_RETRIES,
        "CELERY_BROKER_URL": broker_url,
        "LOCAL_DEV_MODE": "true",
        "LOCAL_STATE_DIR": str(tmp_path / "instances"),
        "LOCAL_PORT_RANGE_START": str(30000 + secrets.randbelow(20000)),
    }
    kill_local_machines(tmp_path / "instances")


@pytest.fixture
def api_url(local_env, tmp_path) -> Iterator[str]:
    with api_process(local_env, "api-local") as url:
        worker_env = {**local_env, "PUBLIC_API_URL": url}
        with provisioner(worker_env, tmp_path, name="e2e-local-worker"):
            yield url


async def test_local_desktop_through_the_api(client, local_env, store):
    user = await make_user(client)
    r = await client.post(
        "/api/instances", json={"name": "sandbox", "size": "small"}, headers=user.headers
    )
    assert r.status_code == 202, r.text
    instance_id = r.json()["id"]
    await wait_api_state(client, user.headers, instance_id, "running")

    row = await store.instance(uuid.UUID(instance_id))
    directory = Path(local_env["LOCAL_STATE_DIR"]) / instance_id
    group = machine_group(directory)
    assert row.host == "127.0.0.1"
    assert RFB.fullmatch(await rfb_greeting(row.vnc_port, instance_key(instance_id)))

    r = await client.post(f"/api/instances/{instance_id}/stop", headers=user.headers)
    assert r.status_code == 202, r.text
    await wait_api_state(client, user.headers, instance_id, "stopped")
    assert await port_closed(row.vnc_port)
    assert processes_of(directory, group) == []

    r = await client.post(f"/api/instances/{instance_id}/start", headers=user.headers)
    assert r.status_code == 202, r.text
    await wait_api_state(client, user.headers, instance_id, "running")
    assert RFB.fullmatch(await rfb_greeting(row.vnc_port, instance_key(instance_id)))
    group = machine_group(directory)

    r = await client.delete(f"/api/instances/{instance_id}", headers=user.headers)
    assert r.status_code == 202, r.text
    await wait_api_state(client, user.headers, instance_id, "terminated")
    assert processes_of(directory, group) == []
    assert await port_closed(row.vnc_port)
    assert await port_closed(row.agent_port)
    assert not directory.exists()

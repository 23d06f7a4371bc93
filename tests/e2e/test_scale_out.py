"""Scale out on one machine, as processes the way they would run on several: two API
processes, two gateways, two workers and one beat against one Postgres and one Redis, with
local desktops. Many users' flows run through all of them at once; one of each is killed
mid-flow and brought back only as a supervisor would.

- Requests go on through the other API (a balancer skips the dead one); provisioning goes
  on through the other worker; the beat comes back.
- Browsers on the killed gateway see their connection end at once and reconnect through
  the other with a fresh ticket; a gateway stopped by its supervisor (SIGTERM) closes its
  sessions cleanly (1012, service restart) and they move over the same way.
- A stop or a logout sent to one API replica closes the sessions on either gateway.
- Tickets and rate limits hold across API replicas: a ticket from one API works once on
  any gateway; a limit counts the requests of every replica.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin, Subprotocol

from tests.support.flow import (
    Account,
    Replicas,
    framebuffer_update,
    open_channel,
    sign_up,
    talk_to_agent,
)
from tests.support.leaks import SECRETS
from tests.support.processes import leftovers
from tests.support.supervisor import Service, Supervisor, local_desktops, url_of

pytestmark = [pytest.mark.slow, pytest.mark.vnc]

USERS = 6
# A database and Redis db of the cluster's own: its reconciler must not take up other
# tests' instances (and its desktops would then be left over), nor its workers theirs.
REDIS_SLOT = "scale"
SETTLE = 120.0
SIGNUPS_PER_MINUTE = 4


@pytest.fixture(scope="module")
def cluster(private_env: dict[str, str], tmp_path_factory) -> Iterator[Supervisor]:
    state = tmp_path_factory.mktemp("scale")
    env = local_desktops(private_env, state, RATE_LIMIT_SIGNUP=f"{SIGNUPS_PER_MINUTE}/minute")
    supervisor = Supervisor(env, state)
    api_1, api_2 = supervisor.api("api-1"), supervisor.api("api-2")
    # Desktops call back whichever API; a balancer would sit in front of both.
    supervisor.env["PUBLIC_API_URL"] = url_of(api_2)
    gateways = [supervisor.gateway("gateway-1"), supervisor.gateway("gateway-2")]
    for api in (api_1, api_2):
        api.env["PUBLIC_GATEWAY_URL"] = ws_url(gateways[0])
    supervisor.worker("worker-1")
    supervisor.worker("worker-2")
    supervisor.beat()
    with supervisor.running():
        yield supervisor


def ws_url(service: Service) -> str:
    return f"ws://127.0.0.1:{service.env['GATEWAY_PORT']}"


def replicas_of(cluster: Supervisor) -> Replicas:
    return Replicas(
        [url_of(cluster["api-1"]), url_of(cluster["api-2"])],
        [ws_url(cluster["gateway-1"]), ws_url(cluster["gateway-2"])],
        origin=cluster.env["ALLOWED_WS_ORIGINS"],
    )


async def closed_within(ws: ClientConnection, seconds: float) -> int | None:
    """Wait for the gateway to end the session; returns its close code (None: no frame)."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    except TimeoutError:
        raise AssertionError(f"the session was still open after {seconds} s") from None


async def desktop(account: Account, gateway: str | None = None) -> tuple[ClientConnection, str]:
    ws, via = await open_channel(account, "vnc", SECRETS.add, gateway)
    await framebuffer_update(ws)
    return ws, via


async def create(account: Account) -> None:
    body = await account.client.expect(
        202, "POST", "/api/instances", json={"name": "scale", "size": "small"}
    )
    account.instance_id = str(body["id"])


async def test_losing_one_of_each_mid_flow(cluster: Supervisor) -> None:
    replicas = replicas_of(cluster)
    async with httpx.AsyncClient(timeout=30) as http:
        accounts = []
        for _ in range(USERS):
            http.headers["X-Forwarded-For"] = f"10.88.{secrets.randbelow(250)}.1"
            accounts.append(await sign_up(replicas, http, SECRETS.add))
        http.headers.pop("X-Forwarded-For")

        # Creates through both APIs; while they provision, one API, one worker and the
        # beat are killed. The balancer marks the dead API down; the supervisor restarts all.
        await asyncio.gather(*(create(a) for a in accounts))
        for name in ("api-1", "worker-1", "beat"):
            cluster[name].kill()
        replicas.down.add(url_of(cluster["api-1"]))
        more = await asyncio.gather(*(a.client.request("GET", "/api/instances") for a in accounts))
        assert [r.status_code for r in more] == [200] * USERS
        await asyncio.sleep(1)
        for name in ("api-1", "worker-1", "beat"):
            await asyncio.to_thread(cluster[name].restart)
        replicas.down.clear()
        await asyncio.gather(
            *(a.client.wait_state(a.instance_id, "running", SETTLE) for a in accounts)  # type: ignore[arg-type]
        )

        # Desktops open on both gateways (tickets from either API); one gateway dies.
        sessions = await asyncio.gather(*(desktop(a) for a in accounts))
        doomed = ws_url(cluster["gateway-1"])
        on_doomed = [i for i, (_, via) in enumerate(sessions) if via == doomed]
        assert 0 < len(on_doomed) < USERS
        cluster["gateway-1"].kill()
        replicas.down.add(doomed)
        for i in on_doomed:
            await closed_within(sessions[i][0], 5)
            ws, via = await desktop(accounts[i])  # the browser reconnects: the other one
            assert via != doomed
            sessions[i] = (ws, via)
        await asyncio.to_thread(cluster["gateway-1"].restart)
        replicas.down.clear()

        # The other gateway is stopped by its supervisor: a clean close, then over again.
        stopping = ws_url(cluster["gateway-2"])
        moving = [i for i, (_, via) in enumerate(sessions) if via == stopping]
        assert moving == list(range(USERS))
        replicas.down.add(stopping)
        stopper = asyncio.create_task(asyncio.to_thread(cluster["gateway-2"].proc.stop))  # type: ignore[union-attr]
        codes = await asyncio.gather(*(closed_within(sessions[i][0], 10) for i in moving))
        assert set(codes) == {1012}, codes  # service restart: come back shortly
        await stopper
        for i in moving:
            sessions[i] = await desktop(accounts[i])
        await asyncio.to_thread(cluster["gateway-2"].restart)
        replicas.down.clear()

        # Agents answer through either gateway.
        for a in accounts:
            ws, _ = await open_channel(a, "cloudbot", SECRETS.add)
            async with ws:
                await talk_to_agent(ws, "still there?")

        # A stop sent to api-2 closes a desktop on gateway-1, and a logout sent to api-1
        # one on gateway-2.
        stopped, leaving = accounts[0], accounts[1]
        ws_stop, _ = await desktop(stopped, ws_url(cluster["gateway-1"]))
        ws_logout, _ = await desktop(leaving, ws_url(cluster["gateway-2"]))
        await stopped.client.http.post(
            f"{url_of(cluster['api-2'])}/api/instances/{stopped.instance_id}/stop",
            headers=stopped.client.headers,
        )
        await closed_within(ws_stop, 10)
        r = await leaving.client.http.post(
            f"{url_of(cluster['api-1'])}/api/auth/logout", headers=leaving.client.headers
        )
        assert r.status_code == 204, r.text
        await closed_within(ws_logout, 10)
        for ws, _ in sessions:
            await ws.close()
        # Logged out means logged out: the user logs in again to clean up.
        tokens = await leaving.client.expect(
            200,
            "POST",
            "/api/auth/login",
            json={"email": leaving.email, "password": leaving.password},
        )
        SECRETS.add(tokens["access_token"], tokens["refresh_token"])
        leaving.client.headers["Authorization"] = f"Bearer {tokens['access_token']}"

        # Every accepted command is carried out: everything stops, then ends.
        for a in accounts[1:]:
            await a.client.expect(202, "POST", f"/api/instances/{a.instance_id}/stop")
        for a in accounts:
            await a.client.wait_state(a.instance_id, "stopped", SETTLE)  # type: ignore[arg-type]
            await a.client.expect(202, "DELETE", f"/api/instances/{a.instance_id}")
            await a.client.wait_state(a.instance_id, "terminated", SETTLE)  # type: ignore[arg-type]
    assert leftovers(Path(cluster.env["LOCAL_STATE_DIR"])) == []


async def test_tickets_and_rate_limits_hold_across_api_replicas(cluster: Supervisor) -> None:
    replicas = replicas_of(cluster)
    apis = replicas.apis
    address = {"X-Forwarded-For": f"10.99.{secrets.randbelow(250)}.1"}
    async with httpx.AsyncClient(timeout=30, headers=address) as http:
        # One address signing up through both replicas in turn: the limit counts them all.
        answers = []
        for i in range(SIGNUPS_PER_MINUTE + 2):
            password = "correct horse battery " + secrets.token_urlsafe(12)
            SECRETS.add(password)
            r = await http.post(
                f"{apis[i % 2]}/api/auth/signup",
                json={"email": f"rl-{secrets.token_hex(6)}@example.com", "password": password},
            )
            answers.append(r.status_code)
        assert answers[:SIGNUPS_PER_MINUTE] == [201] * SIGNUPS_PER_MINUTE, answers
        assert answers[SIGNUPS_PER_MINUTE:] == [429, 429], answers

        # A ticket from api-1 works once, on gateway-2; not again on gateway-1.
        http.headers["X-Forwarded-For"] = f"10.98.{secrets.randbelow(250)}.1"
        account = await sign_up(replicas, http, SECRETS.add)
        await create(account)
        await account.client.wait_state(account.instance_id, "running", SETTLE)  # type: ignore[arg-type]
        ticket = await account.client.http.post(
            f"{apis[0]}/api/instances/{account.instance_id}/tickets",
            json={"channel": "vnc"},
            headers=account.client.headers,
        )
        assert ticket.status_code == 201, ticket.text
        url = ticket.json()["url"]
        SECRETS.add(ticket.json()["ticket"])
        gw1, gw2 = replicas.gateways
        port1, port2 = gw1.rsplit(":", 1)[1], gw2.rsplit(":", 1)[1]
        on_2 = url.replace(f":{port1}/", f":{port2}/")
        async with connect(
            on_2, origin=Origin(replicas.origin), subprotocols=[Subprotocol("binary")]
        ) as ws:
            await framebuffer_update(ws)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                url, origin=Origin(replicas.origin), subprotocols=[Subprotocol("binary")]
            ):
                pass
        assert refused.value.response.status_code in (401, 403)
        await account.client.expect(202, "DELETE", f"/api/instances/{account.instance_id}")
        await account.client.wait_state(account.instance_id, "terminated", SETTLE)  # type: ignore[arg-type]

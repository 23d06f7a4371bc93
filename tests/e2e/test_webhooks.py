"""Webhooks through the whole stack (the API, a real Celery worker with its beat, moto as
EC2): a receiver on 127.0.0.1 gets every state change of create, stop, start and delete,
signed in the Standard Webhooks format, in order, at least once, with a retry after it
failed once; targets on private addresses are refused unless the operator allows them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks.webhooks import Webhook as Verifier

from tests.support.harness import (
    ec2_stack,
    wait_api_state,
)
from tests.support.leaks import SECRETS
from tests.support.users import make_user
from tests.support.waiting import eventually


@dataclass
class Receiver:
    """A real HTTP server that answers 500 to the first `fail_first` requests."""

    fail_first: int = 1
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    url: str = ""

    def serve(self) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 500 if len(receiver.requests) <= receiver.fail_first else 204
                receiver.answered.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/cloudbot"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    server = r.serve()
    yield r
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def api_url(base_env, broker_url, moto_url, tmp_path_factory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("webhooks")
    with ec2_stack(
        base_env,
        broker_url,
        moto_url,
        state,
        "webhooks",
        WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32",
        WEBHOOK_RELAY_SECONDS="0.5",
    ) as url:
        yield url


async def test_every_state_change_is_delivered_signed_in_order_with_a_retry(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    user = await make_user(client)
    r = await client.post(
        "/api/user/webhooks",
        json={"url": receiver.url, "description": "ci"},
        headers=user.headers,
    )
    assert r.status_code == 201, r.text
    hook = r.json()
    secret = hook["secret"]
    SECRETS.add(secret)
    assert secret.startswith("whsec_")
    listed = (await client.get("/api/user/webhooks", headers=user.headers)).json()["items"]
    assert [h["id"] for h in listed] == [hook["id"]]
    assert secret not in str(listed)

    r = await client.post(
        "/api/instances", json={"name": "hooked", "size": "small"}, headers=user.headers
    )
    assert r.status_code == 202, r.text
    instance_id = r.json()["id"]
    await wait_api_state(client, user.headers, instance_id, "running")
    for verb, settled in (("stop", "stopped"), ("start", "running")):
        r = await client.post(f"/api/instances/{instance_id}/{verb}", headers=user.headers)
        assert r.status_code == 202, r.text
        await wait_api_state(client, user.headers, instance_id, settled)
    r = await client.delete(f"/api/instances/{instance_id}", headers=user.headers)
    assert r.status_code == 202
    await wait_api_state(client, user.headers, instance_id, "terminated")

    expected = [
        "pending",
        "provisioning",
        "running",
        "stopping",
        "stopped",
        "starting",
        "running",
        "terminating",
        "terminated",
    ]

    def delivered_states() -> list[str]:
        ok = [
            body
            for (_, body), status in zip(receiver.requests, receiver.answered, strict=True)
            if status < 300
        ]
        return [json.loads(body)["data"]["state"] for body in ok]

    await eventually(lambda: len(delivered_states()) >= len(expected), 30, "all deliveries")
    # The history as the API shows it is what was delivered, in that order.
    r = await client.get(f"/api/instances/{instance_id}/events", headers=user.headers)
    history = [
        json.loads(line[5:])["state"] for line in r.text.splitlines() if line.startswith("data:")
    ]
    assert history == expected
    assert delivered_states() == history

    verifier = Verifier(secret)
    ids = []
    for headers, body in receiver.requests:
        payload = verifier.verify(body, headers)  # raises if the signature is wrong
        assert payload["type"] == "instance.state_changed"
        assert payload["data"]["instance_id"] == instance_id
        ids.append(headers["webhook-id"])
    # The first delivery failed once and was retried with the same webhook-id.
    assert receiver.answered[0] == 500
    assert ids[0] == ids[1]
    assert len(set(ids)) == len(history)

    tampered = dict(receiver.requests[-1][0])
    with pytest.raises(Exception, match=r"(?i)signature"):
        verifier.verify(receiver.requests[-1][1] + b" ", tampered)

    r = await client.get(f"/api/user/webhooks/{hook['id']}/deliveries", headers=user.headers)
    assert r.status_code == 200
    deliveries = r.json()["items"]
    assert len(deliveries) == len(history)
    assert all(d["status"] == "succeeded" for d in deliveries)
    first = deliveries[-1]
    assert first["attempts"] == 2
    assert first["last_status_code"] == 204

    # Another user sees neither the webhook nor its deliveries.
    other = await make_user(client)
    r = await client.get(f"/api/user/webhooks/{hook['id']}/deliveries", headers=other.headers)
    assert r.status_code == 404
    r = await client.delete(f"/api/user/webhooks/{hook['id']}", headers=other.headers)
    assert r.status_code == 404

    audit = (await client.get("/api/user/audit", headers=user.headers)).json()["items"]
    assert "webhook.created" in [e["action"] for e in audit]
    # Each instance command is in the audit log, with who asked, in order.
    commands = [
        (e["details"]["command"], e["actor"].split(":")[0], e["target"])
        for e in reversed(audit)
        if e["action"] == "instance.command"
    ]
    target = f"instance:{instance_id}"
    assert commands == [
        ("provision", "session", target),
        ("stop", "session", target),
        ("start", "session", target),
        ("terminate", "session", target),
    ]
    assert [
        e["action"]
        for e in (await client.get("/api/user/audit", headers=other.headers)).json()["items"]
    ] == ["auth.login", "auth.signup"]

    r = await client.delete(f"/api/user/webhooks/{hook['id']}", headers=user.headers)
    assert r.status_code == 204
    assert (await client.get("/api/user/webhooks", headers=user.headers)).json()["items"] == []


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",
        "https://192.168.0.10/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "http://127.0.0.2/hook",
        "ftp://example.com/hook",
        "https://user:pass@203.0.113.1/hook",
    ],
)
async def test_private_and_odd_targets_are_refused(client: httpx.AsyncClient, url: str) -> None:
    user = await make_user(client)
    r = await client.post("/api/user/webhooks", json={"url": url}, headers=user.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/api/user/webhooks", headers=user.headers)).json()["items"] == []

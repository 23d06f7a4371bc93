"""The offered sizes (GET /api/sizes, the default when `size` is omitted), the document's
security schemes and tags, 405's Allow header, and per-account limits on creates."""

from __future__ import annotations

import httpx
import pytest

from cloudbot_common.settings import Settings
from cloudbot_common.sizes import INSTANCE_TYPES
from tests.support.clients import fake_client_address
from tests.support.problems import assert_problem
from tests.support.users import make_user

pytestmark = pytest.mark.fast


async def test_sizes_are_listed_with_their_hardware(http: httpx.AsyncClient, settings: Settings):
    assert (await http.get("/api/sizes")).status_code == 401
    user = await make_user(http)
    r = await http.get("/api/sizes", headers=user.headers)
    assert r.status_code == 200
    items = r.json()["items"]
    assert [i["name"] for i in items] == list(settings.instance_sizes)
    for item in items:
        hardware = INSTANCE_TYPES[item["instance_type"]]
        assert item["instance_type"] == settings.instance_sizes[item["name"]]
        assert (item["cpus"], item["memory_mib"]) == (hardware.cpus, hardware.memory_mib)
        assert item["default"] is (item["name"] == settings.default_instance_size)
    assert sum(i["default"] for i in items) == 1


async def test_size_may_be_omitted_and_must_be_offered(http: httpx.AsyncClient, settings):
    user = await make_user(http)
    r = await http.post("/api/instances", json={"name": "no size"}, headers=user.headers)
    assert r.status_code == 202, r.text
    assert r.json()["size"] == settings.default_instance_size
    for size in ("huge", ""):
        r = await http.post(
            "/api/instances", json={"name": "bad", "size": size}, headers=user.headers
        )
        assert r.status_code == 422, r.text


async def test_the_document_states_what_the_api_enforces(http: httpx.AsyncClient, settings):
    document = (await http.get("/openapi.json")).json()
    size = document["components"]["schemas"]["InstanceCreate"]["properties"]["size"]
    assert size["enum"] == list(settings.instance_sizes)
    assert size["default"] == settings.default_instance_size
    assert "size" not in document["components"]["schemas"]["InstanceCreate"]["required"]
    key = document["components"]["schemas"]["ApiKeyCreate"]["properties"]["key"]
    assert key["pattern"] == "^[!-~]+$"
    # Users and machines authenticate with different schemes; machine routes have a tag
    # of their own and never ask for a user's token.
    schemes = document["components"]["securitySchemes"]
    assert set(schemes) == {"UserToken", "BootstrapToken", "InstanceCredential"}
    for path, ops in document["paths"].items():
        for op in ops.values():
            used = {name for requirement in op.get("security", []) for name in requirement}
            if "instance agent" in op["tags"]:
                assert "UserToken" not in used, path
                assert used, path
            else:
                assert used <= {"UserToken"}, path
    # A created instance links to what can be done with it.
    links = document["paths"]["/api/instances"]["post"]["responses"]["202"]["links"]
    assert {"GetInstance", "StopInstance", "StartInstance", "DeleteInstance"} <= set(links)


async def test_method_not_allowed_names_every_method_of_the_path(http: httpx.AsyncClient):
    r = await http.request("PATCH", "/api/instances")
    assert_problem(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    r = await http.request("PUT", "/api/instances/00000000-0000-0000-0000-000000000000")
    assert_problem(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].split(", ")) == {"GET", "PATCH", "DELETE"}


async def test_an_unreadable_body_is_a_problem_document(http: httpx.AsyncClient):
    user = await make_user(http)
    r = await http.post(
        "/api/instances",
        content=b"\xff\xfe{",
        headers={**user.headers, "Content-Type": "application/json"},
    )
    assert r.status_code in (400, 422), r.text
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_creates_are_limited_per_account_not_per_shared_address(
    http: httpx.AsyncClient, settings: Settings
):
    """Many people behind one address (an office) each create freely; one account that
    creates too fast is held back whatever its address."""
    per_account = int(settings.rate_limit_instance_create.split("/")[0])
    shared = fake_client_address()
    users = []
    for _ in range(per_account + 2):
        # Each signs up from an address of its own (signups are limited per address).
        http.headers["X-Forwarded-For"] = fake_client_address()
        users.append(await make_user(http))
    for user in users:
        r = await http.post(
            "/api/instances",
            json={"name": "office"},
            headers={**user.headers, "X-Forwarded-For": shared},
        )
        assert r.status_code == 202, r.text

    hasty = users[0]
    answers = []
    for _ in range(per_account):
        r = await http.post(
            "/api/instances",
            json={"name": "hasty"},
            headers={**hasty.headers, "X-Forwarded-For": fake_client_address()},
        )
        answers.append(r.status_code)
    # One create above, then the quota (403) until the account's window is full (429).
    assert answers[-1] == 429, answers
    assert_problem(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1

"""CORS, OpenAPI documentation, the error shape and the response headers on the edges of
the API."""

import httpx
import pytest

from tests.support.leaks import SECRETS

pytestmark = pytest.mark.fast


async def test_cors_allows_only_listed_origins(http):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    ok = await http.options("/api/auth/login", headers={"Origin": "http://app.test", **preflight})
    assert ok.headers["access-control-allow-origin"] == "http://app.test"
    assert ok.headers["access-control-allow-credentials"] == "true"
    bad = await http.options("/api/auth/login", headers={"Origin": "http://evil.test", **preflight})
    assert "access-control-allow-origin" not in bad.headers
    get = await http.get("/healthz", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in get.headers


async def test_openapi_documents_every_error_response(http):
    spec = (await http.get("/openapi.json")).json()
    assert "Problem" in spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        if not path.startswith("/api/"):
            continue
        for method, op in ops.items():
            errors = [code for code in op["responses"] if code.startswith(("4", "5"))]
            assert errors, f"{method.upper()} {path} documents no error response"
            for code in errors:
                content = op["responses"][code].get("content", {})
                assert "application/problem+json" in content, f"{method} {path} {code}"
    assert (await http.get("/redoc")).status_code == 200


async def test_unknown_route_and_method_use_the_problem_shape(http):
    r = await http.get("/api/nope")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "not_found"
    r = await http.patch("/api/auth/login")
    assert r.status_code == 405
    assert r.json()["code"] == "method_not_allowed"


async def test_malformed_json_is_a_422_problem(http):
    r = await http.post(
        "/api/auth/login", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["code"] == "validation_failed"


async def test_request_id_is_returned_and_caller_ids_are_kept(http):
    r = await http.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await http.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"


async def test_token_answers_are_never_stored_and_nothing_is_sniffed(http, user):
    login = await http.post(
        "/api/auth/login", json={"email": user.email, "password": user.password}
    )
    refresh = await http.post(
        "/api/auth/refresh", json={"refresh_token": login.json()["refresh_token"]}
    )
    for r in (login, refresh):
        assert r.status_code == 200, r.text
        SECRETS.add(r.json()["access_token"], r.json()["refresh_token"])
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-content-type-options"] == "nosniff"
    for r in (
        await http.get("/api/auth/me", headers=user.headers),
        await http.get("/api/auth/me"),  # a problem document too
        await http.get("/healthz"),
        await http.get("/openapi.json"),
    ):
        assert r.headers["x-content-type-options"] == "nosniff", r.url
    assert (await http.get("/api/auth/me", headers=user.headers)).headers[
        "cache-control"
    ] == "no-store"


async def test_hsts_only_over_https_as_a_trusted_proxy_says(api_app):
    # The tests' trusted proxy is 127.0.0.1; 127.0.0.2 is a client connecting directly.
    def client_at(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=api_app, client=(address, 50000))
        return httpx.AsyncClient(base_url="http://api.test", transport=transport)

    async with client_at("127.0.0.1") as proxy:
        over_https = await proxy.get("/healthz", headers={"X-Forwarded-Proto": "https"})
        over_http = await proxy.get("/healthz", headers={"X-Forwarded-Proto": "http"})
        plain = await proxy.get("/healthz")
    assert over_https.headers["strict-transport-security"].startswith("max-age=")
    assert "strict-transport-security" not in over_http.headers
    assert "strict-transport-security" not in plain.headers
    async with client_at("127.0.0.2") as direct:
        spoofed = await direct.get("/healthz", headers={"X-Forwarded-Proto": "https"})
    assert spoofed.status_code == 200
    assert "strict-transport-security" not in spoofed.headers


async def test_metrics_are_not_on_the_public_port(http):
    r = await http.get("/metrics")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")

"""CORS, OpenAPI documentation and the error shape on the edges of the API."""


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

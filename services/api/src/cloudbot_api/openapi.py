"""The OpenAPI document, exact enough for generated clients and property-based testing:
problem documents for every error FastAPI answers by itself, the sizes this deployment
offers, and links from a created instance to what can be done with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from cloudbot_api.errors import PROBLEM_JSON
from cloudbot_common.settings import Settings

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

TAGS: list[dict[str, Any]] = [
    {"name": "auth", "description": "Accounts and login sessions (user access tokens)."},
    {"name": "api keys", "description": "Your model providers' API keys, stored encrypted."},
    {"name": "sizes", "description": "The machine sizes this deployment offers."},
    {"name": "instances", "description": "Your CloudBot machines and their lifecycle."},
    {
        "name": "personal access tokens",
        "description": "Long-lived tokens for programs, used like an access token.",
    },
    {"name": "webhooks", "description": "Your machines' state changes, signed and delivered."},
    {"name": "audit", "description": "What happened to your account, newest first."},
    {
        "name": "instance agent",
        "description": (
            "Called by the CloudBot machine itself, with its single-use bootstrap token "
            "(`BootstrapToken`) or its instance credential (`InstanceCredential`); never by "
            "people. A user's access token is refused here."
        ),
    },
    {"name": "health", "description": "Liveness and readiness for load balancers."},
]

# What a created instance links to (OpenAPI links): the stateful tests and generated clients
# follow them from the 202 of POST /api/instances.
_INSTANCE_LINKS = {
    "GetInstance": ("/api/instances/{instance_id}", "get"),
    "StopInstance": ("/api/instances/{instance_id}/stop", "post"),
    "StartInstance": ("/api/instances/{instance_id}/start", "post"),
    "DeleteInstance": ("/api/instances/{instance_id}", "delete"),
    "CreateTicket": ("/api/instances/{instance_id}/tickets", "post"),
    "InstanceEvents": ("/api/instances/{instance_id}/events", "get"),
}
_WEBHOOK_LINKS = {
    "DeleteWebhook": ("/api/user/webhooks/{webhook_id}", "delete"),
    "WebhookDeliveries": ("/api/user/webhooks/{webhook_id}/deliveries", "get"),
}
_TOKEN_LINKS = {"DeleteToken": ("/api/user/tokens/{token_id}", "delete")}
_API_KEY_LINKS = {
    "ReplaceApiKey": ("/api/user/api-keys/{provider}", "put"),
    "DeleteApiKey": ("/api/user/api-keys/{provider}", "delete"),
}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}}}


def _link(paths: dict[str, Any], path: str, method: str, param: str, source: str) -> dict[str, Any]:
    op = paths[path][method]
    return {"operationId": op["operationId"], "parameters": {param: f"$response.body#/{source}"}}


def _add_links(
    paths: dict[str, Any],
    producer: tuple[str, str, str],
    links: dict[str, tuple[str, str]],
    param: str,
    source: str,
) -> None:
    path, method, status = producer
    if path not in paths:
        return
    response = paths[path][method]["responses"][status]
    response["links"] = {
        name: _link(paths, target, target_method, param, source)
        for name, (target, target_method) in links.items()
        if target in paths and target_method in paths[target]
    }


def _without_null(param: dict[str, Any]) -> None:
    """An optional header or query parameter is absent or a string, never `null`: state the
    string's own schema (FastAPI writes `anyOf: [{...}, {type: null}]` for `str | None`)."""
    schema = param.get("schema", {})
    branches = schema.get("anyOf")
    if not branches:
        return
    kept = [b for b in branches if b.get("type") != "null"]
    if len(kept) == 1 and len(kept) < len(branches):
        del schema["anyOf"]
        schema.update(kept[0])


def document(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """An `app.openapi` built once, on first use."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=TAGS,
        )
        paths: dict[str, Any] = schema.get("paths", {})
        for ops in paths.values():
            for op in ops.values():
                for param in op.get("parameters", []):
                    _without_null(param)
                responses = op.setdefault("responses", {})
                for code, response in responses.items():
                    content = response.get("content", {})
                    json_schema = content.get("application/json", {}).get("schema", {})
                    if code == "422" and json_schema.get("$ref", "").endswith(
                        "/HTTPValidationError"
                    ):
                        responses[code] = _problem("The request is not valid")
                if "requestBody" in op:
                    # Answered before validation: a body that is not JSON at all, or too big.
                    responses.setdefault("400", _problem("The body could not be read"))
                    responses.setdefault("413", _problem("The body is too large"))
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)

        # The sizes are configuration: the document states the ones this deployment offers.
        size = components.get("InstanceCreate", {}).get("properties", {}).get("size")
        if size is not None:
            size.pop("anyOf", None)
            size.update(
                type="string",
                enum=list(settings.instance_sizes),
                default=settings.default_instance_size,
            )

        _add_links(paths, ("/api/instances", "post", "202"), _INSTANCE_LINKS, "instance_id", "id")
        _add_links(
            paths, ("/api/user/api-keys", "post", "201"), _API_KEY_LINKS, "provider", "provider"
        )
        _add_links(paths, ("/api/user/webhooks", "post", "201"), _WEBHOOK_LINKS, "webhook_id", "id")
        _add_links(paths, ("/api/user/tokens", "post", "201"), _TOKEN_LINKS, "token_id", "id")
        app.openapi_schema = schema
        return schema

    return openapi

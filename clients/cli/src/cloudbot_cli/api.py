"""A small typed face over the REST API: one method per call the CLI makes, problem
documents turned into `ApiError` with the API's own words."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

FINAL_STATES = frozenset({"failed", "terminated"})


class ApiError(Exception):
    """An error answer from the API (a problem document), or no answer at all."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {}
    raise ApiError(
        response.status_code,
        str(problem.get("code", "http_error")),
        str(problem.get("detail") or problem.get("title") or response.reason_phrase),
    )


class Api:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30) -> None:
        headers = {"User-Agent": "cloudbot-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, "/api" + path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"Cannot reach {self.base_url}: {exc}") from exc
        _raise_for(response)
        return response.json() if response.content else None

    # Account: a password login made only to mint a personal access token.
    def login(self, email: str, password: str) -> str:
        pair = self.call("POST", "/auth/login", json={"email": email, "password": password})
        return str(pair["access_token"])

    def create_token(self, access_token: str, name: str, scope: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {access_token}"}
        body = {"name": name, "scope": scope}
        result: dict[str, Any] = self.call("POST", "/user/tokens", json=body, headers=headers)
        return result

    def logout(self, access_token: str) -> None:
        self.call("POST", "/auth/logout", headers={"Authorization": f"Bearer {access_token}"})

    # Instances.
    def instances(self, include_terminated: bool = False) -> list[dict[str, Any]]:
        params = {"include_terminated": "true"} if include_terminated else None
        return list(self.call("GET", "/instances", params=params)["items"])

    def instance(self, instance_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/instances/{instance_id}")
        return result

    def create(self, body: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key}
        result: dict[str, Any] = self.call("POST", "/instances", json=body, headers=headers)
        return result

    def command(self, instance_id: str, verb: str) -> dict[str, Any]:
        if verb == "delete":
            result: dict[str, Any] = self.call("DELETE", f"/instances/{instance_id}")
        else:
            result = self.call("POST", f"/instances/{instance_id}/{verb}")
        return result

    def sizes(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/sizes")["items"])

    def events(
        self, instance_id: str, after: int | None = None, *, follow: bool = True
    ) -> Iterator[dict[str, Any]]:
        """The instance's events (Server-Sent Events) after event `after`: its history,
        then, with `follow`, new ones as they come, reconnecting if the stream drops (it
        ends after `terminated`). Each event carries its `id`."""
        last = after
        # Without follow, the history is what arrives before the stream goes quiet.
        timeout = httpx.Timeout(10, read=None if follow else 1.0)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                with self._http.stream(
                    "GET", f"/api/instances/{instance_id}/events", headers=headers, timeout=timeout
                ) as response:
                    if not response.is_success:
                        response.read()
                        _raise_for(response)
                    for event_id, name, data in _sse(response.iter_lines()):
                        last = event_id if event_id is not None else last
                        yield {"event": name, "id": event_id, **data}
                        if name == "state" and data.get("state") == "terminated":
                            return
            except httpx.ReadTimeout:
                if not follow:
                    return
            except httpx.TransportError:
                if not follow:
                    raise
                time.sleep(1)  # the stream dropped: resume from the last event seen

    def last_event_id(self, instance_id: str) -> int | None:
        """The id of the instance's latest event so far."""
        last = None
        for event in self.events(instance_id, follow=False):
            last = event["id"]
        return last

    def wait_for(
        self, instance_id: str, wanted: set[str], after: int | None
    ) -> Iterator[dict[str, Any]]:
        """Events after `after` until the instance reaches one of `wanted` (or a final
        state)."""
        for event in self.events(instance_id, after):
            yield event
            state = event.get("state") if event["event"] == "state" else None
            if state in wanted or state in FINAL_STATES:
                return

    def ticket(self, instance_id: str, channel: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "POST", f"/instances/{instance_id}/tickets", json={"channel": channel}
        )
        return result

    # Provider keys.
    def keys(self) -> list[dict[str, Any]]:
        result = self.call("GET", "/user/api-keys")
        return list(result["items"] if isinstance(result, dict) else result)

    def set_key(self, provider: str, key: str) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self.call(
                "POST", "/user/api-keys", json={"provider": provider, "key": key}
            )
        except ApiError as exc:
            if exc.status != 409:
                raise
            result = self.call("PUT", f"/user/api-keys/{provider}", json={"key": key})
        return result

    def remove_key(self, provider: str) -> None:
        self.call("DELETE", f"/user/api-keys/{provider}")


def _sse(lines: Iterator[str]) -> Iterator[tuple[int | None, str, dict[str, Any]]]:
    """(id, event name, data) of each event in a text/event-stream."""
    event_id: int | None = None
    name = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, name, json.loads("\n".join(data))
            event_id, name, data = None, "message", []
        elif line.startswith("id:") and line[3:].strip().isdigit():
            event_id = int(line[3:].strip())
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())

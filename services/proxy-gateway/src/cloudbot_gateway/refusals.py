"""Refusing an upgrade request: an HTTP status and an RFC 9457 problem document, the same
error shape as the API's, sent instead of the 101."""

from __future__ import annotations

import email.utils
import json
from http import HTTPStatus

from websockets.datastructures import Headers
from websockets.http11 import Response

PROBLEM_JSON = "application/problem+json"


class Refusal(Exception):
    """Raised while checking an upgrade request; `code` is also the metrics label."""

    def __init__(
        self, status: HTTPStatus, code: str, detail: str, *, state: str | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.state = state

    def response(self) -> Response:
        problem: dict[str, object] = {
            "type": "about:blank",
            "title": self.status.phrase,
            "status": int(self.status),
            "detail": self.detail,
            "code": self.code,
        }
        if self.state is not None:
            problem["state"] = self.state
        headers = [("Content-Type", PROBLEM_JSON)]
        if self.status is HTTPStatus.UNAUTHORIZED:
            headers.append(("WWW-Authenticate", 'Bearer realm="cloudbot"'))
        return http_response(self.status, json.dumps(problem).encode(), headers)


def http_response(
    status: HTTPStatus, body: bytes, headers: list[tuple[str, str]] | None = None
) -> Response:
    """A complete non-upgrade response; the connection closes after it."""
    all_headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *(headers or []),
        ]
    )
    return Response(int(status), status.phrase, all_headers, body)


def not_found() -> Refusal:
    # One answer for a missing instance and another user's: nothing tells them apart.
    return Refusal(HTTPStatus.NOT_FOUND, "not_found", "No such instance.")

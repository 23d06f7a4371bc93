"""Response headers every API answer carries, as one pure ASGI middleware.

- `X-Content-Type-Options: nosniff` everywhere: a browser never guesses a type for a body.
- `Cache-Control: no-store` on /api answers that set no caching of their own: they carry
  tokens, tickets and per-user data, which no browser or proxy cache may keep.
- `Strict-Transport-Security` when the request came over https, directly or, from a proxy
  in TRUSTED_PROXIES, as its X-Forwarded-Proto says.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudbot_api.proxies import TrustedProxies

HSTS = b"max-age=31536000"
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_NO_STORE = (b"cache-control", b"no-store")


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, proxies: TrustedProxies) -> None:
        self.app = app
        self.proxies = proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = [_NOSNIFF]
        if self._over_https(scope):
            added.append((b"strict-transport-security", HSTS))
        api = scope["path"].startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if api and not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append(_NO_STORE)
                message["headers"] = headers + added
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _over_https(self, scope: Scope) -> bool:
        if scope.get("scheme") == "https":
            return True
        client = scope.get("client")
        if client is None or not self.proxies.trusts(client[0]):
            return False
        protos = [v for k, v in scope["headers"] if k == b"x-forwarded-proto"]
        # The proxy nearest us appended last; that is the hop we believe.
        return bool(protos) and protos[-1].split(b",")[-1].strip().lower() == b"https"

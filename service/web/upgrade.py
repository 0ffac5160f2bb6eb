"""What a hook reads of the WebSocket's HTTP upgrade request: headers, cookies, query."""

from __future__ import annotations

from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection
from starlette.types import Scope


class UpgradeRequest:
    """The request that opened a WebSocket, read from its ASGI `scope` when asked (a
    connection keeps nothing more for it). `scope["session"]` is the host app's session
    when it has Starlette's SessionMiddleware."""

    scope: Scope

    @property
    def headers(self) -> Headers:
        return Headers(scope=self.scope)

    @property
    def cookies(self) -> dict[str, str]:
        return HTTPConnection(self.scope).cookies

    @property
    def query_params(self) -> QueryParams:
        return QueryParams(self.scope["query_string"])

    @property
    def client_address(self) -> str | None:
        """The client's IP address (the proxy's, unless FORWARDED_ALLOW_IPS trusts it)."""
        client = self.scope.get("client")
        return str(client[0]) if client else None

"""What every request passes before a route sees it: the API key, the body size limit and,
without a key, the checks that keep web pages from driving the server.

Without --api-key, any page the user opens in a browser can send requests to a server on
loopback. A cross-origin POST with a text/plain or form body needs no CORS preflight, so
the API takes only application/json (415 otherwise: a page cannot send that cross-origin
without a preflight, which this server does not answer). And a page whose DNS name is
rebound to 127.0.0.1 is same-origin with the server: its requests carry the page's own
name in Host, so Host must be an IP address, localhost, the --host given, or a name in
--allowed-hosts (403 otherwise), as llama.cpp's and Jupyter's servers check.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which would buffer streamed
replies and hide client disconnects from the routes).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from typing import Callable, Optional

from .config import ServerConfig
from .schemas import ApiError

# the API; /health, /metrics and the page stay open, as in vLLM
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


def _error_response(error: ApiError):
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    return ({"type": "http.response.start", "status": error.status, "headers": headers},
            {"type": "http.response.body", "body": body})


def host_name(header: str) -> str:
    """The name in a Host header, without the port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def host_allowed(name: str, config: ServerConfig) -> bool:
    """Whether a request naming host ``name`` may be a DNS-rebound page: IP addresses and
    localhost cannot be rebound; the bound name and --allowed-hosts are the user's."""
    allowed = {h.lower() for h in config.allowed_hosts}
    if "*" in allowed or name in allowed or name == config.host.lower():
        return True
    if name == "localhost" or name.endswith(".localhost"):  # browsers keep these on loopback
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit} "
                         "bytes; send a shorter prompt or raise serve --max-body-size",
                    code="request_too_large")


class RequestGuard:
    """Refuses /v1/, /tokenize and /detokenize requests without the API key (401), bodies
    over ``max_body_bytes`` (413) and, when there is no key, foreign Host headers (403) and
    API posts that are not JSON (415).

    A declared Content-Length over the limit is refused before anything is read; a body sent
    without one (chunked) is counted as it arrives and refused once it passes the limit: the
    route's ``await request.body()`` raises the 413 ApiError, which the app's handler renders.
    """

    def __init__(self, app, config: ServerConfig,
                 on_refusal: Optional[Callable[[], None]] = None):
        self.app = app
        self.config = config
        self.api_key = config.api_key
        self.max_body_bytes = config.max_body_bytes
        self.on_refusal = on_refusal  # counts the refusal (requests_total rejected)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._refusal(scope)
        if error is not None:
            if self.on_refusal is not None:
                self.on_refusal()
            start, body = _error_response(error)
            await send(start)
            await send(body)
            return
        await self.app(scope, self._counting(receive), send)

    def _refusal(self, scope) -> Optional[ApiError]:
        headers = dict(scope.get("headers") or [])
        if not self.api_key:
            error = self._browser_refusal(scope, headers)
            if error is not None:
                return error
        if self.api_key and scope["path"].startswith(PROTECTED_PREFIXES):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                    token.strip().encode(), self.api_key.encode()):
                return ApiError(401, "a valid API key is required: send the header "
                                     "'Authorization: Bearer KEY' with the key given to serve "
                                     "--api-key (or OFFLOAD_ENGINE_API_KEY)",
                                code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return body_too_large(self.max_body_bytes)
        return None

    def _browser_refusal(self, scope, headers: dict) -> Optional[ApiError]:
        """Without a key: 403 for a Host a rebound DNS name could send, 415 for an API
        post whose body a cross-origin page could send without a preflight."""
        host = headers.get(b"host")
        if host is not None and not host_allowed(host_name(host.decode("latin-1")),
                                                 self.config):
            shown = host.decode("latin-1")
            return ApiError(403, f"this server does not answer to the host {shown!r} (a web "
                                 "page reaching it through a rebound DNS name?); use its IP "
                                 "address or localhost, add the name to serve --allowed-hosts, "
                                 "or set --api-key", code="host_not_allowed")
        if scope["method"] == "POST" and scope["path"].startswith(PROTECTED_PREFIXES):
            given = headers.get(b"content-type", b"").decode("latin-1")
            if given.partition(";")[0].strip().lower() != "application/json":
                return ApiError(415, f"the API takes JSON bodies: send 'Content-Type: "
                                     f"application/json' (got {given or 'none'!r})",
                                code="unsupported_media_type")
        return None

    def _counting(self, receive):
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise body_too_large(self.max_body_bytes)
            return message

        return counted

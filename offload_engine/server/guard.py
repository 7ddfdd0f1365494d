"""What every request passes before a route sees it: the API key and the body size limit.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which would buffer streamed
replies and hide client disconnects from the routes).
"""

from __future__ import annotations

import json
import secrets
from typing import Optional

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


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit} "
                         "bytes; send a shorter prompt or raise serve --max-body-size",
                    code="request_too_large")


class RequestGuard:
    """Refuses /v1/, /tokenize and /detokenize requests without the API key (401) and
    bodies over ``max_body_bytes`` (413).

    A declared Content-Length over the limit is refused before anything is read; a body sent
    without one (chunked) is counted as it arrives and refused once it passes the limit: the
    route's ``await request.body()`` raises the 413 ApiError, which the app's handler renders.
    """

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._refusal(scope)
        if error is not None:
            start, body = _error_response(error)
            await send(start)
            await send(body)
            return
        await self.app(scope, self._counting(receive), send)

    def _refusal(self, scope) -> Optional[ApiError]:
        headers = dict(scope.get("headers") or [])
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

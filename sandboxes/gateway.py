"""The sandboxes' front door for `/v1`: request log, rate limit and faults, bearer key,
`Stripe-Version`, and a `Request-Id` on every answer."""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections import deque

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandboxes.faults import (
    SAVED_KINDS,
    FaultInjector,
    drop_connection,
    too_many_requests,
    wait_for_disconnect,
)
from sandboxes.wire import ApiError, JsonDict, error_body, new_id

REQUEST_LOG_SIZE = 10_000
# Stripe's form: a release date, optionally followed by the release's name.
API_VERSION_PATTERN = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(\.[a-z_]+)?$")
# Set by `ApiGateway.handle_api` in the ASGI scope for the route handlers.
SCOPE_FAULT = "sandbox.fault"
SCOPE_REQUEST_ID = "sandbox.request_id"


class RequestLog:
    """The last `REQUEST_LOG_SIZE` `/v1` requests, oldest first."""

    def __init__(self, size: int = REQUEST_LOG_SIZE) -> None:
        self._entries: deque[JsonDict] = deque(maxlen=size)

    def start(self, scope: Scope, *, request_id: str) -> JsonDict:
        """Record a request as it arrives; the caller fills in status and fault later.

        `ts` is real time, not the sandbox clock: the log measures the client's pace.
        """
        entry: JsonDict = {
            "ts": time.time(),
            "method": scope["method"],
            "path": scope["path"],
            "status": None,
            "idempotency_key": scope_header(scope, b"idempotency-key"),
            "stripe_version": scope_header(scope, b"stripe-version"),
            "request_id": request_id,
            "fault": None,
        }
        self._entries.append(entry)
        return entry

    def entries(self) -> list[JsonDict]:
        """A copy of the log."""
        return [dict(entry) for entry in self._entries]

    def clear(self) -> None:
        """Forget every request."""
        self._entries.clear()


class ApiGateway:
    """Checks and records each `/v1` request before the sandbox's routes see it.

    Args:
        name: Short service name, used in messages.
        api_key: The bearer key requests must carry.
        api_version: The `Stripe-Version` answered when a request names none; None for a
            service that is not Stripe-shaped and ignores the header.
        faults: The fault injector and rate limiter for `/v1/*`.
        log: The `/v1` request log.
    """

    def __init__(
        self,
        *,
        name: str,
        api_key: str,
        api_version: str | None,
        faults: FaultInjector,
        log: RequestLog,
    ) -> None:
        self.name = name
        self.api_version = api_version
        self.faults = faults
        self.log = log
        self._api_key = api_key

    def unauthorized(self, scope: Scope) -> Response | None:
        """None when the bearer key matches, else the 401 to answer with."""
        header = scope_header(scope, b"authorization")
        expected = f"Bearer {self._api_key}".encode()
        if header and hmac.compare_digest(header.encode(), expected):
            return None
        if not header:
            code = "api_key_missing"
            message = (
                "You did not provide an API key. Provide it in the Authorization header,"
                " using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
            )
        else:
            code, message = "api_key_invalid", "Invalid API Key provided."
        return JSONResponse(
            error_body(type_="invalid_request_error", code=code, message=message),
            status_code=401,
            headers={"WWW-Authenticate": f'Bearer realm="{self.name}"'},
        )

    async def handle_api(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """Serve one `/v1` request: log it, limit it, inject its fault, check auth and
        version, then run `app`. Every answer carries `Request-Id` (and `Stripe-Version`)."""
        request_id = new_id("req_", 14)
        entry = self.log.start(scope, request_id=request_id)
        version = entry["stripe_version"]
        version_ok = version is None or API_VERSION_PATTERN.match(version) is not None
        extra = [(b"request-id", request_id.encode())]
        if self.api_version is not None:
            answered = version if version is not None and version_ok else self.api_version
            extra.append((b"stripe-version", answered.encode("latin-1")))
        send = _adding_headers(send, extra)

        async def answer(response: Response) -> None:
            entry["status"] = response.status_code
            await response(scope, receive, send)

        config = self.faults.config
        if not self.faults.limiter.admit():
            entry["fault"] = "rate_limiter"
            await answer(too_many_requests("rate_limit", config.retry_after_s))
            return
        kind, error_status = self.faults.draw(scope["path"])
        if config.latency_ms and config.applies_to(scope["path"]):
            await asyncio.sleep(config.latency_ms / 1000)
        if kind in SAVED_KINDS and not (
            scope["method"] == "POST" and scope_header(scope, b"idempotency-key")
        ):
            kind = None  # nothing to save the failure under
        entry["fault"] = kind

        if kind == "error":
            body = error_body(
                type_="api_error",
                message=f"Sandbox fault: the {self.name} had an internal error. Please retry.",
            )
            headers = {"Stripe-Should-Retry": "true"}
            await answer(JSONResponse(body, status_code=error_status, headers=headers))
            return
        if kind == "rate_limit" or kind == "lock_timeout":
            await answer(too_many_requests(kind, config.retry_after_s))
            return
        if kind == "timeout":
            if await wait_for_disconnect(receive, config.hang_ms / 1000):
                return
            body = error_body(type_="api_error", message=f"Sandbox fault: {self.name} timed out.")
            await answer(JSONResponse(body, status_code=504))
            return
        if kind == "drop":
            await drop_connection(send)
            return

        refusal = self.unauthorized(scope)
        if refusal is not None:
            await answer(refusal)
            return
        if self.api_version is not None and not version_ok:
            error = ApiError(
                400,
                f"Invalid Stripe API version: {version}",
                code="api_version_invalid",
                param="Stripe-Version",
            )
            await answer(error.response())
            return

        scope[SCOPE_FAULT] = kind
        scope[SCOPE_REQUEST_ID] = request_id

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            if kind != "lost_response":
                await send(message)

        await app(scope, receive, recording_send)
        if kind == "lost_response":
            await drop_connection(send)


def _adding_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return sending


class SandboxMiddleware:
    """Routes `/v1` traffic through `ApiGateway.handle_api` and keeps `/_sandbox` behind the key.

    The admin API moves money and time in the sandbox, so it takes the same bearer key as
    `/v1`; only `/healthz` is open.
    """

    def __init__(self, app: ASGIApp, gateway: ApiGateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"] + "/"
            if path.startswith("/v1/"):
                await self.gateway.handle_api(scope, receive, send, self.app)
                return
            if path.startswith("/_sandbox/"):
                refusal = self.gateway.unauthorized(scope)
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def scope_header(scope: Scope, name: bytes) -> str | None:
    """A request header from the ASGI scope (`name` in lower case)."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None

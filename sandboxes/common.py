"""Shared sandbox plumbing: bearer auth, faults, clock, request log, idempotency, JSON state."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import re
import secrets
import string
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandboxes.faults import (
    SAVED_KINDS,
    FaultConfig,
    FaultInjector,
    FaultKind,
    drop_connection,
    install_drop_log_filter,
    too_many_requests,
    wait_for_disconnect,
)
from sandboxes.idempotency import MAX_KEY_LENGTH, IdempotencyRecords, fingerprint

JsonDict = dict[str, Any]
Handler = Callable[[], tuple[int, JsonDict]]

REQUEST_LOG_SIZE = 10_000
# Stripe's form: a release date, optionally followed by the release's name.
API_VERSION_PATTERN = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(\.[a-z_]+)?$")
# Set by `Sandbox.handle_api` in the ASGI scope for the route handlers.
SCOPE_FAULT = "sandbox.fault"
SCOPE_REQUEST_ID = "sandbox.request_id"
_ID_ALPHABET = string.ascii_letters + string.digits

logger = logging.getLogger(__name__)


def new_id(prefix: str, length: int = 24) -> str:
    """An object id in Stripe's style: a type prefix and random letters and digits."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def error_body(
    *, type_: str, message: str, code: str | None = None, param: str | None = None
) -> JsonDict:
    """A Stripe-shaped error body: `{"error": {"type", "message", "code"?, "param"?}}`."""
    error: JsonDict = {"type": type_, "message": message}
    if code is not None:
        error["code"] = code
    if param is not None:
        error["param"] = param
    return {"error": error}


class ApiError(Exception):
    """Raised by sandbox handlers to answer with a Stripe-shaped error.

    Inside `Sandbox.run_idempotent` the error becomes the saved response, as Stripe saves
    4xx answers under their idempotency key too.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(type_=type_, message=message, code=code, param=param)

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        return JSONResponse(self.body, status_code=self.status)


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
            "idempotency_key": _header(scope, b"idempotency-key"),
            "stripe_version": _header(scope, b"stripe-version"),
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


class StateFile:
    """A JSON file written atomically (temporary file, fsync, `os.replace`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> JsonDict | None:
        """The saved state, or None when there is no file yet."""
        if not self.path.exists():
            return None
        data = json.loads(self.path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{self.path} does not hold a JSON object")
        return data

    def save(self, state: JsonDict) -> None:
        """Replace the file's content with `state`; a crash leaves the old or the new file.

        The file is the owner's only (0600), and so is its directory (0700) when this creates
        it: the state holds charges, refunds, members and saved idempotent replies.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp creates the file 0600 whatever the umask; os.replace keeps that mode, so
        # an older, wider file is replaced by an owner-only one.
        fd, tmp_name = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                json.dump(state, tmp, separators=(",", ":"))
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self.path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


class Sandbox:
    """One sandbox service's shared machinery around its domain routes.

    Attributes:
        name: Short service name, used in messages.
        api_version: The `Stripe-Version` answered when a request names none; None for a
            service that is not Stripe-shaped and ignores the header.
        state: The JSON-serialisable domain state; mutate it only while holding `lock`
            and call `save()` afterwards.
        lock: Serialises mutations so concurrent requests see consistent state.
        faults: The fault injector and rate limiter for `/v1/*`.
        log: The `/v1` request log.
    """

    def __init__(
        self,
        *,
        name: str,
        api_key: str,
        state_path: Path | None,
        initial_state: Callable[[], JsonDict],
        api_version: str | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("the sandbox needs a non-empty API key")
        self.name = name
        self.api_version = api_version
        self._api_key = api_key
        self._initial_state = initial_state
        self._file = StateFile(state_path) if state_path is not None else None
        self.lock = asyncio.Lock()
        # Called (under the lock) after `POST /_sandbox/reset` replaced the state.
        self.reset_hooks: list[Callable[[], None]] = []
        self.faults = FaultInjector()
        self.log = RequestLog()
        self.state = self._fresh_state()
        loaded = self._file.load() if self._file is not None else None
        if loaded is not None:
            self.state.update(loaded)
        self.state.setdefault("idempotency", {})
        self.state.setdefault("clock", {"offset_s": 0.0})

    def __repr__(self) -> str:
        return f"Sandbox(name={self.name!r})"

    def _fresh_state(self) -> JsonDict:
        state = self._initial_state()
        state.setdefault("idempotency", {})
        state["clock"] = {"offset_s": 0.0}
        return state

    def save(self) -> None:
        """Persist the state when the sandbox has a state file."""
        if self._file is not None:
            self._file.save(self.state)

    # -- the sandbox clock: real time plus an offset tests move forward --------------------

    def now(self) -> float:
        """The sandbox clock as Unix seconds."""
        offset: float = self.state["clock"]["offset_s"]
        return time.time() + offset

    def now_int(self) -> int:
        """The sandbox clock in whole seconds, as Stripe's `created` fields are."""
        return int(self.now())

    def now_iso(self) -> str:
        """The sandbox clock as ISO 8601 UTC with a `Z` suffix, to the second."""
        moment = datetime.fromtimestamp(self.now(), UTC)
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")

    def clock_view(self) -> JsonDict:
        """The clock as `GET /_sandbox/clock` shows it."""
        return {"now": self.now_int(), "offset_s": self.state["clock"]["offset_s"]}

    # -- idempotency -----------------------------------------------------------------------

    async def run_idempotent(
        self, request: Request, params: Sequence[tuple[str, str]], handler: Handler
    ) -> Response:
        """Run a mutating handler under the lock, honouring an `Idempotency-Key` header.

        Stripe's semantics: once the endpoint starts executing, the first response for a key
        is saved (errors included) and replayed for the same method, path and parameters;
        other parameters under the same key get a 400 `idempotency_error`; a key at least
        24 hours old by the sandbox clock is pruned and executes again. A drawn
        `saved_error` fault saves a 500 instead of running the handler, and
        `executed_saved_error` saves a 500 after running it.

        Args:
            request: The incoming request (its key header, method and path are used).
            params: The request's parameters, compared on replay (order does not matter).
            handler: Computes `(status, body)`; may raise `ApiError`.
        """
        key = request.headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
            return ApiError(
                400,
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters long.",
                code="idempotency_key_invalid",
            ).response()
        fault: FaultKind | None = request.scope.get(SCOPE_FAULT) if key is not None else None
        request_id: str | None = request.scope.get(SCOPE_REQUEST_ID)
        request_print = fingerprint(request.method, request.url.path, params)
        async with self.lock:
            now = self.now()
            records = IdempotencyRecords(self.state["idempotency"])
            records.prune(now)
            if key is not None:
                saved = records.get(key, now)
                if saved is not None and saved["fingerprint"] != request_print:
                    return ApiError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters"
                        " they were first used with. Try using a key other than"
                        f" '{key}' if you meant to execute a different request.",
                        type_="idempotency_error",
                    ).response()
                if saved is not None:
                    replay_headers = {
                        **saved.get("headers", {}),
                        "Idempotent-Replayed": "true",
                        "Idempotency-Key": key,
                    }
                    if saved.get("request_id"):
                        replay_headers["Original-Request"] = saved["request_id"]
                    return JSONResponse(
                        saved["body"], status_code=saved["status"], headers=replay_headers
                    )
            headers: dict[str, str] = {}
            if fault == "saved_error":
                status, body = 500, self._saved_error_body()
            else:
                try:
                    status, body = handler()
                except ApiError as exc:
                    status, body = exc.status, exc.body
                if fault == "executed_saved_error":
                    status, body = 500, self._saved_error_body()
            if fault in SAVED_KINDS:
                # Retrying cannot help: every retry under this key replays the same 500.
                headers["Stripe-Should-Retry"] = "false"
            if key is not None:
                records.put(
                    key,
                    fingerprint=request_print,
                    status=status,
                    body=body,
                    headers=headers,
                    request_id=request_id,
                    now=now,
                )
            self.save()
        if key is not None:
            headers["Idempotency-Key"] = key
        return JSONResponse(body, status_code=status, headers=headers)

    def _saved_error_body(self) -> JsonDict:
        return error_body(
            type_="api_error",
            message=f"Sandbox fault: the {self.name} failed while executing this request"
            " and saved the failure under its idempotency key.",
        )

    # -- the app and its admin endpoints ---------------------------------------------------

    def build_app(self, routes: Sequence[BaseRoute]) -> Starlette:
        """A Starlette app serving `routes` plus health, admin, auth and fault handling."""
        install_drop_log_filter()
        admin = [
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/_sandbox/faults", self._get_faults, methods=["GET"]),
            Route("/_sandbox/faults", self._set_faults, methods=["POST"]),
            Route("/_sandbox/requests", self._get_requests, methods=["GET"]),
            Route("/_sandbox/requests", self._clear_requests, methods=["DELETE"]),
            Route("/_sandbox/clock", self._get_clock, methods=["GET"]),
            Route("/_sandbox/clock", self._advance_clock, methods=["POST"]),
            Route("/_sandbox/reset", self._reset, methods=["POST"]),
        ]
        return Starlette(
            routes=[*admin, *routes],
            middleware=[Middleware(_SandboxMiddleware, sandbox=self)],
            exception_handlers={HTTPException: _http_exception, ApiError: _api_error},
        )

    async def _get_faults(self, request: Request) -> Response:
        return JSONResponse(self.faults.config.to_json())

    async def _set_faults(self, request: Request) -> Response:
        data = await read_json(request)
        try:
            config = FaultConfig.from_json(data)
        except ValueError as exc:
            raise ApiError(400, str(exc), code="parameter_invalid") from exc
        self.faults.configure(config)
        logger.info("%s sandbox faults: %s", self.name, config.to_json())
        return JSONResponse(config.to_json())

    async def _get_requests(self, request: Request) -> Response:
        return JSONResponse(self.log.entries())

    async def _clear_requests(self, request: Request) -> Response:
        self.log.clear()
        return JSONResponse({"ok": True})

    async def _get_clock(self, request: Request) -> Response:
        return JSONResponse(self.clock_view())

    async def _advance_clock(self, request: Request) -> Response:
        data = await read_json(request)
        advance = data.get("advance_s")
        if (
            isinstance(advance, bool)
            or not isinstance(advance, int | float)
            or not math.isfinite(advance)
            or advance < 0
        ):
            raise ApiError(400, "advance_s must be a non-negative number", code="parameter_invalid")
        async with self.lock:
            self.state["clock"]["offset_s"] += float(advance)
            self.save()
            return JSONResponse(self.clock_view())

    async def _reset(self, request: Request) -> Response:
        async with self.lock:
            self.state = self._fresh_state()
            for hook in self.reset_hooks:
                hook()
            self.save()
        self.faults.configure(FaultConfig())
        self.log.clear()
        return JSONResponse({"ok": True})

    # -- request handling ------------------------------------------------------------------

    def unauthorized(self, scope: Scope) -> Response | None:
        """None when the bearer key matches, else the 401 to answer with."""
        header = _header(scope, b"authorization")
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
            scope["method"] == "POST" and _header(scope, b"idempotency-key")
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


class _SandboxMiddleware:
    """Routes `/v1` traffic through `Sandbox.handle_api` and keeps `/_sandbox` behind the key.

    The admin API moves money and time in the sandbox, so it takes the same bearer key as
    `/v1`; only `/healthz` is open.
    """

    def __init__(self, app: ASGIApp, sandbox: Sandbox) -> None:
        self.app = app
        self.sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"] + "/"
            if path.startswith("/v1/"):
                await self.sandbox.handle_api(scope, receive, send, self.app)
                return
            if path.startswith("/_sandbox/"):
                refusal = self.sandbox.unauthorized(scope)
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def read_json(request: Request) -> JsonDict:
    """The request body as a JSON object (an empty body is `{}`).

    Raises:
        ApiError: 400 when the body is not a JSON object.
    """
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}", code="parameter_invalid") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "The JSON body must be an object.", code="parameter_invalid")
    return data


async def _healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unrecognized request URL ({request.method}: {request.url.path})."
    else:
        message = f"{exc.detail} ({request.method}: {request.url.path})."
    return JSONResponse(
        error_body(type_="invalid_request_error", message=message),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


def sandbox_parser(name: str, default_port: int) -> argparse.ArgumentParser:
    """The command line the sandboxes share; a sandbox may add its own options."""
    parser = argparse.ArgumentParser(prog=f"python -m sandboxes.{name}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--state", type=Path, default=None, help="JSON state file")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SANDBOX_API_KEY"),
        help="bearer key clients must send (default: $SANDBOX_API_KEY)",
    )
    parser.add_argument("--log-level", default="info")
    return parser


def parse_sandbox_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse `argv` and insist on an API key."""
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("an API key is required: pass --api-key or set SANDBOX_API_KEY")
    return args


def serve(app: Starlette, args: argparse.Namespace) -> None:
    """Serve `app` with uvicorn on the parsed host and port."""
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=2,
    )


def run_main(
    *,
    name: str,
    create_app: Callable[..., Starlette],
    default_port: int,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse the command line shared by the sandboxes and serve the app with uvicorn.

    Args:
        name: The module name under `sandboxes`, for the usage line.
        create_app: The sandbox's `create_app(*, api_key, state_path)`.
        default_port: Port used when `--port` is not given.
        argv: Arguments (defaults to `sys.argv[1:]`).
    """
    parser = sandbox_parser(name, default_port)
    args = parse_sandbox_args(parser, argv)
    serve(create_app(api_key=args.api_key, state_path=args.state), args)

"""Shared sandbox plumbing: bearer auth, fault injection, request log, idempotency, JSON state."""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import string
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

JsonDict = dict[str, Any]
FaultKind = Literal["error", "timeout", "drop", "lost_response"]
Handler = Callable[[], tuple[int, JsonDict]]

REQUEST_LOG_SIZE = 10_000
MAX_IDEMPOTENCY_KEY_LENGTH = 255
_ID_ALPHABET = string.ascii_letters + string.digits
_INCOMPLETE_RESPONSE_LOG = "ASGI callable returned without completing response."

# Set in the task serving a deliberately dropped request, so the server's complaint about
# the incomplete response (which is the whole point) does not flood the logs.
_dropping: contextvars.ContextVar[bool] = contextvars.ContextVar("sandbox_dropping", default=False)

logger = logging.getLogger(__name__)


def new_id(prefix: str, length: int = 24) -> str:
    """An object id in Stripe's style: a type prefix and random letters and digits."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def now_iso() -> str:
    """The current UTC time as ISO 8601 with a `Z` suffix, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


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


@dataclass(frozen=True)
class FaultConfig:
    """What can go wrong on `/v1/*`, each rate a probability per request.

    `error_rate`, `timeout_rate`, `drop_rate` and `lost_response_rate` share one draw per
    request, so together they should not exceed 1. All but `lost_response` strike before
    the handler runs and change nothing; `lost_response` runs the handler (state changes)
    and then drops the connection, the case idempotency keys exist for.
    """

    error_rate: float = 0.0
    timeout_rate: float = 0.0
    drop_rate: float = 0.0
    lost_response_rate: float = 0.0
    latency_ms: int = 0
    hang_ms: int = 30_000
    seed: int | None = None
    paths: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: object) -> FaultConfig:
        """Validate a `POST /_sandbox/faults` body.

        Raises:
            ValueError: On unknown keys or out-of-range values.
        """
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name in ("error_rate", "timeout_rate", "drop_rate", "lost_response_rate"):
            rate = data.get(name, 0.0)
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
                raise ValueError(f"{name} must be a number between 0 and 1")
            values[name] = float(rate)
        for name, default in (("latency_ms", 0), ("hang_ms", 30_000)):
            ms = data.get(name, default)
            if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
                raise ValueError(f"{name} must be a non-negative integer")
            values[name] = ms
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
        paths = data.get("paths") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError("paths must be a list of path prefixes")
        return cls(**values, seed=seed, paths=tuple(paths))

    def to_json(self) -> JsonDict:
        """The settings as `GET /_sandbox/faults` shows them."""
        return {
            "error_rate": self.error_rate,
            "timeout_rate": self.timeout_rate,
            "drop_rate": self.drop_rate,
            "lost_response_rate": self.lost_response_rate,
            "latency_ms": self.latency_ms,
            "hang_ms": self.hang_ms,
            "seed": self.seed,
            "paths": list(self.paths),
        }

    def applies_to(self, path: str) -> bool:
        """Whether requests to `path` are subject to these faults."""
        return not self.paths or any(path.startswith(prefix) for prefix in self.paths)


class FaultInjector:
    """Draws a fault (or none) for each request from a seeded generator.

    One draw per matching request keeps the sequence of faults a pure function of the seed
    and the order of requests, which is what makes fault tests repeatable.
    """

    def __init__(self) -> None:
        self.config = FaultConfig()
        self._rng = random.Random()

    def configure(self, config: FaultConfig) -> None:
        """Replace the settings and restart the random sequence from the seed."""
        self.config = config
        self._rng = random.Random(config.seed)

    def draw(self, path: str) -> tuple[FaultKind | None, int]:
        """The fault for one request to `path` and the HTTP status if it is an error."""
        config = self.config
        if not config.applies_to(path):
            return None, 0
        roll = self._rng.random()
        threshold = 0.0
        kinds: tuple[tuple[FaultKind, float], ...] = (
            ("error", config.error_rate),
            ("timeout", config.timeout_rate),
            ("drop", config.drop_rate),
            ("lost_response", config.lost_response_rate),
        )
        for kind, rate in kinds:
            threshold += rate
            if roll < threshold:
                status = self._rng.choice((500, 503)) if kind == "error" else 0
                return kind, status
        return None, 0


class RequestLog:
    """The last `REQUEST_LOG_SIZE` `/v1` requests, oldest first."""

    def __init__(self, size: int = REQUEST_LOG_SIZE) -> None:
        self._entries: deque[JsonDict] = deque(maxlen=size)

    def start(self, scope: Scope) -> JsonDict:
        """Record a request as it arrives; the caller fills in status and fault later."""
        entry: JsonDict = {
            "ts": time.time(),
            "method": scope["method"],
            "path": scope["path"],
            "status": None,
            "idempotency_key": _header(scope, b"idempotency-key"),
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
        """Replace the file's content with `state`; a crash leaves the old or the new file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        state: The JSON-serialisable domain state; mutate it only while holding `lock`
            and call `save()` afterwards.
        lock: Serialises mutations so concurrent requests see consistent state.
        faults: The fault injector for `/v1/*`.
        log: The `/v1` request log.
    """

    def __init__(
        self,
        *,
        name: str,
        api_key: str,
        state_path: Path | None,
        initial_state: Callable[[], JsonDict],
    ) -> None:
        if not api_key:
            raise ValueError("the sandbox needs a non-empty API key")
        self.name = name
        self._api_key = api_key
        self._initial_state = initial_state
        self._file = StateFile(state_path) if state_path is not None else None
        self.lock = asyncio.Lock()
        self.faults = FaultInjector()
        self.log = RequestLog()
        self.state = initial_state()
        loaded = self._file.load() if self._file is not None else None
        if loaded is not None:
            self.state.update(loaded)
        self.state.setdefault("idempotency", {})

    def __repr__(self) -> str:
        return f"Sandbox(name={self.name!r})"

    def save(self) -> None:
        """Persist the state when the sandbox has a state file."""
        if self._file is not None:
            self._file.save(self.state)

    async def run_idempotent(
        self, request: Request, params: Sequence[tuple[str, str]], handler: Handler
    ) -> Response:
        """Run a mutating handler under the lock, honouring an `Idempotency-Key` header.

        Stripe's semantics: the first response for a key is saved (errors included) and
        replayed for the same method, path and parameters; other parameters under the same
        key get a 400 `idempotency_error`.

        Args:
            request: The incoming request (its key header, method and path are used).
            params: The request's parameters, compared on replay (order does not matter).
            handler: Computes `(status, body)`; may raise `ApiError`.
        """
        key = request.headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
            return ApiError(
                400,
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters long.",
                code="idempotency_key_invalid",
            ).response()
        fingerprint = _fingerprint(request.method, request.url.path, params)
        async with self.lock:
            records: JsonDict = self.state["idempotency"]
            if key is not None:
                saved = records.get(key)
                if saved is not None and saved["fingerprint"] != fingerprint:
                    return ApiError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters"
                        " they were first used with. Try using a key other than"
                        f" '{key}' if you meant to execute a different request.",
                        type_="idempotency_error",
                    ).response()
                if saved is not None:
                    return JSONResponse(
                        saved["body"],
                        status_code=saved["status"],
                        headers={"Idempotent-Replayed": "true", "Idempotency-Key": key},
                    )
            try:
                status, body = handler()
            except ApiError as exc:
                status, body = exc.status, exc.body
            if key is not None:
                records[key] = {
                    "fingerprint": fingerprint,
                    "status": status,
                    "body": body,
                    "created": int(time.time()),
                }
            self.save()
        headers = {"Idempotency-Key": key} if key is not None else None
        return JSONResponse(body, status_code=status, headers=headers)

    def build_app(self, routes: Sequence[BaseRoute]) -> Starlette:
        """A Starlette app serving `routes` plus health, admin, auth and fault handling."""
        _install_drop_log_filter()
        admin = [
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/_sandbox/faults", self._get_faults, methods=["GET"]),
            Route("/_sandbox/faults", self._set_faults, methods=["POST"]),
            Route("/_sandbox/requests", self._get_requests, methods=["GET"]),
            Route("/_sandbox/requests", self._clear_requests, methods=["DELETE"]),
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

    async def _reset(self, request: Request) -> Response:
        async with self.lock:
            self.state = self._initial_state()
            self.state.setdefault("idempotency", {})
            self.save()
        self.faults.configure(FaultConfig())
        self.log.clear()
        return JSONResponse({"ok": True})

    def _authorized(self, scope: Scope) -> str | None:
        """None when the bearer key matches, else the error code to answer with."""
        header = _header(scope, b"authorization")
        if not header:
            return "api_key_missing"
        expected = f"Bearer {self._api_key}".encode()
        if not hmac.compare_digest(header.encode(), expected):
            return "api_key_invalid"
        return None

    async def handle_api(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """Serve one `/v1` request: log it, inject its fault, check auth, then run `app`."""
        entry = self.log.start(scope)
        kind, error_status = self.faults.draw(scope["path"])
        config = self.faults.config
        if config.latency_ms and config.applies_to(scope["path"]):
            await asyncio.sleep(config.latency_ms / 1000)
        entry["fault"] = kind

        if kind == "error":
            entry["status"] = error_status
            body = error_body(
                type_="api_error",
                message=f"Sandbox fault: the {self.name} had an internal error. Please retry.",
            )
            await JSONResponse(body, status_code=error_status)(scope, receive, send)
            return
        if kind == "timeout":
            if await _wait_for_disconnect(receive, config.hang_ms / 1000):
                return
            entry["status"] = 504
            body = error_body(type_="api_error", message=f"Sandbox fault: {self.name} timed out.")
            await JSONResponse(body, status_code=504)(scope, receive, send)
            return
        if kind == "drop":
            await _drop_connection(send)
            return

        problem = self._authorized(scope)
        if problem is not None:
            entry["status"] = 401
            message = (
                "You did not provide an API key. Provide it in the Authorization header,"
                " using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
                if problem == "api_key_missing"
                else "Invalid API Key provided."
            )
            response = JSONResponse(
                error_body(type_="invalid_request_error", code=problem, message=message),
                status_code=401,
                headers={"WWW-Authenticate": f'Bearer realm="{self.name}"'},
            )
            await response(scope, receive, send)
            return

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            if kind != "lost_response":
                await send(message)

        await app(scope, receive, recording_send)
        if kind == "lost_response":
            await _drop_connection(send)


class _SandboxMiddleware:
    """Routes `/v1` traffic through `Sandbox.handle_api`; everything else passes through."""

    def __init__(self, app: ASGIApp, sandbox: Sandbox) -> None:
        self.app = app
        self.sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] + "/").startswith("/v1/"):
            await self.sandbox.handle_api(scope, receive, send, self.app)
        else:
            await self.app(scope, receive, send)


class _DropLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_dropping.get() and record.msg == _INCOMPLETE_RESPONSE_LOG)


def _install_drop_log_filter() -> None:
    server_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropLogFilter) for f in server_logger.filters):
        server_logger.addFilter(_DropLogFilter())


async def _drop_connection(send: Send) -> None:
    """Promise a body, send part of it, and give up: the server then closes the socket.

    The client sees a connection closed mid-response (httpx: `RemoteProtocolError`), not
    an HTTP error status.
    """
    _dropping.set(True)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"id": "', "more_body": True})


async def _wait_for_disconnect(receive: Receive, seconds: float) -> bool:
    """Wait up to `seconds`; True as soon as the client goes away.

    Returning early on disconnect keeps a hung request from holding up server shutdown.
    """

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnected(), timeout=seconds)
    except TimeoutError:
        return False
    return True


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _fingerprint(method: str, path: str, params: Sequence[tuple[str, str]]) -> str:
    canonical = json.dumps([method, path, sorted(params)], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("an API key is required: pass --api-key or set SANDBOX_API_KEY")
    app = create_app(api_key=args.api_key, state_path=args.state)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=2,
    )

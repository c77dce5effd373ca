"""Shared sandbox plumbing: state and its file, clock, idempotency, and the admin API."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sandboxes.faults import (
    SAVED_KINDS,
    FaultConfig,
    FaultInjector,
    FaultKind,
    install_drop_log_filter,
)
from sandboxes.gateway import (
    SCOPE_FAULT,
    SCOPE_REQUEST_ID,
    ApiGateway,
    RequestLog,
    SandboxMiddleware,
)
from sandboxes.idempotency import MAX_KEY_LENGTH, IdempotencyRecords, fingerprint
from sandboxes.wire import (
    ApiError,
    JsonDict,
    error_body,
    handle_api_error,
    handle_http_exception,
    read_json,
)

Handler = Callable[[], tuple[int, JsonDict]]

logger = logging.getLogger(__name__)


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
        self._initial_state = initial_state
        self._file = StateFile(state_path) if state_path is not None else None
        self.lock = asyncio.Lock()
        # Called (under the lock) after `POST /_sandbox/reset` replaced the state.
        self.reset_hooks: list[Callable[[], None]] = []
        self.faults = FaultInjector()
        self.log = RequestLog()
        self.gateway = ApiGateway(
            name=name, api_key=api_key, api_version=api_version, faults=self.faults, log=self.log
        )
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
            middleware=[Middleware(SandboxMiddleware, gateway=self.gateway)],
            exception_handlers={HTTPException: handle_http_exception, ApiError: handle_api_error},
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


async def _healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})

"""Webhook delivery as Stripe does it: signed POSTs, retries with backoff, delivery faults.

Each event goes to every enabled endpoint that wants its type, as its JSON body with
`Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
(https://docs.stripe.com/webhooks#verify-events). One worker per endpoint sends first
attempts in event order; a failed attempt (non-2xx or no answer) is retried later in a task
of its own, so one bad delivery never holds up the next. Delivery state lives in memory:
a restart forgets what was still to be sent, as the request log is forgotten.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, fields
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxes.webhook_endpoints import WebhookEndpoints
from sandboxes.wire import ApiError, JsonDict, read_json

USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
ATTEMPT_LOG_SIZE = 10_000
FLUSH_TIMEOUT_S = 30.0
_DELIVERY_FILTERS = ("event", "type", "endpoint")

logger = logging.getLogger(__name__)


def signature_header(secret: str, body: str, timestamp: int) -> str:
    """Stripe's `Stripe-Signature` value for `body` sent at `timestamp`."""
    signed = f"{timestamp}.{body}".encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True)
class DeliveryConfig:
    """How deliveries go wrong, and how failed ones are retried.

    Each delivery (one event to one endpoint) draws its fate once, when the event is
    created: `drop_rate` never sends it, `duplicate_rate` sends it twice, `reorder_rate`
    holds it back a random 0 to `reorder_max_s` seconds so that later events overtake it.
    With a `seed` the draws repeat for the same sequence of events. A failed attempt is
    retried after `retry_initial_s`, doubling up to `retry_max_s`, until `max_attempts`;
    an attempt waits `timeout_s` for the answer.
    """

    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    reorder_max_s: float = 2.0
    seed: int | None = None
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    max_attempts: int = 8
    timeout_s: float = 10.0

    @classmethod
    def from_json(cls, data: JsonDict) -> DeliveryConfig:
        """Validate a `POST /_sandbox/webhooks/faults` body; unnamed settings take defaults.

        Raises:
            ValueError: On unknown keys or out-of-range values.
        """
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown webhook settings: {', '.join(unknown)}")
        config = cls(**data)
        for name in ("drop_rate", "duplicate_rate", "reorder_rate"):
            if not _number(getattr(config, name)) or not 0 <= getattr(config, name) <= 1:
                raise ValueError(f"{name} must be a number between 0 and 1")
        for name in ("reorder_max_s", "retry_initial_s", "retry_max_s", "timeout_s"):
            if not _number(getattr(config, name)) or getattr(config, name) < 0:
                raise ValueError(f"{name} must be a non-negative number")
        if config.timeout_s == 0:
            raise ValueError("timeout_s must be positive")
        attempts = config.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError("max_attempts must be a positive integer")
        if config.seed is not None and (
            isinstance(config.seed, bool) or not isinstance(config.seed, int)
        ):
            raise ValueError("seed must be an integer")
        return config

    def to_json(self) -> JsonDict:
        """The settings as `GET /_sandbox/webhooks/faults` shows them."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def backoff_s(self, failed_attempts: int) -> float:
        """The wait before the next attempt after `failed_attempts` failures."""
        return min(self.retry_initial_s * 2 ** (failed_attempts - 1), self.retry_max_s)


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@dataclass
class _Delivery:
    """One event on its way to one endpoint."""

    number: int
    event_id: str
    event_type: str
    endpoint_id: str
    body: str
    dropped: bool = False
    duplicate: bool = False
    held_s: float = 0.0
    attempts: int = 0


class WebhookDispatcher:
    """Queues, sends, retries and records deliveries; see the module docstring."""

    def __init__(self, endpoints: WebhookEndpoints, *, on_delivered: Callable[[str], None]) -> None:
        self.endpoints = endpoints
        self.config = DeliveryConfig()
        self._on_delivered = on_delivered
        self._rng = random.Random()
        self._attempts: deque[JsonDict] = deque(maxlen=ATTEMPT_LOG_SIZE)
        self._queues: dict[str, asyncio.Queue[_Delivery]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._live: set[int] = set()
        self._numbers = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._tls: ssl.SSLContext | None = None

    def configure(self, config: DeliveryConfig) -> None:
        """Replace the settings and restart the random sequence."""
        self.config = config
        self._rng = random.Random(config.seed)

    # -- queueing (called under the sandbox lock, inside the event loop) ------------------

    def subscriber_count(self, event_type: str) -> int:
        """How many endpoints want events of `event_type`."""
        return len(self.endpoints.matching(event_type))

    def enqueue(self, event: JsonDict) -> None:
        """Queue `event` for every endpoint that wants it, drawing each delivery's faults."""
        endpoints = self.endpoints.matching(event["type"])
        if not endpoints:
            return
        # Indented as Stripe sends it: a receiver must verify the raw body, not a re-encoding.
        body = json.dumps(event, indent=2)
        for endpoint in endpoints:
            config, rng = self.config, self._rng
            # Four draws per delivery whatever the settings, so a seed fixes the sequence.
            drop, duplicate, reorder, hold = rng.random(), rng.random(), rng.random(), rng.random()
            copies = 2 if duplicate < config.duplicate_rate else 1
            for copy in range(copies):
                self._numbers += 1
                delivery = _Delivery(
                    number=self._numbers,
                    event_id=event["id"],
                    event_type=event["type"],
                    endpoint_id=endpoint["id"],
                    body=body,
                    dropped=drop < config.drop_rate,
                    duplicate=copy > 0,
                    held_s=hold * config.reorder_max_s if reorder < config.reorder_rate else 0.0,
                )
                if delivery.dropped and delivery.duplicate:
                    continue
                self._live.add(delivery.number)
                self._idle.clear()
                self._queue(endpoint["id"]).put_nowait(delivery)

    def _queue(self, endpoint_id: str) -> asyncio.Queue[_Delivery]:
        queue = self._queues.get(endpoint_id)
        if queue is None:
            queue = self._queues[endpoint_id] = asyncio.Queue()
            self._spawn(self._worker(queue))
        return queue

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self, delivery: _Delivery) -> None:
        self._live.discard(delivery.number)
        if not self._live:
            self._idle.set()

    # -- sending --------------------------------------------------------------------------

    async def _worker(self, queue: asyncio.Queue[_Delivery]) -> None:
        while True:
            delivery = await queue.get()
            try:
                if delivery.dropped:
                    self._record(delivery, status=None, error=None)
                    self._finish(delivery)
                elif delivery.held_s > 0:
                    self._spawn(self._keep_trying(delivery, first_wait_s=delivery.held_s))
                elif await self._attempt(delivery):
                    self._finish(delivery)
                else:
                    wait_s = self.config.backoff_s(delivery.attempts)
                    self._spawn(self._keep_trying(delivery, first_wait_s=wait_s))
            except Exception:
                logger.exception("webhook delivery of %s failed", delivery.event_id)
                self._finish(delivery)

    async def _keep_trying(self, delivery: _Delivery, *, first_wait_s: float) -> None:
        try:
            wait_s = first_wait_s
            while True:
                await asyncio.sleep(wait_s)
                if await self._attempt(delivery):
                    return
                wait_s = self.config.backoff_s(delivery.attempts)
        finally:
            self._finish(delivery)

    async def _attempt(self, delivery: _Delivery) -> bool:
        """Send once; True when there is nothing more to do (answered 2xx, out of attempts,
        or the endpoint is gone or disabled)."""
        await self._resumed.wait()
        endpoint = self.endpoints.get(delivery.endpoint_id)
        if endpoint is None or endpoint["status"] != "enabled":
            return True
        delivery.attempts += 1
        # Wall-clock time, not the sandbox clock: the receiver checks it against its own.
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Stripe-Signature": signature_header(endpoint["secret"], delivery.body, timestamp),
        }
        status: int | None = None
        error: str | None = None
        if self._tls is None:
            # Building the certificate store costs milliseconds: once, not per attempt.
            self._tls = httpx.create_ssl_context()
        try:
            # No proxy from the environment: the receiver is on the sandbox's own network.
            async with httpx.AsyncClient(
                timeout=self.config.timeout_s, trust_env=False, verify=self._tls
            ) as http:
                response = await http.post(
                    endpoint["url"], content=delivery.body.encode(), headers=headers
                )
            status = response.status_code
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            error = type(exc).__name__
        delivered = status is not None and 200 <= status < 300
        self._record(delivery, status=status, error=error)
        if delivered and not delivery.duplicate:
            self._on_delivered(delivery.event_id)
        return delivered or delivery.attempts >= self.config.max_attempts

    def _record(self, delivery: _Delivery, *, status: int | None, error: str | None) -> None:
        endpoint = self.endpoints.get(delivery.endpoint_id)
        self._attempts.append(
            {
                "ts": time.time(),
                "event": delivery.event_id,
                "type": delivery.event_type,
                "endpoint": delivery.endpoint_id,
                "url": endpoint["url"] if endpoint is not None else None,
                "attempt": delivery.attempts,
                "status": status,
                "error": error,
                "delivered": status is not None and 200 <= status < 300,
                "dropped": delivery.dropped,
                "duplicate": delivery.duplicate,
                "held_s": round(delivery.held_s, 3),
            }
        )

    # -- control ---------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Deliveries queued, held back, waiting to retry or being sent."""
        return len(self._live)

    @property
    def paused(self) -> bool:
        """Whether sending is paused."""
        return not self._resumed.is_set()

    def reset(self) -> None:
        """Forget every delivery and setting, and resume."""
        for task in list(self._tasks):
            task.cancel()
        self._queues.clear()
        self._live.clear()
        self._idle.set()
        self._resumed.set()
        self._attempts.clear()
        self.configure(DeliveryConfig())

    def status(self) -> JsonDict:
        """What `GET /_sandbox/webhooks/status` shows."""
        return {"paused": self.paused, "pending": self.pending}

    def routes(self) -> list[Route]:
        """The `/_sandbox/webhooks/*` admin endpoints."""
        return [
            Route("/_sandbox/webhooks/faults", self._get_faults, methods=["GET"]),
            Route("/_sandbox/webhooks/faults", self._set_faults, methods=["POST"]),
            Route("/_sandbox/webhooks/deliveries", self._get_deliveries, methods=["GET"]),
            Route("/_sandbox/webhooks/deliveries", self._clear_deliveries, methods=["DELETE"]),
            Route("/_sandbox/webhooks/status", self._get_status, methods=["GET"]),
            Route("/_sandbox/webhooks/pause", self._pause, methods=["POST"]),
            Route("/_sandbox/webhooks/resume", self._resume, methods=["POST"]),
            Route("/_sandbox/webhooks/flush", self._flush, methods=["POST"]),
        ]

    async def _get_faults(self, request: Request) -> Response:
        return JSONResponse(self.config.to_json())

    async def _set_faults(self, request: Request) -> Response:
        data = await read_json(request)
        try:
            config = DeliveryConfig.from_json(data)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), code="parameter_invalid") from exc
        self.configure(config)
        logger.info("processor sandbox webhook settings: %s", config.to_json())
        return JSONResponse(config.to_json())

    async def _get_deliveries(self, request: Request) -> Response:
        """Attempts oldest first; `event`, `type` and `endpoint` narrow them down."""
        wanted = {k: v for k, v in request.query_params.items() if k in _DELIVERY_FILTERS}
        attempts = [
            dict(attempt)
            for attempt in self._attempts
            if all(attempt[key] == value for key, value in wanted.items())
        ]
        return JSONResponse(attempts)

    async def _clear_deliveries(self, request: Request) -> Response:
        self._attempts.clear()
        return JSONResponse({"ok": True})

    async def _get_status(self, request: Request) -> Response:
        return JSONResponse(self.status())

    async def _pause(self, request: Request) -> Response:
        self._resumed.clear()
        return JSONResponse(self.status())

    async def _resume(self, request: Request) -> Response:
        self._resumed.set()
        return JSONResponse(self.status())

    async def _flush(self, request: Request) -> Response:
        """Wait until no delivery is pending (`timeout_s`, default 30): 200 when idle, 504
        when still busy, 409 at once while paused, since paused deliveries never finish."""
        data = await read_json(request)
        timeout_s = data.get("timeout_s", FLUSH_TIMEOUT_S)
        if not _number(timeout_s) or timeout_s < 0:
            raise ApiError(400, "timeout_s must be a non-negative number", param="timeout_s")
        if self.paused and self.pending:
            raise ApiError(409, "Webhook delivery is paused.", code="webhooks_paused")
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except TimeoutError:
            return JSONResponse(self.status(), status_code=504)
        return JSONResponse(self.status())

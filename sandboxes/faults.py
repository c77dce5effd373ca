"""Sandbox fault injection: what can go wrong on `/v1/*`, drawn per request, and a rate limiter.

A fault is drawn before the request reaches its handler. Most kinds answer at once and
change nothing; `lost_response` and `executed_saved_error` let the handler run first,
which is what makes them the cases idempotency keys exist for.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Send

FaultKind = Literal[
    "error",
    "timeout",
    "drop",
    "lost_response",
    "saved_error",
    "executed_saved_error",
    "rate_limit",
    "lock_timeout",
]
# Kinds that only mean something for a request saved under an idempotency key.
SAVED_KINDS: tuple[FaultKind, ...] = ("saved_error", "executed_saved_error")
# The order fixes which kind a draw lands on; new kinds go last so that existing seeds
# keep drawing the same sequence.
_RATES: tuple[tuple[FaultKind, str], ...] = (
    ("error", "error_rate"),
    ("timeout", "timeout_rate"),
    ("drop", "drop_rate"),
    ("lost_response", "lost_response_rate"),
    ("saved_error", "saved_error_rate"),
    ("executed_saved_error", "executed_saved_error_rate"),
    ("rate_limit", "rate_limit_rate"),
    ("lock_timeout", "lock_timeout_rate"),
)


@dataclass(frozen=True)
class FaultConfig:
    """What can go wrong on `/v1/*`, each rate a probability per request.

    The `*_rate` settings share one draw per request, so together they should not exceed 1.
    `error` is a 5xx before the handler runs, not saved (`Stripe-Should-Retry: true`);
    `saved_error` is a 500 saved under the idempotency key without running the handler and
    `executed_saved_error` a 500 saved after the handler ran (both `Stripe-Should-Retry:
    false`, and only on a keyed POST); `rate_limit` and `lock_timeout` are 429s.
    `rate_limit_per_s` (0 = off) is a real token-bucket limiter over all `/v1` requests,
    with a burst of the same size; its 429s and the injected ones carry `Retry-After:
    retry_after_s`.
    """

    error_rate: float = 0.0
    timeout_rate: float = 0.0
    drop_rate: float = 0.0
    lost_response_rate: float = 0.0
    saved_error_rate: float = 0.0
    executed_saved_error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    lock_timeout_rate: float = 0.0
    rate_limit_per_s: float = 0.0
    retry_after_s: int = 1
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
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for _, name in _RATES:
            rate = data.get(name, 0.0)
            if not _is_number(rate) or not 0 <= rate <= 1:
                raise ValueError(f"{name} must be a number between 0 and 1")
            values[name] = float(rate)
        per_s = data.get("rate_limit_per_s", 0.0)
        if not _is_number(per_s) or per_s < 0:
            raise ValueError("rate_limit_per_s must be a non-negative number")
        values["rate_limit_per_s"] = float(per_s)
        for name, default in (("retry_after_s", 1), ("latency_ms", 0), ("hang_ms", 30_000)):
            value = data.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer")
            values[name] = value
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
        paths = data.get("paths") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError("paths must be a list of path prefixes")
        return cls(**values, seed=seed, paths=tuple(paths))

    def to_json(self) -> dict[str, Any]:
        """The settings as `GET /_sandbox/faults` shows them."""
        shown: dict[str, Any] = {name: getattr(self, name) for _, name in _RATES}
        return {
            **shown,
            "rate_limit_per_s": self.rate_limit_per_s,
            "retry_after_s": self.retry_after_s,
            "latency_ms": self.latency_ms,
            "hang_ms": self.hang_ms,
            "seed": self.seed,
            "paths": list(self.paths),
        }

    def applies_to(self, path: str) -> bool:
        """Whether requests to `path` are subject to these faults."""
        return not self.paths or any(path.startswith(prefix) for prefix in self.paths)


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


class FaultInjector:
    """Draws a fault (or none) for each request from a seeded generator.

    One draw per matching request keeps the sequence of faults a pure function of the seed
    and the order of requests, which is what makes fault tests repeatable.
    """

    def __init__(self) -> None:
        self.config = FaultConfig()
        self._rng = random.Random()
        self.limiter = TokenBucket(0.0)

    def configure(self, config: FaultConfig) -> None:
        """Replace the settings, restart the random sequence and refill the limiter."""
        self.config = config
        self._rng = random.Random(config.seed)
        self.limiter = TokenBucket(config.rate_limit_per_s)

    def draw(self, path: str) -> tuple[FaultKind | None, int]:
        """The fault for one request to `path` and the HTTP status if it is an error."""
        config = self.config
        if not config.applies_to(path):
            return None, 0
        roll = self._rng.random()
        threshold = 0.0
        for kind, name in _RATES:
            threshold += getattr(config, name)
            if roll < threshold:
                status = self._rng.choice((500, 503)) if kind == "error" else 0
                return kind, status
        return None, 0


class TokenBucket:
    """A token bucket on the real monotonic clock: `rate` tokens a second, burst `rate`.

    The sandbox clock is not used: a limiter is about how fast requests really arrive.
    A rate of 0 admits everything.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        # A burst below one token would refuse every request.
        self.capacity = max(rate, 1.0)
        self._tokens = self.capacity
        self._at = time.monotonic()

    def admit(self) -> bool:
        """Take a token if there is one."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


# Set in the task serving a deliberately dropped request, so the server's complaint about
# the incomplete response (which is the whole point) does not flood the logs.
_dropping: contextvars.ContextVar[bool] = contextvars.ContextVar("sandbox_dropping", default=False)
_INCOMPLETE_RESPONSE_LOG = "ASGI callable returned without completing response."


def too_many_requests(kind: str, retry_after_s: int) -> Response:
    """Stripe's 429: `rate_limit` for too many requests, `lock_timeout` for a busy object."""
    if kind == "lock_timeout":
        message = (
            "This object cannot be accessed right now because another API request or"
            " Stripe process is currently accessing it. If you see this error"
            " intermittently, retry the request."
        )
    else:
        message = (
            "Request rate limit exceeded. You can learn more about rate limits here"
            " https://stripe.com/docs/rate-limits."
        )
    return JSONResponse(
        {"error": {"type": "invalid_request_error", "code": kind, "message": message}},
        status_code=429,
        headers={"Retry-After": str(retry_after_s), "Stripe-Should-Retry": "true"},
    )


class _DropLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_dropping.get() and record.msg == _INCOMPLETE_RESPONSE_LOG)


def install_drop_log_filter() -> None:
    server_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropLogFilter) for f in server_logger.filters):
        server_logger.addFilter(_DropLogFilter())


async def drop_connection(send: Send) -> None:
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


async def wait_for_disconnect(receive: Receive, seconds: float) -> bool:
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

"""What the processor and AMS clients share: one pooled httpx client for a JSON API with a key.

The key goes in the `Authorization` header only (never in a URL, a log line or an error);
redirects are not followed (a redirect would carry the key elsewhere); transport failures and
timeouts become the API's own retryable error, named by method and path, never by body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import quote

import httpx
from pydantic import SecretStr


class JsonApiClient:
    """Base of the API clients: the connection pool, the key, and transport errors.

    Subclasses set `unavailable` (their retryable error, constructed with a message) and
    `logger`, and build their calls on `_send`.

    Args:
        base_url: The API's base URL, e.g. `https://api.stripe.com`.
        api_key: Secret key sent as a Bearer token; never logged nor put in errors.
        timeout_s: Connect, read, write and pool timeout for each request.
        transport: Optional httpx transport (tests).
    """

    unavailable: ClassVar[type[Exception]]
    logger: ClassVar[logging.Logger]

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {api_key.get_secret_value()}",
                "Accept": "application/json",
                "User-Agent": "refundsaga/0.1",
            },
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        """One request; a timeout or a transport failure raises `unavailable`."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        try:
            response = await self._http.request(
                method, path, params=params, data=data, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise self.unavailable(f"{method} {path} timed out ({type(exc).__name__})") from exc
        except httpx.RequestError as exc:
            raise self.unavailable(f"{method} {path} failed ({type(exc).__name__})") from exc
        self.logger.debug(
            "%s %s -> %s (idempotency_key=%s, replayed=%s)",
            method,
            path,
            response.status_code,
            idempotency_key,
            response.headers.get("idempotent-replayed"),
        )
        return response


def segment(value: str) -> str:
    """`value` as one URL path segment (ids come from data, never trusted as paths)."""
    return quote(value, safe="")


def json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The response's JSON body when it is an object, else None."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None

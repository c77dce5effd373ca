"""The processor sandbox's request log: how many calls the sagas made, and when.

The sandbox keeps the last `REQUEST_LOG_SIZE` `/v1` requests (`GET /_sandbox/requests`). A
run that makes more reads it as it goes (`RequestLogTail`), merging by request id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from refundsaga.settings import Settings
from sandboxes.gateway import REQUEST_LOG_SIZE


def _auth(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.processor_api_key.get_secret_value()}"}


def processor_requests(settings: Settings) -> list[dict[str, Any]]:
    """The `/v1` requests the processor sandbox holds, oldest first."""
    log = httpx.get(
        f"{settings.processor_url}/_sandbox/requests", headers=_auth(settings), timeout=60
    )
    log.raise_for_status()
    return [r for r in log.json() if r["path"].startswith("/v1/")]


def clear_processor_requests(settings: Settings) -> None:
    """Forget every request so far (seeding, planning): the next read counts from here."""
    httpx.delete(
        f"{settings.processor_url}/_sandbox/requests", headers=_auth(settings), timeout=60
    ).raise_for_status()


class RequestLogTail:
    """Every `/v1` request since the log was cleared, read every `every_s` seconds.

    `overflowed` is set when a read found the log full with no request seen before: requests
    may have been dropped between two reads (read more often).
    """

    def __init__(self, settings: Settings, every_s: float = 30.0) -> None:
        self._settings = settings
        self._every_s = every_s
        self._seen: dict[str, dict[str, Any]] = {}
        self.overflowed = False

    def read(self) -> None:
        """Merge what the log holds now."""
        entries = processor_requests(self._settings)
        if (
            self._seen
            and len(entries) >= REQUEST_LOG_SIZE
            and entries[0]["request_id"] not in self._seen
        ):
            self.overflowed = True
        for entry in entries:
            self._seen[entry["request_id"]] = entry

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The requests read so far, by arrival."""
        return sorted(self._seen.values(), key=lambda r: r["ts"])

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RequestLogTail]:
        """Read in the background while the block runs, and once more at its end."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self._every_s)
                await asyncio.to_thread(self.read)

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(self.read)

"""Saved responses under idempotency keys, pruned once they are a day old, as Stripe does.

Stripe saves the status and body of the first request under a key once the endpoint has
started executing, replays them for the same parameters, and may prune a key once it is
at least 24 hours old: the same key after that executes again
(https://docs.stripe.com/api/idempotent_requests).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

KEY_TTL_S = 86_400
MAX_KEY_LENGTH = 255

JsonDict = dict[str, Any]


def fingerprint(method: str, path: str, params: Sequence[tuple[str, str]]) -> str:
    """What a replay must match: method, path and parameters in any order."""
    canonical = json.dumps([method, path, sorted(params)], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyRecords:
    """The saved responses, held in the sandbox's JSON state (a dict in insertion order).

    Records are added in the order of the sandbox clock, which only moves forward, so the
    oldest are first and pruning stops at the first young one.
    """

    def __init__(self, records: dict[str, JsonDict]) -> None:
        self._records = records

    def prune(self, now: float) -> None:
        """Forget every record at least `KEY_TTL_S` old by the sandbox clock."""
        records = self._records
        while records:
            oldest = next(iter(records))
            if now - records[oldest]["created"] < KEY_TTL_S:
                break
            del records[oldest]

    def get(self, key: str, now: float) -> JsonDict | None:
        """The record saved under `key`, unless it is missing or old enough to be pruned."""
        record = self._records.get(key)
        if record is not None and now - record["created"] >= KEY_TTL_S:
            del self._records[key]
            return None
        return record

    def put(
        self,
        key: str,
        *,
        fingerprint: str,
        status: int,
        body: JsonDict,
        headers: dict[str, str],
        request_id: str | None,
        now: float,
    ) -> None:
        """Save the first response for `key`."""
        self._records[key] = {
            "fingerprint": fingerprint,
            "status": status,
            "body": body,
            "headers": headers,
            "request_id": request_id,
            # A float: whole seconds would let a key a hair under a day old look a day old.
            "created": now,
        }

"""Stripe's Event objects: what changed, kept for `/v1/events` and handed to webhook delivery.

https://docs.stripe.com/api/events/object: `data.object` is the whole object as it was at
that moment, `data.previous_attributes` the attributes an `*.updated` event changed, and
`request` the API request that caused it (null fields when nothing did, e.g. a refund
that settled by itself).
"""

from __future__ import annotations

import fnmatch
from typing import Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxes.common import Sandbox
from sandboxes.gateway import SCOPE_REQUEST_ID
from sandboxes.params import array_param, page
from sandboxes.wire import ApiError, JsonDict, new_id

# Stripe keeps events 30 days; the count cap bounds the state file, rewritten on every change.
EVENT_RETENTION_S = 30 * 86_400
EVENT_LIMIT = 5_000
MAX_TYPES = 20
AUTOMATIC: JsonDict = {"id": None, "idempotency_key": None}


class Publisher(Protocol):
    """Where new events go to be delivered (the webhook dispatcher)."""

    def subscriber_count(self, event_type: str) -> int:
        """How many endpoints want events of `event_type`."""
        ...

    def enqueue(self, event: JsonDict) -> None:
        """Queue `event` for delivery to those endpoints."""
        ...


def request_cause(request: Request) -> JsonDict:
    """An event's `request`: the `/v1` request's id and idempotency key."""
    return {
        "id": request.scope.get(SCOPE_REQUEST_ID),
        "idempotency_key": request.headers.get("idempotency-key"),
    }


def dashboard_cause() -> JsonDict:
    """An event's `request` for a change made by hand (the dashboard has request ids too)."""
    return {"id": new_id("req_", 14), "idempotency_key": None}


def changed_attributes(before: JsonDict, after: JsonDict) -> JsonDict:
    """The top-level attributes that differ, with their old values."""
    return {key: value for key, value in before.items() if after.get(key) != value}


class EventLog:
    """The events in the sandbox state (`state["events"]`, by id, oldest first)."""

    def __init__(self, core: Sandbox, *, api_version: str, publisher: Publisher) -> None:
        self.core = core
        self.api_version = api_version
        self.publisher = publisher
        core.state.setdefault("events", {})

    @property
    def records(self) -> dict[str, JsonDict]:
        """Events by id, oldest first."""
        records: dict[str, JsonDict] = self.core.state["events"]
        return records

    def emit(
        self,
        event_type: str,
        obj: JsonDict,
        *,
        cause: JsonDict | None = None,
        previous: JsonDict | None = None,
    ) -> JsonDict:
        """Record an event about `obj` (a snapshot) and queue it for delivery.

        The caller holds the sandbox lock and saves the state afterwards.
        """
        data: JsonDict = {"object": obj}
        if previous is not None:
            data["previous_attributes"] = previous
        event: JsonDict = {
            "id": new_id("evt_"),
            "object": "event",
            "api_version": self.api_version,
            "created": self.core.now_int(),
            "data": data,
            "livemode": False,
            "pending_webhooks": self.publisher.subscriber_count(event_type),
            "request": dict(cause or AUTOMATIC),
            "type": event_type,
        }
        self._prune()
        self.records[event["id"]] = event
        self.publisher.enqueue(event)
        return event

    def delivered(self, event_id: str) -> None:
        """One endpoint answered 2xx: one webhook fewer pending.

        Not saved at once: the count is informational and goes out with the next change.
        """
        event = self.records.get(event_id)
        if event is not None and event["pending_webhooks"] > 0:
            event["pending_webhooks"] -= 1

    def _prune(self) -> None:
        records = self.records
        horizon = self.core.now_int() - EVENT_RETENTION_S
        while records:
            oldest = next(iter(records.values()))
            if oldest["created"] >= horizon and len(records) < EVENT_LIMIT:
                break
            del records[oldest["id"]]

    def routes(self) -> list[Route]:
        """`GET /v1/events` and `GET /v1/events/{id}`."""
        return [
            Route("/v1/events", self.list_events, methods=["GET"]),
            Route("/v1/events/{event_id}", self.get_event, methods=["GET"]),
        ]

    async def list_events(self, request: Request) -> Response:
        """`GET /v1/events?type=|types[]=&created[gte]=&limit=&starting_after=`, newest first.

        `type` may use `*` as a wildcard (`charge.dispute.*`), as at Stripe.
        """
        query = request.query_params
        types = array_param(query.multi_items(), "types")
        if types is not None and "type" in query:
            raise ApiError(
                400,
                "You may only specify one of these parameters: type, types.",
                code="parameter_invalid",
            )
        if types is not None and len(types) > MAX_TYPES:
            raise ApiError(
                400, f"You may pass at most {MAX_TYPES} types.", code="parameter_invalid"
            )
        pattern = query.get("type")
        async with self.core.lock:
            events = list(reversed(self.records.values()))
        if pattern is not None:
            events = [e for e in events if fnmatch.fnmatchcase(e["type"], pattern)]
        if types is not None:
            events = [e for e in events if e["type"] in types]
        return JSONResponse(page(events, query, url="/v1/events"))

    async def get_event(self, request: Request) -> Response:
        """`GET /v1/events/{id}`."""
        event_id = request.path_params["event_id"]
        async with self.core.lock:
            event = self.records.get(event_id)
            if event is None:
                raise ApiError(
                    404, f"No such event: '{event_id}'", code="resource_missing", param="id"
                )
            return JSONResponse(event)

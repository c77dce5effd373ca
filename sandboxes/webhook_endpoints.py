"""Webhook endpoints as Stripe's API keeps them: `/v1/webhook_endpoints`, plus one set at startup.

https://docs.stripe.com/api/webhook_endpoints: an endpoint has a `url`, the `enabled_events`
it wants (`*` for all) and a signing `secret` shown only in the answer that created it.
"""

from __future__ import annotations

import re
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxes.common import Sandbox
from sandboxes.params import array_param, form_params, page
from sandboxes.wire import ApiError, JsonDict, new_id

# Stripe checks names against its catalogue; the sandbox takes anything shaped like one, so
# a receiver may subscribe to events the sandbox never sends, as it may at Stripe.
_EVENT_NAME = re.compile(r"^[a-z_]+(\.[a-z_]+)+$")
_KNOWN_PARAMS = ("url", "description", "api_version", "connect")


def new_secret() -> str:
    """A signing secret in Stripe's form."""
    return "whsec_" + secrets.token_hex(24)


class WebhookEndpoints:
    """The endpoints in the sandbox state (`state["webhook_endpoints"]`, by id)."""

    def __init__(self, core: Sandbox) -> None:
        self.core = core
        core.state.setdefault("webhook_endpoints", {})

    @property
    def records(self) -> dict[str, JsonDict]:
        """Endpoints by id, oldest first (internal records, secrets included)."""
        records: dict[str, JsonDict] = self.core.state["webhook_endpoints"]
        return records

    def get(self, endpoint_id: str) -> JsonDict | None:
        """An endpoint's record, or None once it is deleted."""
        return self.records.get(endpoint_id)

    def matching(self, event_type: str) -> list[JsonDict]:
        """The enabled endpoints that want events of `event_type`."""
        return [
            record
            for record in self.records.values()
            if record["status"] == "enabled"
            and ("*" in record["enabled_events"] or event_type in record["enabled_events"])
        ]

    def add(
        self,
        url: str,
        enabled_events: list[str],
        *,
        secret: str | None = None,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> JsonDict:
        """Register an endpoint (caller holds the lock and saves)."""
        record: JsonDict = {
            "id": new_id("we_"),
            "url": url,
            "enabled_events": enabled_events,
            "secret": secret or new_secret(),
            "description": description,
            "metadata": metadata or {},
            "status": "enabled",
            "created": self.core.now_int(),
        }
        self.records[record["id"]] = record
        return record

    def configure_startup(self, url: str, secret: str) -> JsonDict:
        """The endpoint given on the command line: all events, signed with `secret`.

        An endpoint with the same URL (from the state file) is updated rather than joined by
        a second one, so a restart does not double every delivery.
        """
        _check_url(url)
        for record in self.records.values():
            if record["url"] == url:
                record.update(secret=secret, enabled_events=["*"], status="enabled")
                return record
        return self.add(url, ["*"], secret=secret, description="configured at startup")

    @staticmethod
    def view(record: JsonDict, *, with_secret: bool = False) -> JsonDict:
        """An endpoint as Stripe shows it; the secret only in the answer to its creation."""
        view: JsonDict = {
            "id": record["id"],
            "object": "webhook_endpoint",
            "api_version": None,
            "application": None,
            "created": record["created"],
            "description": record["description"],
            "enabled_events": list(record["enabled_events"]),
            "livemode": False,
            "metadata": dict(record["metadata"]),
            "status": record["status"],
            "url": record["url"],
        }
        if with_secret:
            view["secret"] = record["secret"]
        return view

    def routes(self) -> list[Route]:
        """`POST`/`GET /v1/webhook_endpoints`, `GET`/`DELETE /v1/webhook_endpoints/{id}`."""
        return [
            Route("/v1/webhook_endpoints", self.create_endpoint, methods=["POST"]),
            Route("/v1/webhook_endpoints", self.list_endpoints, methods=["GET"]),
            Route("/v1/webhook_endpoints/{endpoint_id}", self.get_endpoint, methods=["GET"]),
            Route("/v1/webhook_endpoints/{endpoint_id}", self.delete_endpoint, methods=["DELETE"]),
        ]

    async def create_endpoint(self, request: Request) -> Response:
        """`POST /v1/webhook_endpoints`: `url`, `enabled_events[]`, `description`, `metadata`."""
        params = await form_params(request)
        fields: dict[str, str] = {}
        metadata: dict[str, str] = {}
        for name, value in params:
            if name.startswith("metadata[") and name.endswith("]"):
                metadata[name[len("metadata[") : -1]] = value
            elif name in _KNOWN_PARAMS:
                fields[name] = value
            elif not name.startswith("enabled_events["):
                raise ApiError(400, f"Received unknown parameter: {name}", code="parameter_unknown")
        events = array_param(params, "enabled_events")
        for name, present in (("url", "url" in fields), ("enabled_events", events)):
            if not present:
                raise ApiError(
                    400, f"Missing required param: {name}.", code="parameter_missing", param=name
                )
        assert events is not None
        for event_type in events:
            if event_type != "*" and not _EVENT_NAME.match(event_type):
                raise ApiError(
                    400,
                    f"Invalid event type: {event_type}",
                    code="parameter_invalid",
                    param="enabled_events",
                )
        _check_url(fields["url"])

        def handler() -> tuple[int, JsonDict]:
            record = self.add(
                fields["url"],
                events,
                description=fields.get("description"),
                metadata=metadata,
            )
            return 200, self.view(record, with_secret=True)

        return await self.core.run_idempotent(request, params, handler)

    async def list_endpoints(self, request: Request) -> Response:
        """`GET /v1/webhook_endpoints`, newest first."""
        async with self.core.lock:
            data = [self.view(r) for r in reversed(self.records.values())]
        return JSONResponse(page(data, request.query_params, url="/v1/webhook_endpoints"))

    async def get_endpoint(self, request: Request) -> Response:
        """`GET /v1/webhook_endpoints/{id}`."""
        async with self.core.lock:
            return JSONResponse(self.view(self._record(request.path_params["endpoint_id"])))

    async def delete_endpoint(self, request: Request) -> Response:
        """`DELETE /v1/webhook_endpoints/{id}`: no more deliveries to it, retries included."""
        endpoint_id = request.path_params["endpoint_id"]
        async with self.core.lock:
            self._record(endpoint_id)
            del self.records[endpoint_id]
            self.core.save()
        return JSONResponse({"id": endpoint_id, "object": "webhook_endpoint", "deleted": True})

    def _record(self, endpoint_id: str) -> JsonDict:
        record = self.records.get(endpoint_id)
        if record is None:
            raise ApiError(
                404,
                f"No such webhook endpoint: '{endpoint_id}'",
                code="resource_missing",
                param="id",
            )
        return record


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ApiError(400, f"Invalid URL: {url}", code="url_invalid", param="url")

"""Processor sandbox: a Stripe-compatible refunds API over HTTP, with webhooks, disputes, and
admin and fault controls.

Run it with `python -m sandboxes.processor --port 8301 --state .data/processor.json`; add
`--webhook-url URL --webhook-secret whsec_...` (or `SANDBOX_WEBHOOK_URL` and
`SANDBOX_WEBHOOK_SECRET`) to send every event to one receiver from the start. Requests are
form-encoded and answers are JSON, amounts in integer minor units, as with Stripe
(https://docs.stripe.com/api/refunds).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxes.cli import parse_sandbox_args, sandbox_parser, serve
from sandboxes.common import Sandbox
from sandboxes.disputes import Disputes
from sandboxes.events import EventLog, request_cause
from sandboxes.ledger import REFUND_REASONS, Ledger
from sandboxes.params import EXPAND_PARAM, expand_paths, form_params, page, positive_int
from sandboxes.processor_admin import ProcessorAdmin
from sandboxes.webhook_endpoints import WebhookEndpoints
from sandboxes.webhooks import WebhookDispatcher
from sandboxes.wire import ApiError, JsonDict

DEFAULT_PORT = 8301
# The version answered when a request sends no `Stripe-Version`, as an account's default is.
DEFAULT_API_VERSION = "2025-12-15.clover"


def _initial_state() -> JsonDict:
    return {
        "charges": {},
        "refunds": {},
        "disputes": {},
        "events": {},
        "webhook_endpoints": {},
        "idempotency": {},
    }


class ProcessorSandbox:
    """The processor's domain on top of the shared `Sandbox` machinery.

    Args:
        api_key: The bearer key `/v1/*` and `/_sandbox/*` requests must carry.
        state_path: JSON file for the state; None keeps it in memory.
        webhook_url: A receiver to send every event to, registered at startup (and again
            after a reset) with `webhook_secret` as its signing secret.
        webhook_secret: The signing secret for `webhook_url`.
    """

    def __init__(
        self,
        *,
        api_key: str,
        state_path: Path | None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        if (webhook_url is None) != (webhook_secret is None):
            raise ValueError("webhook_url and webhook_secret go together")
        self.core = Sandbox(
            name="processor",
            api_key=api_key,
            state_path=state_path,
            initial_state=_initial_state,
            api_version=DEFAULT_API_VERSION,
        )
        self.endpoints = WebhookEndpoints(self.core)
        self.webhooks = WebhookDispatcher(self.endpoints, on_delivered=self._delivered)
        self.events = EventLog(self.core, api_version=DEFAULT_API_VERSION, publisher=self.webhooks)
        self.disputes = Disputes(self.core, self.events)
        self.ledger = Ledger(self.core, self.events, self.disputes)
        self.admin = ProcessorAdmin(self.core, self.ledger)
        self._startup_endpoint = (webhook_url, webhook_secret)
        self._settling: set[asyncio.Task[None]] = set()
        if webhook_url is not None:
            self._configure_startup_endpoint()
            self.core.save()
        self.core.reset_hooks += [self.webhooks.reset, self._configure_startup_endpoint]

    def _configure_startup_endpoint(self) -> None:
        url, secret = self._startup_endpoint
        if url is not None and secret is not None:
            self.endpoints.configure_startup(url, secret)

    def _delivered(self, event_id: str) -> None:
        self.events.delivered(event_id)

    def app(self) -> Starlette:
        """The ASGI app."""
        return self.core.build_app(
            [
                Route("/v1/refunds", self.create_refund, methods=["POST"]),
                Route("/v1/refunds", self.list_refunds, methods=["GET"]),
                Route("/v1/refunds/{refund_id}", self.get_refund, methods=["GET"]),
                Route("/v1/charges", self.list_charges, methods=["GET"]),
                Route("/v1/charges/{charge_id}", self.get_charge, methods=["GET"]),
                Route("/v1/charges/{charge_id}/refunds", self.list_charge_refunds, methods=["GET"]),
                *self.events.routes(),
                *self.endpoints.routes(),
                *self.disputes.routes(),
                *self.admin.routes(),
                *self.webhooks.routes(),
            ]
        )

    # -- /v1 endpoints -----------------------------------------------------------------

    async def create_refund(self, request: Request) -> Response:
        """`POST /v1/refunds` (form-encoded)."""
        params = await form_params(request)
        # Like Stripe, parameter validation fails before the endpoint "starts executing", so
        # those errors are not saved under the idempotency key; business errors are.
        expand = expand_paths(params, allowed=("charge",))
        fields, metadata = _refund_fields([p for p in params if not EXPAND_PARAM.match(p[0])])
        amount = positive_int(fields["amount"], "amount") if "amount" in fields else None

        def handler() -> tuple[int, JsonDict]:
            ledger = self.ledger
            charge = ledger.charge_for(fields.get("charge"), fields.get("payment_intent"))
            refund = ledger.add_refund(
                charge,
                amount,
                metadata=metadata,
                reason=fields.get("reason"),
                behavior=charge["refund_behavior"],
                cause=request_cause(request),
            )
            self._settle_later(refund)
            return 200, ledger.refund_view(refund, expand_charge="charge" in expand)

        return await self.core.run_idempotent(request, params, handler)

    def _settle_later(self, refund: JsonDict) -> None:
        """A pending refund on a charge with `settle_after_s` settles by itself then, and its
        webhooks say so (kept in memory: after a restart it settles on being read)."""
        delay = refund.get("settle_after_s")
        if refund["status"] != "pending" or delay is None:
            return
        loop = asyncio.get_running_loop()

        def start() -> None:
            task = loop.create_task(self._settle(refund["id"]))
            self._settling.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._settling.discard)

        loop.call_later(float(delay), start)

    async def _settle(self, refund_id: str) -> None:
        async with self.core.lock:
            refund = self.ledger.refunds.get(refund_id)
            if refund is None or refund["status"] != "pending":
                return
            self.ledger.settle(
                refund, "failed" if refund["behavior"] == "pending_fail" else "succeeded"
            )
            self.core.save()

    async def get_refund(self, request: Request) -> Response:
        """`GET /v1/refunds/{id}`; each GET of a pending refund brings it closer to settling."""
        expand = expand_paths(request.query_params.multi_items(), allowed=("charge",))
        async with self.core.lock:
            refund = self.ledger.refund(request.path_params["refund_id"])
            if refund["status"] == "pending" and refund["behavior"] in ("pending", "pending_fail"):
                refund["polls"] += 1
                if refund["polls"] >= refund["settle_after_polls"]:
                    self.ledger.settle(
                        refund, "failed" if refund["behavior"] == "pending_fail" else "succeeded"
                    )
                self.core.save()
            return JSONResponse(self.ledger.refund_view(refund, expand_charge="charge" in expand))

    async def list_refunds(self, request: Request) -> Response:
        """`GET /v1/refunds?charge=&payment_intent=&created[gte]=&limit=&starting_after=`,
        newest first."""
        query = request.query_params
        expand = expand_paths(query.multi_items(), allowed=("data.charge",))
        async with self.core.lock:
            refunds = list(self.ledger.refunds.values())
            for field in ("charge", "payment_intent"):
                if field in query:
                    refunds = [r for r in refunds if r[field] == query[field]]
            with_charge = "data.charge" in expand
            view = self.ledger.refund_view
            data = [view(r, expand_charge=with_charge) for r in reversed(refunds)]
        return JSONResponse(page(data, query, url="/v1/refunds"))

    async def list_charge_refunds(self, request: Request) -> Response:
        """`GET /v1/charges/{id}/refunds`, newest first."""
        charge_id = request.path_params["charge_id"]
        expand = expand_paths(request.query_params.multi_items(), allowed=("data.charge",))
        async with self.core.lock:
            charge = self.ledger.charge(charge_id)
            data = [
                self.ledger.refund_view(
                    self.ledger.refunds[rid], expand_charge="data.charge" in expand
                )
                for rid in reversed(charge["refund_ids"])
            ]
        return JSONResponse(
            page(data, request.query_params, url=f"/v1/charges/{charge_id}/refunds")
        )

    async def get_charge(self, request: Request) -> Response:
        """`GET /v1/charges/{id}`."""
        expand_paths(request.query_params.multi_items(), allowed=())
        async with self.core.lock:
            charge = self.ledger.charge(request.path_params["charge_id"])
            return JSONResponse(self.ledger.charge_view(charge))

    async def list_charges(self, request: Request) -> Response:
        """`GET /v1/charges?payment_intent=&created[gte]=&limit=&starting_after=`, newest first."""
        query = request.query_params
        expand_paths(query.multi_items(), allowed=())
        async with self.core.lock:
            charges = list(self.ledger.charges.values())
            if "payment_intent" in query:
                charges = [c for c in charges if c["payment_intent"] == query["payment_intent"]]
            data = [self.ledger.charge_view(c) for c in reversed(charges)]
        return JSONResponse(page(data, query, url="/v1/charges"))


def _refund_fields(params: Sequence[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Split Stripe form params into plain fields and `metadata[key]` entries, validated."""
    fields: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for name, value in params:
        if name.startswith("metadata[") and name.endswith("]") and len(name) > len("metadata[]"):
            metadata[name[len("metadata[") : -1]] = value
        elif name == "metadata" and value == "":
            metadata.clear()
        elif name in ("charge", "payment_intent", "amount", "reason"):
            fields[name] = value
        else:
            raise ApiError(400, f"Received unknown parameter: {name}", code="parameter_unknown")
    if "charge" not in fields and "payment_intent" not in fields:
        raise ApiError(
            400,
            "Missing required param: charge or payment_intent.",
            code="parameter_missing",
            param="charge",
        )
    reason = fields.get("reason")
    if reason is not None and reason not in REFUND_REASONS:
        raise ApiError(
            400,
            f"Invalid reason: must be one of {', '.join(REFUND_REASONS)}",
            code="parameter_invalid",
            param="reason",
        )
    return fields, metadata


def create_app(
    *,
    api_key: str,
    state_path: Path | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
) -> Starlette:
    """Build the processor sandbox app (see `ProcessorSandbox` for the arguments)."""
    return ProcessorSandbox(
        api_key=api_key,
        state_path=state_path,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
    ).app()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: serve the processor sandbox with uvicorn."""
    parser = sandbox_parser("processor", DEFAULT_PORT)
    parser.add_argument(
        "--webhook-url",
        default=os.environ.get("SANDBOX_WEBHOOK_URL") or None,
        help="send every event to this receiver (default: $SANDBOX_WEBHOOK_URL)",
    )
    parser.add_argument(
        "--webhook-secret",
        default=os.environ.get("SANDBOX_WEBHOOK_SECRET") or None,
        help="its signing secret, whsec_... (default: $SANDBOX_WEBHOOK_SECRET, which keeps"
        " it out of the process list)",
    )
    args = parse_sandbox_args(parser, argv)
    if (args.webhook_url is None) != (args.webhook_secret is None):
        parser.error("--webhook-url and --webhook-secret go together")
    try:
        app = create_app(
            api_key=args.api_key,
            state_path=args.state,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
        )
    except ApiError as exc:
        parser.error(f"--webhook-url: {exc}")
    serve(app, args)


if __name__ == "__main__":
    main()

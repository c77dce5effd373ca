"""The processor sandbox's admin API for charges and refunds (`/_sandbox/...`, JSON bodies).

What only the processor's side can do: take a payment, refund from the dashboard, decide
how refunds turn out, settle a pending refund, fail a succeeded one days later.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxes.common import Sandbox
from sandboxes.events import dashboard_cause
from sandboxes.ledger import (
    FAILURE_REASONS,
    PENDING_FAILURE_REASON,
    REFUND_BEHAVIORS,
    SETTLEABLE_STATUSES,
    SETTLED_STATUSES,
    Ledger,
)
from sandboxes.wire import ApiError, JsonDict, new_id, read_json


class ProcessorAdmin:
    """Admin endpoints over the ledger."""

    def __init__(self, core: Sandbox, ledger: Ledger) -> None:
        self.core = core
        self.ledger = ledger

    def routes(self) -> list[Route]:
        """The admin routes."""
        return [
            Route("/_sandbox/charges", self.create_charge, methods=["POST"]),
            Route(
                "/_sandbox/charges/{charge_id}/refund_outside",
                self.refund_outside,
                methods=["POST"],
            ),
            Route(
                "/_sandbox/charges/{charge_id}/refund_behavior",
                self.set_refund_behavior,
                methods=["POST"],
            ),
            Route("/_sandbox/refunds/{refund_id}/settle", self.settle, methods=["POST"]),
            Route("/_sandbox/refunds/{refund_id}/fail", self.fail, methods=["POST"]),
        ]

    async def create_charge(self, request: Request) -> Response:
        """`POST /_sandbox/charges`: create a paid charge to refund later."""
        data = await read_json(request)
        amount = data.get("amount")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise ApiError(400, "amount must be a positive integer", param="amount")
        currency = data.get("currency", "usd")
        if not isinstance(currency, str) or len(currency) != 3:
            raise ApiError(400, "currency must be a 3-letter code", param="currency")
        behavior = _refund_behavior(data.get("refund_behavior", "succeed"))
        polls = data.get("settle_after_polls", 2)
        if isinstance(polls, bool) or not isinstance(polls, int) or polls < 0:
            raise ApiError(400, "settle_after_polls must be a non-negative integer")
        # As at Stripe, a pending refund may also settle on its own, announced by webhook.
        settle_after_s = data.get("settle_after_s")
        if settle_after_s is not None and (
            isinstance(settle_after_s, bool)
            or not isinstance(settle_after_s, int | float)
            or not 0 <= settle_after_s <= 86_400
        ):
            raise ApiError(400, "settle_after_s must be a number of seconds from 0 to 86400")
        payment_intent = data.get("payment_intent")
        if payment_intent is not None and not isinstance(payment_intent, str):
            raise ApiError(400, "payment_intent must be a string", param="payment_intent")
        charge_id = data.get("id") or new_id("ch_")
        if not isinstance(charge_id, str):
            raise ApiError(400, "id must be a string", param="id")
        async with self.core.lock:
            if charge_id in self.ledger.charges:
                raise ApiError(
                    409, f"Charge {charge_id} already exists.", code="resource_already_exists"
                )
            charge: JsonDict = {
                "id": charge_id,
                "amount": amount,
                "currency": currency.lower(),
                "payment_intent": payment_intent,
                "refund_behavior": behavior,
                "settle_after_polls": polls,
                "settle_after_s": settle_after_s,
                "created": self.core.now_int(),
                "refund_ids": [],
            }
            self.ledger.charges[charge_id] = charge
            self.core.save()
            return JSONResponse(self.ledger.charge_view(charge))

    async def refund_outside(self, request: Request) -> Response:
        """`POST /_sandbox/charges/{id}/refund_outside`: money returned via the dashboard.

        The same as `POST /v1/refunds` without our metadata, but always succeeding; it
        emits the same events. With `ago_s`, a refund made that long ago, before any webhook
        endpoint listened: dated back and without events.
        """
        data = await read_json(request)
        amount = data.get("amount")
        if amount is not None and (
            isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0
        ):
            raise ApiError(400, "amount must be a positive integer", param="amount")
        ago_s = data.get("ago_s", 0)
        if isinstance(ago_s, bool) or not isinstance(ago_s, int) or ago_s < 0:
            raise ApiError(400, "ago_s must be a non-negative integer", param="ago_s")
        async with self.core.lock:
            charge = self.ledger.charge(request.path_params["charge_id"])
            refund = self.ledger.add_refund(
                charge,
                amount,
                metadata={"source": "dashboard"},
                reason="requested_by_customer",
                behavior="succeed",
                cause=dashboard_cause(),
                ago_s=ago_s,
            )
            self.core.save()
            return JSONResponse(self.ledger.refund_view(refund))

    async def set_refund_behavior(self, request: Request) -> Response:
        """`POST /_sandbox/charges/{id}/refund_behavior` with `{"refund_behavior": ...}`.

        Changes how refunds created from now on turn out; existing refunds keep theirs.
        """
        data = await read_json(request)
        behavior = _refund_behavior(data.get("refund_behavior"))
        async with self.core.lock:
            charge = self.ledger.charge(request.path_params["charge_id"])
            charge["refund_behavior"] = behavior
            self.core.save()
            return JSONResponse({**self.ledger.charge_view(charge), "refund_behavior": behavior})

    async def settle(self, request: Request) -> Response:
        """`POST /_sandbox/refunds/{id}/settle` with `{"status": "succeeded"|"failed"|"canceled"}`.

        Settles a `pending` or `requires_action` refund; settling again to the same status
        is a no-op, to another one a 409.
        """
        data = await read_json(request)
        status = data.get("status")
        if status not in SETTLED_STATUSES:
            raise ApiError(
                400, f"status must be one of {', '.join(SETTLED_STATUSES)}", param="status"
            )
        refund_id = request.path_params["refund_id"]
        async with self.core.lock:
            refund = self._refund(refund_id)
            if refund["status"] != status:
                if refund["status"] not in SETTLEABLE_STATUSES:
                    raise ApiError(
                        409,
                        f"Refund {refund_id} is already {refund['status']}.",
                        code="refund_not_pending",
                    )
                self.ledger.settle(refund, status)
                self.core.save()
            return JSONResponse(self.ledger.refund_view(refund))

    async def fail(self, request: Request) -> Response:
        """`POST /_sandbox/refunds/{id}/fail` with an optional `{"failure_reason": ...}`.

        A succeeded refund fails later, as Stripe reports days after the fact: the money
        goes back to the charge (`amount_refunded` goes down) and `refund.updated` and
        `refund.failed` are emitted. Failing a failed refund again is a no-op; any other
        status is a 409.
        """
        data = await read_json(request)
        reason = data.get("failure_reason", PENDING_FAILURE_REASON)
        if reason not in FAILURE_REASONS:
            raise ApiError(
                400,
                f"failure_reason must be one of {', '.join(FAILURE_REASONS)}",
                param="failure_reason",
            )
        refund_id = request.path_params["refund_id"]
        async with self.core.lock:
            refund = self._refund(refund_id)
            if refund["status"] != "failed":
                if refund["status"] != "succeeded":
                    raise ApiError(
                        409,
                        f"Refund {refund_id} is {refund['status']}, not succeeded.",
                        code="refund_not_succeeded",
                    )
                self.ledger.set_status(refund, "failed", reason)
                self.core.save()
            return JSONResponse(self.ledger.refund_view(refund))

    def _refund(self, refund_id: str) -> JsonDict:
        refund = self.ledger.refunds.get(refund_id)
        if refund is None:
            raise ApiError(404, f"No such refund: '{refund_id}'", code="resource_missing")
        return refund


def _refund_behavior(value: object) -> str:
    if not isinstance(value, str) or value not in REFUND_BEHAVIORS:
        raise ApiError(
            400,
            f"refund_behavior must be one of {', '.join(REFUND_BEHAVIORS)}",
            param="refund_behavior",
        )
    return value

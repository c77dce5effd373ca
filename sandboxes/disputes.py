"""Disputes (chargebacks) as Stripe shows them, opened and closed through the admin API.

https://docs.stripe.com/api/disputes: a dispute is opened on a charge (the charge becomes
`disputed`), and closed `won` or `lost`. Here a lost dispute is when the money goes back to
the cardholder: the dispute gains its withdrawal in `balance_transactions` and
`charge.dispute.funds_withdrawn` follows `charge.dispute.closed`. A charge with an open or
lost dispute can no longer be refunded (`charge_disputed`).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxes.common import Sandbox
from sandboxes.events import EventLog, dashboard_cause
from sandboxes.params import page
from sandboxes.wire import ApiError, JsonDict, new_id, read_json

DISPUTE_REASONS = (
    "bank_cannot_process",
    "check_returned",
    "credit_not_processed",
    "customer_initiated",
    "debit_not_authorized",
    "duplicate",
    "fraudulent",
    "general",
    "incorrect_account_details",
    "insufficient_funds",
    "noncompliant",
    "product_not_received",
    "product_unacceptable",
    "subscription_canceled",
    "unrecognized",
)
CLOSED_STATUSES = ("won", "lost")
# Stripe gives the merchant about a week to answer with evidence.
EVIDENCE_DUE_S = 7 * 86_400


class Disputes:
    """The disputes in the sandbox state (`state["disputes"]`, by id, oldest first)."""

    def __init__(self, core: Sandbox, events: EventLog) -> None:
        self.core = core
        self.events = events
        core.state.setdefault("disputes", {})

    @property
    def records(self) -> dict[str, JsonDict]:
        """Disputes by id, oldest first."""
        records: dict[str, JsonDict] = self.core.state["disputes"]
        return records

    def blocks_refunds(self, charge: JsonDict) -> bool:
        """Whether the charge's dispute (if any) is open or lost."""
        dispute = self.records.get(charge.get("dispute_id") or "")
        return dispute is not None and dispute["status"] != "won"

    @staticmethod
    def view(dispute: JsonDict) -> JsonDict:
        """A dispute as Stripe shows it."""
        return {
            "id": dispute["id"],
            "object": "dispute",
            "amount": dispute["amount"],
            "balance_transactions": [dict(t) for t in dispute["balance_transactions"]],
            "charge": dispute["charge"],
            "created": dispute["created"],
            "currency": dispute["currency"],
            "evidence_details": {
                "due_by": dispute["created"] + EVIDENCE_DUE_S,
                "has_evidence": False,
                "past_due": False,
                "submission_count": 0,
            },
            "is_charge_refundable": False,
            "livemode": False,
            "metadata": {},
            "payment_intent": dispute["payment_intent"],
            "reason": dispute["reason"],
            "status": dispute["status"],
        }

    def routes(self) -> list[Route]:
        """`/v1/disputes` and the admin endpoints that open and close disputes."""
        return [
            Route("/v1/disputes", self.list_disputes, methods=["GET"]),
            Route("/v1/disputes/{dispute_id}", self.get_dispute, methods=["GET"]),
            Route("/_sandbox/charges/{charge_id}/dispute", self.admin_open, methods=["POST"]),
            Route("/_sandbox/disputes/{dispute_id}/close", self.admin_close, methods=["POST"]),
        ]

    async def list_disputes(self, request: Request) -> Response:
        """`GET /v1/disputes?charge=&payment_intent=&created[gte]=&limit=&starting_after=`."""
        query = request.query_params
        async with self.core.lock:
            disputes = list(self.records.values())
        for field in ("charge", "payment_intent"):
            if field in query:
                disputes = [d for d in disputes if d[field] == query[field]]
        data = [self.view(d) for d in reversed(disputes)]
        return JSONResponse(page(data, query, url="/v1/disputes"))

    async def get_dispute(self, request: Request) -> Response:
        """`GET /v1/disputes/{id}`."""
        async with self.core.lock:
            return JSONResponse(self.view(self._dispute(request.path_params["dispute_id"])))

    async def admin_open(self, request: Request) -> Response:
        """`POST /_sandbox/charges/{id}/dispute` (JSON `amount`, `reason`): the cardholder
        disputes the charge; `amount` defaults to the whole charge."""
        data = await read_json(request)
        amount = data.get("amount")
        if amount is not None and (
            isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0
        ):
            raise ApiError(400, "amount must be a positive integer", param="amount")
        reason = data.get("reason", "general")
        if reason not in DISPUTE_REASONS:
            raise ApiError(
                400, f"reason must be one of {', '.join(DISPUTE_REASONS)}", param="reason"
            )
        charge_id = request.path_params["charge_id"]
        async with self.core.lock:
            charge = self.core.state["charges"].get(charge_id)
            if charge is None:
                raise ApiError(404, f"No such charge: '{charge_id}'", code="resource_missing")
            if charge.get("dispute_id"):
                raise ApiError(
                    409, f"Charge {charge_id} is already disputed.", code="charge_disputed"
                )
            if amount is not None and amount > charge["amount"]:
                raise ApiError(400, "amount exceeds the charge's amount", param="amount")
            dispute: JsonDict = {
                "id": new_id("dp_"),
                "amount": charge["amount"] if amount is None else amount,
                "balance_transactions": [],
                "charge": charge_id,
                "created": self.core.now_int(),
                "currency": charge["currency"],
                "payment_intent": charge["payment_intent"],
                "reason": reason,
                "status": "needs_response",
            }
            self.records[dispute["id"]] = dispute
            charge["dispute_id"] = dispute["id"]
            self.events.emit("charge.dispute.created", self.view(dispute), cause=dashboard_cause())
            self.core.save()
            return JSONResponse(self.view(dispute))

    async def admin_close(self, request: Request) -> Response:
        """`POST /_sandbox/disputes/{id}/close` (JSON `status`: `lost` or `won`)."""
        data = await read_json(request)
        status = data.get("status")
        if status not in CLOSED_STATUSES:
            raise ApiError(400, "status must be lost or won", param="status")
        async with self.core.lock:
            dispute = self._dispute(request.path_params["dispute_id"])
            if dispute["status"] in CLOSED_STATUSES:
                if dispute["status"] == status:
                    return JSONResponse(self.view(dispute))
                raise ApiError(
                    409,
                    f"Dispute {dispute['id']} is already {dispute['status']}.",
                    code="dispute_already_closed",
                )
            dispute["status"] = status
            if status == "lost":
                dispute["balance_transactions"].append(self._withdrawal(dispute))
            closed = self.view(dispute)
            cause = dashboard_cause()
            self.events.emit("charge.dispute.closed", closed, cause=cause)
            if status == "lost":
                self.events.emit("charge.dispute.funds_withdrawn", closed, cause=cause)
            self.core.save()
            return JSONResponse(closed)

    def _withdrawal(self, dispute: JsonDict) -> JsonDict:
        return {
            "id": new_id("txn_"),
            "object": "balance_transaction",
            "amount": -dispute["amount"],
            "currency": dispute["currency"],
            "created": self.core.now_int(),
            "description": f"Chargeback withdrawal for {dispute['charge']}",
            "fee": 0,
            "net": -dispute["amount"],
            "reporting_category": "dispute",
            "status": "available",
            "type": "adjustment",
        }

    def _dispute(self, dispute_id: str) -> JsonDict:
        dispute = self.records.get(dispute_id)
        if dispute is None:
            raise ApiError(
                404, f"No such dispute: '{dispute_id}'", code="resource_missing", param="id"
            )
        return dispute

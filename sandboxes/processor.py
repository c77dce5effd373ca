"""Processor sandbox: a Stripe-compatible refunds API over HTTP, with admin and fault controls.

Run it with `python -m sandboxes.processor --port 8301 --state .data/processor.json`.
Requests are form-encoded and answers are JSON, amounts in integer minor units, as with
Stripe (https://docs.stripe.com/api/refunds).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxes.common import ApiError, JsonDict, Sandbox, new_id, read_json, run_main

DEFAULT_PORT = 8301
# The version answered when a request sends no `Stripe-Version`, as an account's default is.
DEFAULT_API_VERSION = "2025-12-15.clover"
# How a charge's refunds turn out: the status they are created with, and for the pending
# ones, how reading them settles them.
REFUND_BEHAVIORS = ("succeed", "pending", "pending_fail", "fail", "requires_action", "canceled")
SETTLED_STATUSES = ("succeeded", "failed", "canceled")
# Only these can still change; the others are final, as at Stripe.
SETTLEABLE_STATUSES = ("pending", "requires_action")
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")
# Statuses that hold money back from the charge; failed and canceled refunds give it back.
COUNTED_STATUSES = ("succeeded", "pending", "requires_action")
PENDING_FAILURE_REASON = "lost_or_stolen_card"
IMMEDIATE_FAILURE_REASON = "declined"
_INTEGER = re.compile(r"^[0-9]+$")
_EXPAND_PARAM = re.compile(r"^expand(\[[0-9]*\])?$")


def _initial_state() -> JsonDict:
    return {"charges": {}, "refunds": {}, "idempotency": {}}


class ProcessorSandbox:
    """The processor's domain logic on top of the shared `Sandbox` machinery."""

    def __init__(self, *, api_key: str, state_path: Path | None) -> None:
        self.core = Sandbox(
            name="processor",
            api_key=api_key,
            state_path=state_path,
            initial_state=_initial_state,
            api_version=DEFAULT_API_VERSION,
        )

    @property
    def charges(self) -> dict[str, JsonDict]:
        """Charges by id (internal records)."""
        charges: dict[str, JsonDict] = self.core.state["charges"]
        return charges

    @property
    def refunds(self) -> dict[str, JsonDict]:
        """Refunds by id, in creation order (internal records)."""
        refunds: dict[str, JsonDict] = self.core.state["refunds"]
        return refunds

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
                Route("/_sandbox/charges", self.admin_create_charge, methods=["POST"]),
                Route(
                    "/_sandbox/charges/{charge_id}/refund_outside",
                    self.admin_refund_outside,
                    methods=["POST"],
                ),
                Route(
                    "/_sandbox/charges/{charge_id}/refund_behavior",
                    self.admin_set_refund_behavior,
                    methods=["POST"],
                ),
                Route("/_sandbox/refunds/{refund_id}/settle", self.admin_settle, methods=["POST"]),
            ]
        )

    # -- views -------------------------------------------------------------------------

    def refund_view(self, refund: JsonDict, *, expand_charge: bool = False) -> JsonDict:
        """A refund as Stripe shows it; `expand_charge` puts the charge object in `charge`."""
        charge = refund["charge"]
        return {
            "id": refund["id"],
            "object": "refund",
            "amount": refund["amount"],
            "currency": refund["currency"],
            "charge": self.charge_view(self.charges[charge]) if expand_charge else charge,
            "payment_intent": refund["payment_intent"],
            "status": refund["status"],
            "failure_reason": refund["failure_reason"],
            "reason": refund["reason"],
            "metadata": dict(refund["metadata"]),
            "created": refund["created"],
        }

    def amount_refunded(self, charge: JsonDict) -> int:
        """What refunds still holding money (`COUNTED_STATUSES`) have taken from a charge."""
        return sum(
            self.refunds[rid]["amount"]
            for rid in charge["refund_ids"]
            if self.refunds[rid]["status"] in COUNTED_STATUSES
        )

    def charge_view(self, charge: JsonDict) -> JsonDict:
        """A charge as Stripe shows it, with its refunds expanded."""
        refunded = self.amount_refunded(charge)
        refunds = [self.refund_view(self.refunds[rid]) for rid in reversed(charge["refund_ids"])]
        return {
            "id": charge["id"],
            "object": "charge",
            "amount": charge["amount"],
            "amount_captured": charge["amount"],
            "amount_refunded": refunded,
            "captured": True,
            "paid": True,
            "status": "succeeded",
            "currency": charge["currency"],
            "refunded": refunded >= charge["amount"],
            "payment_intent": charge["payment_intent"],
            "created": charge["created"],
            "refunds": {
                "object": "list",
                "data": refunds,
                "has_more": False,
                "url": f"/v1/charges/{charge['id']}/refunds",
            },
        }

    # -- domain operations (caller holds the lock) -------------------------------------

    def _add_refund(
        self,
        charge: JsonDict,
        amount: int | None,
        *,
        metadata: dict[str, str],
        reason: str | None,
        behavior: str,
    ) -> JsonDict:
        rest = charge["amount"] - self.amount_refunded(charge)
        if rest <= 0:
            raise ApiError(
                400,
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
                param="charge",
            )
        amount = rest if amount is None else amount
        if amount > rest:
            raise ApiError(
                400,
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({rest}).",
                code="amount_too_large",
                param="amount",
            )
        status, failure_reason = {
            "succeed": ("succeeded", None),
            "pending": ("pending", None),
            "pending_fail": ("pending", None),
            "fail": ("failed", IMMEDIATE_FAILURE_REASON),
            "requires_action": ("requires_action", None),
            "canceled": ("canceled", None),
        }[behavior]
        refund: JsonDict = {
            "id": new_id("re_"),
            "amount": amount,
            "currency": charge["currency"],
            "charge": charge["id"],
            "payment_intent": charge["payment_intent"],
            "status": status,
            "failure_reason": failure_reason,
            "reason": reason,
            "metadata": metadata,
            "created": self.core.now_int(),
            "behavior": behavior,
            "settle_after_polls": charge["settle_after_polls"],
            "polls": 0,
        }
        self.refunds[refund["id"]] = refund
        charge["refund_ids"].append(refund["id"])
        return refund

    def _charge_for(self, charge_id: str | None, payment_intent: str | None) -> JsonDict:
        if charge_id is not None:
            charge = self.charges.get(charge_id)
            if charge is None:
                raise ApiError(
                    404, f"No such charge: '{charge_id}'", code="resource_missing", param="charge"
                )
            if payment_intent is not None and charge["payment_intent"] != payment_intent:
                raise ApiError(
                    400,
                    f"Charge {charge_id} does not belong to PaymentIntent {payment_intent}.",
                    code="parameter_invalid",
                    param="payment_intent",
                )
            return charge
        matches = [c for c in self.charges.values() if c["payment_intent"] == payment_intent]
        if not matches:
            raise ApiError(
                404,
                f"No such payment_intent: '{payment_intent}'",
                code="resource_missing",
                param="payment_intent",
            )
        return matches[-1]

    def _settle(self, refund: JsonDict, status: str) -> None:
        refund["status"] = status
        refund["failure_reason"] = PENDING_FAILURE_REASON if status == "failed" else None

    # -- /v1 endpoints -----------------------------------------------------------------

    async def create_refund(self, request: Request) -> Response:
        """`POST /v1/refunds` (form-encoded)."""
        params = await _form_params(request)
        # Like Stripe, parameter validation fails before the endpoint "starts executing", so
        # those errors are not saved under the idempotency key; business errors are.
        expand = _expand(params, allowed=("charge",))
        fields, metadata = _refund_fields([p for p in params if not _EXPAND_PARAM.match(p[0])])
        amount = _positive_int(fields["amount"], "amount") if "amount" in fields else None

        def handler() -> tuple[int, JsonDict]:
            charge = self._charge_for(fields.get("charge"), fields.get("payment_intent"))
            refund = self._add_refund(
                charge,
                amount,
                metadata=metadata,
                reason=fields.get("reason"),
                behavior=charge["refund_behavior"],
            )
            return 200, self.refund_view(refund, expand_charge="charge" in expand)

        return await self.core.run_idempotent(request, params, handler)

    async def get_refund(self, request: Request) -> Response:
        """`GET /v1/refunds/{id}`; each GET of a pending refund brings it closer to settling."""
        expand = _expand(request.query_params.multi_items(), allowed=("charge",))
        refund_id = request.path_params["refund_id"]
        async with self.core.lock:
            refund = self.refunds.get(refund_id)
            if refund is None:
                raise ApiError(
                    404, f"No such refund: '{refund_id}'", code="resource_missing", param="id"
                )
            if refund["status"] == "pending" and refund["behavior"] in ("pending", "pending_fail"):
                refund["polls"] += 1
                if refund["polls"] >= refund["settle_after_polls"]:
                    self._settle(
                        refund, "failed" if refund["behavior"] == "pending_fail" else "succeeded"
                    )
                self.core.save()
            return JSONResponse(self.refund_view(refund, expand_charge="charge" in expand))

    async def list_refunds(self, request: Request) -> Response:
        """`GET /v1/refunds?charge=&payment_intent=&limit=&starting_after=`, newest first."""
        query = request.query_params
        expand = _expand(query.multi_items(), allowed=("data.charge",))
        async with self.core.lock:
            refunds = list(self.refunds.values())
            if "charge" in query:
                refunds = [r for r in refunds if r["charge"] == query["charge"]]
            if "payment_intent" in query:
                refunds = [r for r in refunds if r["payment_intent"] == query["payment_intent"]]
            with_charge = "data.charge" in expand
            data = [self.refund_view(r, expand_charge=with_charge) for r in reversed(refunds)]
        return JSONResponse(_page(data, query, url="/v1/refunds"))

    async def list_charge_refunds(self, request: Request) -> Response:
        """`GET /v1/charges/{id}/refunds`, newest first."""
        charge_id = request.path_params["charge_id"]
        expand = _expand(request.query_params.multi_items(), allowed=("data.charge",))
        async with self.core.lock:
            charge = self._get_charge(charge_id)
            data = [
                self.refund_view(self.refunds[rid], expand_charge="data.charge" in expand)
                for rid in reversed(charge["refund_ids"])
            ]
        return JSONResponse(
            _page(data, request.query_params, url=f"/v1/charges/{charge_id}/refunds")
        )

    async def get_charge(self, request: Request) -> Response:
        """`GET /v1/charges/{id}`."""
        _expand(request.query_params.multi_items(), allowed=())
        async with self.core.lock:
            charge = self._get_charge(request.path_params["charge_id"])
            return JSONResponse(self.charge_view(charge))

    async def list_charges(self, request: Request) -> Response:
        """`GET /v1/charges?payment_intent=&limit=&starting_after=`, newest first."""
        query = request.query_params
        _expand(query.multi_items(), allowed=())
        async with self.core.lock:
            charges = list(self.charges.values())
            if "payment_intent" in query:
                charges = [c for c in charges if c["payment_intent"] == query["payment_intent"]]
            data = [self.charge_view(c) for c in reversed(charges)]
        return JSONResponse(_page(data, query, url="/v1/charges"))

    def _get_charge(self, charge_id: str) -> JsonDict:
        charge = self.charges.get(charge_id)
        if charge is None:
            raise ApiError(
                404, f"No such charge: '{charge_id}'", code="resource_missing", param="id"
            )
        return charge

    # -- admin endpoints ---------------------------------------------------------------

    async def admin_create_charge(self, request: Request) -> Response:
        """`POST /_sandbox/charges` (JSON): create a paid charge to refund later."""
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
        payment_intent = data.get("payment_intent")
        if payment_intent is not None and not isinstance(payment_intent, str):
            raise ApiError(400, "payment_intent must be a string", param="payment_intent")
        charge_id = data.get("id") or new_id("ch_")
        if not isinstance(charge_id, str):
            raise ApiError(400, "id must be a string", param="id")
        async with self.core.lock:
            if charge_id in self.charges:
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
                "created": self.core.now_int(),
                "refund_ids": [],
            }
            self.charges[charge_id] = charge
            self.core.save()
            return JSONResponse(self.charge_view(charge))

    async def admin_refund_outside(self, request: Request) -> Response:
        """`POST /_sandbox/charges/{id}/refund_outside`: money returned via the dashboard."""
        data = await read_json(request)
        amount = data.get("amount")
        if amount is not None and (
            isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0
        ):
            raise ApiError(400, "amount must be a positive integer", param="amount")
        async with self.core.lock:
            charge = self._get_charge(request.path_params["charge_id"])
            refund = self._add_refund(
                charge,
                amount,
                metadata={"source": "dashboard"},
                reason="requested_by_customer",
                behavior="succeed",
            )
            self.core.save()
            return JSONResponse(self.refund_view(refund))

    async def admin_set_refund_behavior(self, request: Request) -> Response:
        """`POST /_sandbox/charges/{id}/refund_behavior` with `{"refund_behavior": ...}`.

        Changes how refunds created from now on turn out; existing refunds keep theirs.
        """
        data = await read_json(request)
        behavior = _refund_behavior(data.get("refund_behavior"))
        async with self.core.lock:
            charge = self._get_charge(request.path_params["charge_id"])
            charge["refund_behavior"] = behavior
            self.core.save()
            return JSONResponse({**self.charge_view(charge), "refund_behavior": behavior})

    async def admin_settle(self, request: Request) -> Response:
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
            refund = self.refunds.get(refund_id)
            if refund is None:
                raise ApiError(404, f"No such refund: '{refund_id}'", code="resource_missing")
            if refund["status"] != status:
                if refund["status"] not in SETTLEABLE_STATUSES:
                    raise ApiError(
                        409,
                        f"Refund {refund_id} is already {refund['status']}.",
                        code="refund_not_pending",
                    )
                self._settle(refund, status)
                self.core.save()
            return JSONResponse(self.refund_view(refund))


def _refund_behavior(value: object) -> str:
    if not isinstance(value, str) or value not in REFUND_BEHAVIORS:
        raise ApiError(
            400,
            f"refund_behavior must be one of {', '.join(REFUND_BEHAVIORS)}",
            param="refund_behavior",
        )
    return value


def _expand(params: Iterable[tuple[str, str]], *, allowed: Sequence[str]) -> set[str]:
    """The `expand[]` (or stripe-python's `expand[0]`) paths of a request, all `allowed`.

    Raises:
        ApiError: 400 for a path this endpoint cannot expand, in Stripe's words.
    """
    paths = {value for name, value in params if _EXPAND_PARAM.match(name)}
    for path in sorted(paths):
        if path not in allowed:
            message = f"This property cannot be expanded ({path})."
            if f"data.{path}" in allowed:
                message += f" You may want to try expanding 'data.{path}' instead."
            raise ApiError(400, message)
    return paths


async def _form_params(request: Request) -> list[tuple[str, str]]:
    raw = await request.body()
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"Invalid form body: {exc}") from exc


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


def _positive_int(value: str, param: str) -> int:
    if not _INTEGER.match(value):
        raise ApiError(
            400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=param
        )
    number = int(value)
    if number <= 0:
        raise ApiError(
            400,
            "This value must be greater than or equal to 1.",
            code="parameter_invalid_integer",
            param=param,
        )
    return number


def _page(data: list[JsonDict], query: Any, *, url: str) -> JsonDict:
    """One page of a Stripe list from newest-first `data`."""
    limit_raw = query.get("limit", "10")
    if not _INTEGER.match(limit_raw) or not 1 <= int(limit_raw) <= 100:
        raise ApiError(
            400,
            "Invalid limit: must be an integer between 1 and 100.",
            code="parameter_invalid_integer",
            param="limit",
        )
    limit = int(limit_raw)
    start = 0
    starting_after = query.get("starting_after")
    if starting_after:
        ids = [item["id"] for item in data]
        if starting_after not in ids:
            raise ApiError(
                400,
                f"No such object: '{starting_after}'",
                code="resource_missing",
                param="starting_after",
            )
        start = ids.index(starting_after) + 1
    page = data[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "has_more": start + limit < len(data),
        "url": url,
    }


def create_app(*, api_key: str, state_path: Path | None = None) -> Starlette:
    """Build the processor sandbox app.

    Args:
        api_key: The bearer key `/v1/*` requests must carry.
        state_path: JSON file to load state from and save it to after each change;
            None keeps state in memory only.
    """
    return ProcessorSandbox(api_key=api_key, state_path=state_path).app()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: serve the processor sandbox with uvicorn."""
    run_main(name="processor", create_app=create_app, default_port=DEFAULT_PORT, argv=argv)


if __name__ == "__main__":
    main()

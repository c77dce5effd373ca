"""Signing what a person sends when REFUND_SIGNING_KEY_FILE is set: their key, and a decision
sent to a saga signed for its current run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel
from temporalio.client import Client

from console import operations as ops
from console.cli.output import fail, load_settings, run
from refundsaga.contracts import DecisionReceipt
from refundsaga.settings import Settings
from refundsaga.temporal import connect

_Decision = TypeVar("_Decision", bound=BaseModel)


def signing_key(settings: Settings) -> Ed25519PrivateKey | None:
    """The signing key when REFUND_SIGNING_KEY_FILE is set; a bad file is a one-line refusal."""
    try:
        return ops.signing_key(settings)
    except ops.Refused as e:
        fail(str(e))


def send_signed(
    ref: str,
    decision: _Decision,
    sign: Callable[..., str],
    send: Callable[[Client, str, _Decision], Awaitable[DecisionReceipt]],
) -> tuple[str, DecisionReceipt]:
    """Send a decision to a saga (`refund-42` or `42`) with `send`, signed by `sign` for the
    saga's current run when a key is set; returns the workflow id and the saga's receipt.

    The signature binds the decision to that run, so it cannot be replayed onto a later saga
    for the same purchase (same workflow id).
    """
    workflow_id = ops.resolve_workflow_id(ref)
    settings = load_settings()
    key = signing_key(settings)

    async def go() -> DecisionReceipt:
        client = await connect(settings)
        signed = decision
        if key is not None:
            run_id = (await ops.describe(client, workflow_id)).run_id
            signature = sign(key, workflow_id, decision, run_id=run_id)
            signed = decision.model_copy(update={"signature": signature})
        return await send(client, workflow_id, signed)

    return workflow_id, run(go())

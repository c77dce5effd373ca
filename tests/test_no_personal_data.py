"""No secret and no personal data leaves the store: a completed saga's history (payloads
decoded), the logs at DEBUG, the notifications and the live worker's log file hold no API key,
no learner's name and no email."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from temporalio.client import WorkflowHandle

from console import operations as ops
from console.seed import seed_purchase
from refundsaga.contracts import ApprovalDecision, RefundRequest, SagaState
from refundsaga.settings import SANDBOX_AMS_KEY, SANDBOX_PROCESSOR_KEY
from refundsaga.store import OasisStore
from refundsaga.temporal import connect
from tests.fixtures.sandboxes import AMS_TEST_KEY, PROCESSOR_TEST_KEY
from tests.fixtures.stack import LiveStack
from tests.fixtures.temporal import SagaWorld
from workflows.refund_saga import RefundSaga


def learner(store: OasisStore, user_id: int) -> tuple[str, str]:
    """The seeded user's name and email ("Demo Learner <tag>", "learner-<tag>@example.org")."""
    with store.engine.connect() as connection:
        name, email = connection.execute(
            text("SELECT name, email FROM users WHERE id = :id"), {"id": user_id}
        ).one()
    assert name.startswith("Demo Learner ") and email.endswith("@example.org")
    return str(name), str(email)


def _decoded(node: Any, key: str = "") -> list[str]:
    """Every string in a history JSON, with payload data and metadata base64-decoded."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _decoded(v, k if key != "metadata" else "data")]
    if isinstance(node, list):
        return [s for item in node for s in _decoded(item, key)]
    if not isinstance(node, str):
        return [str(node)]
    if key == "data":
        try:
            return [base64.b64decode(node, validate=True).decode("utf-8", "replace"), node]
        except (binascii.Error, ValueError):
            pass
    return [node]


async def history_text(handle: WorkflowHandle[Any, Any]) -> str:
    """The saga's exported history with every payload readable, as one text."""
    exported = (await handle.fetch_history()).to_json()
    decoded = "\n".join(_decoded(json.loads(exported)))
    # The plain export too: a secret must not be there in any form.
    return exported + "\n" + decoded


def leaks(haystack: str, needles: dict[str, str]) -> list[str]:
    lowered = haystack.lower()
    return [what for what, needle in needles.items() if needle.lower() in lowered]


async def test_a_completed_saga_leaves_no_key_name_or_email_in_history_or_logs(
    saga_world: SagaWorld, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    world = saga_world
    purchase = world.seed("standard")
    name, email = learner(world.store, purchase.user_id)
    handle = await world.start(purchase, reason="duplicate purchase")
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(
        RefundSaga.decide, ApprovalDecision(approver="bob", comment="checked the order")
    )
    result = await handle.result()
    assert result.state == SagaState.COMPLETED

    needles = {
        "processor key": PROCESSOR_TEST_KEY,
        "AMS key": AMS_TEST_KEY,
        "name": name,
        "email": email,
        "email local part": email.split("@")[0],
    }
    history = await history_text(handle)
    # The search works: identifiers the saga does carry are found in the decoded history.
    assert purchase.charge_id in history and "duplicate purchase" in history
    assert leaks(history, needles) == []

    records = caplog.records
    assert any(r.name.startswith(("temporalio", "refundsaga", "httpx")) for r in records)
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in records)
    assert leaks(logged, needles) == []
    captured = capfd.readouterr()
    assert leaks(captured.out + captured.err, needles) == []

    notes = "\n".join(n.model_dump_json() for n in world.notifier.sent)
    assert leaks(notes, needles) == []
    audit = "\n".join(e.model_dump_json() for e in world.store.audit_trail(workflow_id=handle.id))
    assert "approved" in audit and leaks(audit, needles) == []
    assert leaks(result.model_dump_json(), needles) == []


@pytest.mark.devserver
async def test_the_live_worker_log_and_history_hold_no_key_name_or_email(
    live_stack: LiveStack,
) -> None:
    settings = live_stack.settings
    store = OasisStore.from_url(settings.resolved_database_url)
    try:
        with httpx.Client(timeout=10.0) as http:
            purchase = seed_purchase(
                store,
                http,
                processor_url=settings.processor_url,
                ams_url=settings.ams_url,
                processor_api_key=settings.processor_api_key.get_secret_value(),
                ams_api_key=settings.ams_api_key.get_secret_value(),
                scenario="standard",
            )
        name, email = learner(store, purchase.user_id)
    finally:
        store.close()
    client = await connect(settings)
    request = RefundRequest(
        purchase_id=purchase.purchase_id, reason="duplicate purchase", requested_by="sam"
    )
    handle = await ops.start_refund(client, settings, request)
    await ops.wait_for_state(client, handle.id, {SagaState.AWAITING_APPROVAL}, timeout_s=60)
    await ops.decide(client, handle.id, ApprovalDecision(approver="carol", comment="ok"))
    done = await ops.wait_for_state(client, handle.id, {SagaState.COMPLETED}, timeout_s=60)
    assert done.state == SagaState.COMPLETED

    needles = {
        "processor key": settings.processor_api_key.get_secret_value(),
        "AMS key": settings.ams_api_key.get_secret_value(),
        "sandbox processor key": SANDBOX_PROCESSOR_KEY,
        "sandbox AMS key": SANDBOX_AMS_KEY,
        "name": name,
        "email": email,
    }
    history = await history_text(handle)
    assert purchase.charge_id in history
    assert leaks(history, needles) == []
    worker_log = (settings.data_dir / "logs" / "worker.log").read_text(errors="replace")
    # The worker did log this saga: the check is not vacuous.
    assert handle.id in worker_log
    assert leaks(worker_log, needles) == []

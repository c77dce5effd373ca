"""Attributable approvals: Ed25519 signatures over decisions, checked by the saga (validator
and signal path) on the time-skipping server, recorded in the audit trail, made by the CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowUpdateFailedError

from refundsaga.approval import policy_from_settings, refusal_reason
from refundsaga.contracts import ApprovalDecision, ApprovalRecord, SagaState
from refundsaga.settings import Settings
from refundsaga.signing import (
    SigningError,
    canonical_message,
    generate_private_key,
    load_private_key,
    public_key_b64,
    sign_decision,
    verify_decision,
    write_private_key,
)
from tests.fixtures.temporal import SagaWorld
from workflows.refund_saga import RefundSaga

REPO = Path(__file__).resolve().parents[1]
BOB = generate_private_key()
CAROL = generate_private_key()
SAM = generate_private_key()
KEYS = {"bob": public_key_b64(BOB), "carol": public_key_b64(CAROL), "sam": public_key_b64(SAM)}
WF, RUN = "refund-42", "run-1"
REAL = "<bob's real signature>"


def signed(key: Any, decision: ApprovalDecision, workflow_id: str = WF, run_id: str = RUN) -> Any:
    signature = sign_decision(key, workflow_id, decision, run_id=run_id)
    return decision.model_copy(update={"signature": signature})


# --- the signature itself ---------------------------------------------------------------------


def test_a_signed_decision_verifies_for_its_saga_only() -> None:
    decision = signed(BOB, ApprovalDecision(approver="bob", comment="checked"))
    assert verify_decision(KEYS["bob"], WF, decision, run_id=RUN)
    assert not verify_decision(KEYS["bob"], "refund-43", decision, run_id=RUN)
    # Same workflow id, a later saga for the same purchase: not replayable.
    assert not verify_decision(KEYS["bob"], WF, decision, run_id="run-2")
    assert not verify_decision(KEYS["carol"], WF, decision, run_id=RUN)


@pytest.mark.parametrize(
    "change",
    [{"approve": False}, {"comment": "checked twice"}, {"approver": "carol"}],
    ids=["flipped", "comment", "approver"],
)
def test_any_change_to_the_decision_breaks_the_signature(change: dict[str, Any]) -> None:
    decision = signed(BOB, ApprovalDecision(approver="bob", comment="checked"))
    assert not verify_decision(KEYS["bob"], WF, decision.model_copy(update=change), run_id=RUN)


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [
        (KEYS["bob"], None),
        (KEYS["bob"], base64.b64encode(b"x" * 64).decode()),
        (KEYS["bob"], base64.b64encode(b"short").decode()),
        ("not base64!", REAL),
        (base64.b64encode(b"k" * 31).decode(), REAL),
    ],
    ids=["unsigned", "garbage", "short", "bad-key", "short-key"],
)
def test_malformed_signatures_and_keys_never_verify(public_key: str, signature: str | None) -> None:
    decision = ApprovalDecision(approver="bob", comment="checked")
    if signature == REAL:
        signature = signed(BOB, decision).signature
    candidate = decision.model_copy(update={"signature": signature})
    assert not verify_decision(public_key, WF, candidate, run_id=RUN)


def test_the_canonical_message_names_the_saga_and_the_whole_decision() -> None:
    message = json.loads(canonical_message(WF, RUN, ApprovalDecision(approver="bob")))
    assert message == {
        "context": "refundsaga/approval-decision/v1",
        "workflow_id": WF,
        "run_id": RUN,
        "approver": "bob",
        "approve": True,
        "comment": "",
    }


def test_key_files_are_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "bob.pem"
    write_private_key(BOB, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_key_b64(load_private_key(path)) == KEYS["bob"]
    with pytest.raises(SigningError, match="refusing to overwrite"):
        write_private_key(CAROL, path)
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(SigningError, match="not an unencrypted PEM"):
        load_private_key(tmp_path / "junk.pem")
    with pytest.raises(SigningError, match="cannot read"):
        load_private_key(tmp_path / "missing.pem")


# --- the policy ---------------------------------------------------------------------------


def test_the_policy_carries_the_keys_and_refuses_a_malformed_one() -> None:
    policy = policy_from_settings(Settings(approver_public_keys=KEYS))
    assert policy.approver_public_keys == KEYS
    with pytest.raises(ValueError, match="bob"):
        policy_from_settings(Settings(approver_public_keys={"bob": "bm90IGEga2V5"}))


def test_refusals_with_keys_and_the_old_rules_without() -> None:
    with_keys = policy_from_settings(Settings(approver_public_keys=KEYS))
    without = policy_from_settings(Settings())

    def reason(policy: Any, decision: ApprovalDecision, **kw: Any) -> str | None:
        return refusal_reason(
            policy,
            approver=decision.approver,
            requested_by="sam",
            decisions=kw.get("decisions", []),
            decision=decision,
            workflow_id=WF,
            run_id=RUN,
        )

    plain = ApprovalDecision(approver="bob")
    assert reason(without, plain) is None
    assert "not signed" in (reason(with_keys, plain) or "")
    assert reason(with_keys, signed(BOB, plain)) is None
    assert "does not match" in (reason(with_keys, signed(CAROL, plain)) or "")
    alice = signed(BOB, ApprovalDecision(approver="alice"))
    assert "no public key" in (reason(with_keys, alice) or "")
    # The allowlist and one decision per approver come first, keys or not.
    assert "allowlist" in (reason(with_keys, ApprovalDecision(approver="mallory")) or "")
    assert "allowlist" in (reason(without, ApprovalDecision(approver="mallory")) or "")
    earlier = [ApprovalRecord(approver="bob", approve=True, at="2026-01-01T00:00:00Z")]
    assert "already decided" in (reason(without, plain, decisions=earlier) or "")


# --- the saga on the time-skipping server --------------------------------------------------


def approvals_in_audit(world: SagaWorld, workflow_id: str) -> list[Any]:
    return [e for e in world.store.audit_trail(workflow_id=workflow_id) if e.event == "approved"]


@pytest.mark.saga_settings(approver_public_keys=KEYS)
async def test_the_saga_refuses_unsigned_and_forged_decisions_and_records_the_signature(
    saga_world: SagaWorld,
) -> None:
    world = saga_world
    purchase = world.seed("standard")
    handle = await world.start(purchase, signer=SAM)
    waiting = await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    assert waiting.plan is not None and waiting.plan.policy.approver_public_keys == KEYS
    run_id = handle.result_run_id or ""
    bob = ApprovalDecision(approver="bob", comment="checked")

    forged = {
        "unsigned": (bob, "not signed"),
        "carol's key as bob": (signed(CAROL, bob, handle.id, run_id), "does not match"),
        "other saga": (signed(BOB, bob, "refund-other", run_id), "does not match"),
        "other run": (signed(BOB, bob, handle.id, "other-run"), "does not match"),
        "flipped": (
            signed(BOB, bob.model_copy(update={"approve": False}), handle.id, run_id).model_copy(
                update={"approve": True}
            ),
            "does not match",
        ),
    }
    for name, (decision, why) in forged.items():
        with pytest.raises(WorkflowUpdateFailedError) as info:
            await handle.execute_update(RefundSaga.decide, decision)
        assert why in str(info.value.cause), name

    # The signal path: the same refusal, recorded as ignored, nothing applied.
    await handle.signal(RefundSaga.approve, bob)
    # A reject signed by bob sent as the approve signal is flipped by the handler: refused.
    rejection = signed(BOB, bob.model_copy(update={"approve": False}), handle.id, run_id)
    await handle.signal(RefundSaga.approve, rejection)
    status = await world.status(handle)
    for _ in range(400):
        if len(status.ignored) >= 2:
            break
        status = await world.status(handle)
    assert [i.reason for i in status.ignored] == [
        "bob's decision is not signed: approvals must be signed "
        "(set REFUND_SIGNING_KEY_FILE for the CLI)",
        "bob's signature does not match this decision on this saga",
    ]
    assert status.approvals == [] and status.state == SagaState.AWAITING_APPROVAL

    good = signed(BOB, bob, handle.id, run_id)
    receipt = await handle.execute_update(RefundSaga.decide, good)
    assert receipt.approvals == 1
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert [a.signature for a in result.approvals] == [good.signature]

    (approved,) = [
        e for e in world.store.audit_trail(workflow_id=handle.id) if e.event == "approved"
    ]
    assert approved.actor == "bob" and approved.detail["signature"] == good.signature
    # Attributable later, from the audit trail alone.
    recorded = ApprovalDecision(
        approver=approved.actor,
        approve=True,
        comment=approved.detail["comment"],
        signature=approved.detail["signature"],
    )
    assert verify_decision(KEYS["bob"], handle.id, recorded, run_id=run_id)


async def test_without_keys_unsigned_decisions_work_and_the_old_rules_hold(
    saga_world: SagaWorld,
) -> None:
    world = saga_world
    purchase = world.seed("standard")
    handle = await world.start(purchase, requested_by="alice")
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    for approver, why in (("alice", "four-eyes"), ("mallory", "allowlist")):
        with pytest.raises(WorkflowUpdateFailedError) as info:
            await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver=approver))
        assert why in str(info.value.cause)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="carol"))
    result = await handle.result()
    assert result.state == SagaState.COMPLETED and result.approvals[0].signature is None
    (approved,) = [
        e for e in world.store.audit_trail(workflow_id=handle.id) if e.event == "approved"
    ]
    assert "signature" not in approved.detail


# --- the CLI signs with REFUND_SIGNING_KEY_FILE ----------------------------------------------


async def refund_cli(
    world: SagaWorld, *args: str, key_file: Path | None
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; in a thread, so the in-process worker keeps serving the saga."""
    env = {
        **os.environ,
        "REFUND_TEMPORAL_ADDRESS": world.client.service_client.config.target_host,
        "REFUND_TEMPORAL_NAMESPACE": world.client.namespace,
        "COLUMNS": "200",
    }
    env.pop("REFUND_SIGNING_KEY_FILE", None)
    if key_file is not None:
        env["REFUND_SIGNING_KEY_FILE"] = str(key_file)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "console.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.mark.saga_settings(approver_public_keys=KEYS)
async def test_the_cli_signs_approvals_with_the_key_file(
    saga_world: SagaWorld, tmp_path: Path
) -> None:
    world = saga_world
    bob_file, carol_file = tmp_path / "bob.pem", tmp_path / "carol.pem"
    write_private_key(BOB, bob_file)
    write_private_key(CAROL, carol_file)
    handle = await world.start(world.seed("standard"), signer=SAM)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)

    unsigned = await refund_cli(world, "approve", handle.id, "--as", "bob", key_file=None)
    assert unsigned.returncode == 2 and "not signed" in unsigned.stderr
    wrong = await refund_cli(world, "approve", handle.id, "--as", "bob", key_file=carol_file)
    assert wrong.returncode == 2 and "does not match" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    missing = await refund_cli(
        world, "approve", handle.id, "--as", "bob", key_file=tmp_path / "nope"
    )
    assert missing.returncode == 2 and "REFUND_SIGNING_KEY_FILE" in missing.stderr

    done = await refund_cli(world, "approve", handle.id, "--as", "bob", "--json", key_file=bob_file)
    assert done.returncode == 0, done.stderr
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    (record,) = result.approvals
    assert record.signature and verify_decision(
        KEYS["bob"],
        handle.id,
        ApprovalDecision(approver="bob", signature=record.signature),
        run_id=handle.result_run_id or "",
    )


def test_keys_generate_writes_a_private_key_and_prints_the_public_one(tmp_path: Path) -> None:
    out = tmp_path / "dana.pem"
    cmd = [sys.executable, "-m", "console.cli", "keys", "generate", "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--as", "dana", "--json"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["public_key"] == public_key_b64(load_private_key(out))
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_a_forged_signature_cannot_abort_a_sandboxed_worker() -> None:
    # cryptography raised its first InvalidSignature under the workflow sandbox's importer and
    # the process aborted; in this suite earlier tests warm that import up, so run it alone.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_forged_identity.py::"
            "test_with_signing_on_a_resolution_counts_only_signed_for_this_run",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

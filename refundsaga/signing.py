"""Attributable approvals: Ed25519 signatures that bind an approver's decision to one saga."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from refundsaga.contracts import (
    AmsConfirmation,
    ApprovalDecision,
    BatchRefundInput,
    RefundRequest,
    Resolution,
    RestoreRequest,
)
from refundsaga.failed_refunds import FailedRefundDecision

# Domain separation: a signature over one kind of message is worthless as any other.
CONTEXT = "refundsaga/approval-decision/v1"
REQUEST_CONTEXTS = {
    RefundRequest: "refundsaga/refund-request/v1",
    BatchRefundInput: "refundsaga/batch-request/v1",
    RestoreRequest: "refundsaga/restore-request/v1",
}
OPS_CONTEXT = "refundsaga/ops-decision/v1"
FAILED_REFUND_CONTEXT = "refundsaga/failed-refund-decision/v1"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SigningError(ValueError):
    """A key file or public key that cannot be used, with what to do about it."""


def canonical_message(workflow_id: str, run_id: str, decision: ApprovalDecision) -> bytes:
    """The exact bytes signed: the saga (workflow and run id) and the whole decision.

    The run id matters: every saga for a purchase has the workflow id `refund-<purchase>`, so
    without it a signature from an ended saga could be replayed onto the next one.
    """
    body = {
        "context": CONTEXT,
        "workflow_id": workflow_id,
        "run_id": run_id,
        "approver": decision.approver,
        "approve": decision.approve,
        "comment": decision.comment,
    }
    return _canonical(body)


def _canonical(body: dict[str, object]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


StartRequest = TypeVar("StartRequest", RefundRequest, BatchRefundInput, RestoreRequest)


def canonical_request(
    workflow_id: str, request: RefundRequest | BatchRefundInput | RestoreRequest
) -> bytes:
    """The bytes a requester signs: the workflow id and the whole request, nonce included.

    The run id is not known before the start; the nonce, recorded by the store when a saga
    claims its purchase, keeps a signed refund request from starting a second saga. What a
    workflow hands its own next run or its children (carry, batch approval) is not signed.
    """
    fields = request.model_dump(mode="json", exclude={"signature", "batch_approval", "carry"})
    context = REQUEST_CONTEXTS[type(request)]
    return _canonical({"context": context, "workflow_id": workflow_id, **fields})


def canonical_ops_decision(
    workflow_id: str, run_id: str, decision: Resolution | AmsConfirmation
) -> bytes:
    """The bytes an operator signs: the saga run, the kind of decision and all of its content."""
    kind = "resolve" if isinstance(decision, Resolution) else "confirm_ams"
    fields = decision.model_dump(mode="json", exclude={"signature"})
    return _canonical(
        {"context": OPS_CONTEXT, "workflow_id": workflow_id, "run_id": run_id, "kind": kind}
        | fields
    )


def sign_request(
    private_key: Ed25519PrivateKey, workflow_id: str, request: StartRequest
) -> StartRequest:
    """The request with a fresh nonce and its requester's signature for this workflow id."""
    unsigned = request.model_copy(update={"nonce": os.urandom(16).hex(), "signature": None})
    return unsigned.model_copy(
        update={"signature": _sign(private_key, canonical_request(workflow_id, unsigned))}
    )


def verify_request(
    public_key_b64: str,
    workflow_id: str,
    request: RefundRequest | BatchRefundInput | RestoreRequest,
) -> bool:
    """Whether the request is signed by this key for this workflow id (no I/O)."""
    if request.nonce is None:
        return False
    return _verify(public_key_b64, request.signature, canonical_request(workflow_id, request))


def sign_ops_decision(
    private_key: Ed25519PrivateKey,
    workflow_id: str,
    decision: Resolution | AmsConfirmation,
    *,
    run_id: str,
) -> str:
    """The base64 signature of an operator's decision on one saga run."""
    return _sign(private_key, canonical_ops_decision(workflow_id, run_id, decision))


def verify_ops_decision(
    public_key_b64: str,
    workflow_id: str,
    decision: Resolution | AmsConfirmation,
    *,
    run_id: str,
) -> bool:
    """Whether the operator's decision is signed by this key for this saga run (no I/O)."""
    return _verify(
        public_key_b64, decision.signature, canonical_ops_decision(workflow_id, run_id, decision)
    )


def canonical_failed_refund_decision(
    workflow_id: str, run_id: str, decision: FailedRefundDecision
) -> bytes:
    """The bytes an operator signs to decide a failed refund's task: the task run, the choice,
    the note and the request the choice starts (its own signature included)."""
    fields = decision.model_dump(mode="json", exclude={"signature"})
    return _canonical(
        {"context": FAILED_REFUND_CONTEXT, "workflow_id": workflow_id, "run_id": run_id} | fields
    )


def sign_failed_refund_decision(
    private_key: Ed25519PrivateKey, workflow_id: str, decision: FailedRefundDecision, *, run_id: str
) -> str:
    """The base64 signature of an operator's decision on one failed refund's task run."""
    return _sign(private_key, canonical_failed_refund_decision(workflow_id, run_id, decision))


def verify_failed_refund_decision(
    public_key_b64: str, workflow_id: str, decision: FailedRefundDecision, *, run_id: str
) -> bool:
    """Whether the decision is signed by this key for this task run (no I/O)."""
    return _verify(
        public_key_b64,
        decision.signature,
        canonical_failed_refund_decision(workflow_id, run_id, decision),
    )


def _sign(private_key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(private_key.sign(message)).decode("ascii")


def _verify(public_key_b64: str, signature_b64: str | None, message: bytes) -> bool:
    if not signature_b64:
        return False
    try:
        public_key = load_public_key(public_key_b64)
        signature = base64.b64decode(signature_b64, validate=True)
    except (SigningError, binascii.Error, ValueError):
        return False
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _take_cryptographys_lazy_imports() -> None:
    """cryptography's native code imports the types it raises on first use; in the workflow
    sandbox that import happens under the sandbox's importer and aborts the process, so a
    failed verification runs once here, at import, outside any workflow."""
    with contextlib.suppress(InvalidSignature):
        Ed25519PrivateKey.generate().public_key().verify(bytes(SIGNATURE_BYTES), b"")


_take_cryptographys_lazy_imports()


def generate_private_key() -> Ed25519PrivateKey:
    """A new Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def public_key_b64(private_key: Ed25519PrivateKey) -> str:
    """The public half as REFUND_APPROVER_PUBLIC_KEYS wants it: base64 of the 32 raw bytes."""
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw).decode("ascii")


def write_private_key(private_key: Ed25519PrivateKey, path: Path) -> None:
    """Write the key as unencrypted PKCS#8 PEM, readable by its owner only; never overwrite."""
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL: an existing key may be the only copy of someone's identity.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise SigningError(f"{path} exists; refusing to overwrite a signing key") from err
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 key written by `write_private_key` (`refund keys generate`)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SigningError(f"cannot read the signing key {path}: {err.strerror}") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SigningError(f"{path} is not an unencrypted PEM private key") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 key; create one with `refund keys generate`")
    return key


def load_public_key(public_key_b64: str) -> Ed25519PublicKey:
    """A public key from its base64 raw form."""
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
    except (binascii.Error, ValueError) as err:
        raise SigningError("public key is not base64") from err
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SigningError(f"public key must be {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def sign_decision(
    private_key: Ed25519PrivateKey, workflow_id: str, decision: ApprovalDecision, *, run_id: str
) -> str:
    """The base64 signature of a decision on one saga run."""
    return _sign(private_key, canonical_message(workflow_id, run_id, decision))


def verify_decision(
    public_key_b64: str, workflow_id: str, decision: ApprovalDecision, *, run_id: str
) -> bool:
    """Whether the decision carries a valid signature by this key for this saga run.

    Deterministic and without I/O, so the workflow can call it (it runs again on replay).
    """
    return _verify(
        public_key_b64, decision.signature, canonical_message(workflow_id, run_id, decision)
    )

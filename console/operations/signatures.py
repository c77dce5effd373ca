"""The person behind a request: their signing key, and a start request signed with it."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from console.operations.errors import Refused
from refundsaga.settings import Settings
from refundsaga.signing import SigningError, StartRequest, load_private_key, sign_request


def signing_key(settings: Settings) -> Ed25519PrivateKey | None:
    """The person's signing key when REFUND_SIGNING_KEY_FILE is set.

    Raises:
        Refused: The file cannot be read or holds no Ed25519 key.
    """
    if settings.signing_key_file is None:
        return None
    try:
        return load_private_key(settings.signing_key_file)
    except SigningError as err:
        raise Refused(f"REFUND_SIGNING_KEY_FILE: {err}") from err


def signed(settings: Settings, workflow_id: str, request: StartRequest) -> StartRequest:
    """The request signed with REFUND_SIGNING_KEY_FILE when it is set: with signing on, the
    workflow believes the person a request names only from this signature."""
    key = signing_key(settings)
    return request if key is None else sign_request(key, workflow_id, request)

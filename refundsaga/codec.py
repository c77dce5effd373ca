"""Payload encryption (AES-GCM, rotating keys) and the codec server the Temporal UI calls.

With `REFUND_PAYLOAD_KEYS` set, every payload the worker and clients send to Temporal is
encrypted: history holds ciphertext only. Each encrypted payload names its key in the
`encryption-key-id` metadata, so keys rotate: put the new key first (it encrypts), keep the old
ones after it (they still decrypt old histories).

Ops who hold the keys run `python -m refundsaga.codec --port 8309` on their machine and start
the UI with `--ui-codec-endpoint http://127.0.0.1:8309` to read decrypted payloads in the UI.
`python -m refundsaga.codec --new-key KID` prints a fresh key entry.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12
KEY_ID_PATTERN = "letters, digits, '.', '_' or '-'"
# A codec request is a batch of payloads of one history page; far larger is a mistake or abuse.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


class CodecError(ValueError):
    """A payload or key that cannot be used, saying which and why."""


def _valid_kid(kid: str) -> bool:
    return bool(kid) and len(kid) <= 64 and all(c.isalnum() or c in "._-" for c in kid)


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """`kid:base64key,...` (REFUND_PAYLOAD_KEYS) as (key id, key) pairs, the encrypting first.

    Raises:
        CodecError: No key, a malformed entry, a duplicate key id or a key that is not 16, 24
            or 32 bytes (the error names the key id, never the key).
    """
    keys: list[tuple[str, bytes]] = []
    for index, entry in enumerate(part.strip() for part in spec.split(",")):
        if not entry:
            continue
        kid, sep, encoded = entry.partition(":")
        kid = kid.strip()
        if not sep or not _valid_kid(kid):
            raise CodecError(
                f"payload key #{index + 1} must be KID:BASE64KEY with a key id of {KEY_ID_PATTERN}"
            )
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError) as err:
            raise CodecError(f"payload key {kid!r} is not base64") from err
        if len(key) not in (16, 24, 32):
            raise CodecError(f"payload key {kid!r} must be 16, 24 or 32 bytes, not {len(key)}")
        if any(kid == known for known, _ in keys):
            raise CodecError(f"payload key id {kid!r} appears twice")
        keys.append((kid, key))
    if not keys:
        raise CodecError("no payload key given; expected KID:BASE64KEY[,KID:BASE64KEY...]")
    return keys


def new_key_entry(kid: str) -> str:
    """A fresh 256-bit key as a REFUND_PAYLOAD_KEYS entry."""
    if not _valid_kid(kid):
        raise CodecError(f"key id must be 1-64 {KEY_ID_PATTERN}")
    return f"{kid}:{base64.b64encode(secrets.token_bytes(32)).decode('ascii')}"


class EncryptionCodec(PayloadCodec):
    """AES-GCM over each whole payload (metadata and data), tagged with its key id."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise CodecError("an encryption codec needs at least one key")
        self._encrypt_kid, first = keys[0]
        self._encrypt = AESGCM(first)
        self._keys = {kid: AESGCM(key) for kid, key in keys}

    @classmethod
    def from_spec(cls, spec: str) -> EncryptionCodec:
        """The codec for a REFUND_PAYLOAD_KEYS value."""
        return cls(parse_keys(spec))

    @staticmethod
    def _aad(kid: str) -> bytes:
        # Binding the key id means a payload cannot be relabelled to another key.
        return b"refundsaga-payload-v1:" + kid.encode()

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._encrypt_one(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt_one(p) for p in payloads]

    def _encrypt_one(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._encrypt.encrypt(
            nonce, payload.SerializeToString(), self._aad(self._encrypt_kid)
        )
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID: self._encrypt_kid.encode()},
            data=nonce + sealed,
        )

    def decrypt_one(self, payload: Payload) -> Payload:
        """The original payload; payloads that are not encrypted pass through unchanged.

        Raises:
            CodecError: The key id is unknown here, or the ciphertext was altered.
        """
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        kid = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        aead = self._keys.get(kid)
        if aead is None:
            raise CodecError(
                f"payload encrypted with key id {kid!r}, which is not in REFUND_PAYLOAD_KEYS "
                f"(known: {', '.join(sorted(self._keys))})"
            )
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = aead.decrypt(nonce, sealed, self._aad(kid))
        except InvalidTag as err:
            raise CodecError(
                f"payload encrypted with key id {kid!r} failed authentication: altered or "
                "encrypted with a different key of that id"
            ) from err
        original = Payload()
        original.ParseFromString(plain)
        return original


# --- the codec server (Temporal's remote codec protocol) ---------------------------------------


def create_app(codec: PayloadCodec, *, ui_origins: Sequence[str]) -> Starlette:
    """`POST /encode` and `POST /decode` with `{"payloads": [...]}` bodies, CORS for the UI."""

    async def handle(request: Request, decode: bool) -> Response:
        body = await request.body()
        if len(body) > MAX_REQUEST_BYTES:
            return JSONResponse({"error": "request too large"}, status_code=413)
        payloads = Payloads()
        try:
            json_format.Parse(body, payloads)
        except json_format.ParseError as err:
            return JSONResponse({"error": f"not a Payloads JSON body: {err}"}, status_code=400)
        try:
            if decode:
                result = await codec.decode(payloads.payloads)
            else:
                result = await codec.encode(payloads.payloads)
        except CodecError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return Response(
            json_format.MessageToJson(Payloads(payloads=result)),
            media_type="application/json",
        )

    async def encode(request: Request) -> Response:
        return await handle(request, decode=False)

    async def decode(request: Request) -> Response:
        return await handle(request, decode=True)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/encode", encode, methods=["POST"]),
            Route("/decode", decode, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=list(ui_origins),
                allow_methods=["POST"],
                # The UI sends the namespace, and the user's token when configured to.
                allow_headers=["content-type", "x-namespace", "authorization"],
                allow_credentials=True,
            )
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the codec server for the Temporal UI, or print a new key entry."""
    import uvicorn

    from refundsaga.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="python -m refundsaga.codec",
        description="Decrypt payloads for the Temporal UI (--ui-codec-endpoint).",
    )
    parser.add_argument("--port", type=int, help="default: REFUND_CODEC_SERVER_PORT (8309)")
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine)")
    parser.add_argument(
        "--ui-origin",
        action="append",
        help="Temporal UI origin allowed to call (repeatable; default: REFUND_TEMPORAL_UI_URL)",
    )
    parser.add_argument("--new-key", metavar="KID", help="print a new key entry and exit")
    args = parser.parse_args(argv)
    if args.new_key:
        try:
            print(new_key_entry(args.new_key))
        except CodecError as err:
            parser.exit(2, f"error: {err}\n")
        return 0
    settings = get_settings()
    if settings.payload_keys is None:
        parser.exit(2, "error: REFUND_PAYLOAD_KEYS is not set; nothing to decode with\n")
    try:
        codec = EncryptionCodec.from_spec(settings.payload_keys.get_secret_value())
    except CodecError as err:
        parser.exit(2, f"error: REFUND_PAYLOAD_KEYS: {err}\n")
    origins = args.ui_origin or [settings.temporal_ui_url.rstrip("/")]
    port = args.port or settings.codec_server_port
    print(f"codec server on http://{args.host}:{port} for {', '.join(origins)}")
    uvicorn.run(
        create_app(codec, ui_origins=origins), host=args.host, port=port, log_level="warning"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

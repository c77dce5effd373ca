"""Payload encryption (AES-GCM, rotating keys) and the codec server the Temporal UI calls.

With `REFUND_PAYLOAD_KEYS` set, every payload the worker and clients send to Temporal is
encrypted: history holds ciphertext only. Each encrypted payload names its key in the
`encryption-key-id` metadata, so keys rotate: put the new key first (it encrypts), keep the old
ones after it (they still decrypt old histories).

Ops who hold the keys run `python -m refundsaga.codec --port 8309` and point the UI at it
(`--ui-codec-endpoint http://127.0.0.1:8309`) to read decrypted payloads in the UI. The server
decrypts for whoever may call it, so every call must carry `Authorization: Bearer
$REFUND_CODEC_TOKEN`, name an allowed Host (against DNS rebinding) and, from a browser, come
from the UI's origin. `--insecure-local` drops the token, on a loopback address only.
`python -m refundsaga.codec --new-key KID` prints a fresh key entry, `--new-token` a token.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12
KEY_ID_PATTERN = "letters, digits, '.', '_' or '-'"
# A codec request is a batch of payloads of one history page; far larger is a mistake or abuse.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# A shared secret short enough to guess is no secret; `--new-token` makes 43 characters.
MIN_TOKEN_CHARS = 32

log = logging.getLogger(__name__)


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
            # The payload's own key id helps with a missed rotation; the ids held here are not
            # for whoever sent the payload.
            named = repr(kid) if _valid_kid(kid) else "(not a valid key id)"
            raise CodecError(
                f"payload encrypted with key id {named}, which is not in REFUND_PAYLOAD_KEYS"
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

# Said for every payload the server cannot open: which key, or whether the id is known here at
# all, would tell a caller which key ids exist.
_UNDECODABLE = "a payload cannot be decrypted here: unknown key or altered ciphertext"


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a bind address or name) is this machine only."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str, port: int) -> list[str]:
    """The Host headers a server bound to `bind_host:port` answers unless configured."""
    names = ["localhost", "127.0.0.1", "[::1]"]
    bare = bind_host.strip("[]")
    name = f"[{bare}]" if ":" in bare else bare
    # 0.0.0.0 or :: is no name a browser sends; such a server needs REFUND_CODEC_ALLOWED_HOSTS.
    if name not in names and name not in ("0.0.0.0", "[::]"):
        names.insert(0, name.lower())
    return [f"{n}:{port}" for n in names]


class _HostCheck:
    """Answer 421 to any Host not allowed: a rebound DNS name reaches the port, not the name."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.strip().lower() for h in allowed_hosts if h.strip())

    def allows(self, host: str) -> bool:
        host = host.strip().lower()
        # An entry without a port allows that name at any port.
        name = host[: host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
        return bool(host) and (host in self.allowed or name in self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allows(Headers(scope=scope).get("host", "")):
            response = JSONResponse({"error": "host not allowed"}, status_code=421)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


async def _read_limited(request: Request) -> bytes | None:
    """The body, or None when it is over MAX_REQUEST_BYTES (stops reading there)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    codec: PayloadCodec,
    *,
    ui_origins: Sequence[str],
    token: str | None,
    allowed_hosts: Sequence[str],
) -> Starlette:
    """`POST /encode` and `POST /decode` with `{"payloads": [...]}` bodies, CORS for the UI.

    Args:
        codec: Does the work.
        ui_origins: Browser origins allowed to call (the Temporal UI's).
        token: The bearer token every encode and decode must present; None only for a
            server on loopback started with --insecure-local.
        allowed_hosts: Host headers answered (`host:port`, or `host` for any port).
    """
    expected = _digest(token) if token is not None else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        # Digests of equal length: the comparison time says nothing about the token.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            _digest(presented.strip()), expected
        )

    async def handle(request: Request, decode: bool) -> Response:
        if not authorized(request):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="codec"'},
            )
        body = await _read_limited(request)
        if body is None:
            return JSONResponse({"error": "request too large"}, status_code=413)
        payloads = Payloads()
        try:
            json_format.Parse(body, payloads)
        except json_format.ParseError:
            # The parser's message quotes the body; the caller has that already.
            return JSONResponse({"error": "not a Payloads JSON body"}, status_code=400)
        try:
            if decode:
                result = await codec.decode(payloads.payloads)
            else:
                result = await codec.encode(payloads.payloads)
        except CodecError:
            log.warning("codec server refused a %s request: %s", request.url.path, _UNDECODABLE)
            return JSONResponse({"error": _UNDECODABLE}, status_code=400)
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
        # Outermost first: a wrong Host is refused before CORS or the token are looked at.
        middleware=[
            Middleware(_HostCheck, allowed_hosts=list(allowed_hosts)),
            Middleware(
                CORSMiddleware,
                allow_origins=list(ui_origins),
                allow_methods=["POST"],
                # The UI sends the namespace, and a bearer token when configured to.
                allow_headers=["content-type", "x-namespace", "authorization"],
                allow_credentials=True,
            ),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the codec server for the Temporal UI, or print a new key entry or token."""
    import uvicorn

    from refundsaga.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="python -m refundsaga.codec",
        description="Decrypt payloads for the Temporal UI (--ui-codec-endpoint). Callers send "
        "Authorization: Bearer $REFUND_CODEC_TOKEN.",
    )
    parser.add_argument("--port", type=int, help="default: REFUND_CODEC_SERVER_PORT (8309)")
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine)")
    parser.add_argument(
        "--ui-origin",
        action="append",
        help="Temporal UI origin allowed to call (repeatable; default: REFUND_CODEC_CORS_ORIGIN, "
        "else the origin of REFUND_TEMPORAL_UI_URL)",
    )
    parser.add_argument(
        "--insecure-local",
        action="store_true",
        help="run without REFUND_CODEC_TOKEN; only on a loopback --host, where anyone on this "
        "machine can then decrypt",
    )
    parser.add_argument("--new-key", metavar="KID", help="print a new key entry and exit")
    parser.add_argument(
        "--new-token", action="store_true", help="print a new REFUND_CODEC_TOKEN and exit"
    )
    args = parser.parse_args(argv)
    if args.new_key:
        try:
            print(new_key_entry(args.new_key))
        except CodecError as err:
            parser.exit(2, f"error: {err}\n")
        return 0
    if args.new_token:
        print(secrets.token_urlsafe(32))
        return 0
    settings = get_settings()
    token = settings.codec_token.get_secret_value() if settings.codec_token else None
    if token is None and not args.insecure_local:
        parser.exit(
            2,
            "error: REFUND_CODEC_TOKEN is not set; set it (--new-token makes one) or pass "
            "--insecure-local with a loopback --host\n",
        )
    if token is None and not is_loopback_host(args.host):
        parser.exit(2, f"error: --insecure-local needs a loopback --host, not {args.host!r}\n")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        parser.exit(2, f"error: REFUND_CODEC_TOKEN is shorter than {MIN_TOKEN_CHARS} characters\n")
    if settings.payload_keys is None:
        parser.exit(2, "error: REFUND_PAYLOAD_KEYS is not set; nothing to decode with\n")
    try:
        codec = EncryptionCodec.from_spec(settings.payload_keys.get_secret_value())
    except CodecError as err:
        parser.exit(2, f"error: REFUND_PAYLOAD_KEYS: {err}\n")
    origins = args.ui_origin or [settings.codec_ui_origin]
    port = args.port or settings.codec_server_port
    hosts = settings.codec_allowed_hosts or default_allowed_hosts(args.host, port)
    mode = "bearer token required" if token else "NO token (--insecure-local)"
    print(
        f"codec server on http://{args.host}:{port} for {', '.join(origins)}; {mode}; "
        f"Host {', '.join(hosts)}"
    )
    app = create_app(codec, ui_origins=origins, token=token, allowed_hosts=hosts)
    uvicorn.run(app, host=args.host, port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

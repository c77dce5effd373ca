"""Payload encryption: AES-GCM with key ids and rotation, the codec server the Temporal UI
calls, and a whole saga on the time-skipping server with ciphertext-only history."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.client import Client

from activities.refund_activities import RefundActivities
from refundsaga import codec as codec_module
from refundsaga.ams import HttpAmsClient
from refundsaga.approval import policy_from_settings
from refundsaga.codec import (
    ENCODING,
    KEY_ID,
    CodecError,
    EncryptionCodec,
    create_app,
    default_allowed_hosts,
    new_key_entry,
    parse_keys,
)
from refundsaga.contracts import ApprovalDecision, RefundRequest, SagaState
from refundsaga.processor import ProcessorClient
from refundsaga.settings import Settings
from refundsaga.temporal import TemporalUnavailable, connect, data_converter, payload_data_converter
from tests.fixtures.temporal import SagaWorld
from worker import build_workers, running
from workflows.refund_saga import RefundSaga

OLD_KEY = b"o" * 32
NEW_KEY = b"n" * 32
OLD = f"k2026a:{base64.b64encode(OLD_KEY).decode()}"
NEW = f"k2026b:{base64.b64encode(NEW_KEY).decode()}"
UI = "http://127.0.0.1:8233"
TOKEN = "t" * 43
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CODEC_URL = "http://127.0.0.1:8309"


def plain(value: Any) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(value).encode())


# --- keys -------------------------------------------------------------------------------------


def test_keys_parse_with_the_first_encrypting() -> None:
    assert [kid for kid, _ in parse_keys(f"{NEW}, {OLD}")] == ["k2026b", "k2026a"]
    assert new_key_entry("k1").startswith("k1:")
    assert len(parse_keys(new_key_entry("k1"))[0][1]) == 32


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no payload key"),
        ("k1", "must be KID:BASE64KEY"),
        ("bad kid:" + base64.b64encode(OLD_KEY).decode(), "must be KID:BASE64KEY"),
        ("k1:not base64!", "not base64"),
        ("k1:" + base64.b64encode(b"short").decode(), "16, 24 or 32 bytes"),
        (f"{OLD},{OLD}", "appears twice"),
    ],
    ids=["empty", "no-key", "bad-kid", "not-base64", "short", "duplicate"],
)
def test_malformed_keys_are_refused_without_printing_them(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=message) as info:
        parse_keys(spec)
    assert base64.b64encode(OLD_KEY).decode() not in str(info.value)


# --- the codec ---------------------------------------------------------------------------------


async def test_round_trip_hides_the_data_and_names_the_key() -> None:
    codec = EncryptionCodec.from_spec(OLD)
    original = plain({"reason": "duplicate purchase", "purchase_id": 42})
    (sealed,) = await codec.encode([original])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID] == b"k2026a"
    assert b"duplicate" not in sealed.data and b"json/plain" not in sealed.data
    assert await codec.decode([sealed]) == [original]
    # Same input, fresh nonce: equal payloads do not show as equal ciphertext.
    (again,) = await codec.encode([original])
    assert again.data != sealed.data


async def test_rotation_old_payloads_still_decrypt_after_a_new_key_is_added_first() -> None:
    before = EncryptionCodec.from_spec(OLD)
    (old_payload,) = await before.encode([plain("recorded last year")])
    after = EncryptionCodec.from_spec(f"{NEW},{OLD}")
    assert await after.decode([old_payload]) == [plain("recorded last year")]
    (new_payload,) = await after.encode([plain("today")])
    assert new_payload.metadata[KEY_ID] == b"k2026b"
    # A worker still on the old keys meets a new payload: a clear error, not garbage.
    with pytest.raises(CodecError, match=r"key id 'k2026b', which is not in REFUND_PAYLOAD_KEYS"):
        await before.decode([new_payload])


async def test_tampered_or_relabelled_ciphertext_is_refused() -> None:
    codec = EncryptionCodec.from_spec(f"{NEW},{OLD}")
    (sealed,) = await codec.encode([plain({"amount_cents": 2500})])
    flipped = bytearray(sealed.data)
    flipped[-1] ^= 0x01
    tampered = Payload(metadata=dict(sealed.metadata), data=bytes(flipped))
    with pytest.raises(CodecError, match="failed authentication"):
        await codec.decode([tampered])
    relabelled = Payload(metadata={**sealed.metadata, KEY_ID: b"k2026a"}, data=sealed.data)
    with pytest.raises(CodecError, match="failed authentication"):
        await codec.decode([relabelled])


async def test_payloads_that_are_not_encrypted_pass_through() -> None:
    # Histories from before encryption was switched on stay readable.
    codec = EncryptionCodec.from_spec(OLD)
    assert await codec.decode([plain("old")]) == [plain("old")]


def test_the_data_converter_encrypts_only_when_keys_are_set() -> None:
    assert data_converter(Settings()) is payload_data_converter
    converter = data_converter(Settings(payload_keys=SecretStr(OLD)))
    assert isinstance(converter.payload_codec, EncryptionCodec)
    assert converter.payload_converter_class is payload_data_converter.payload_converter_class


async def test_connect_with_malformed_keys_says_so_in_one_line() -> None:
    with pytest.raises(TemporalUnavailable, match="REFUND_PAYLOAD_KEYS") as info:
        await connect(Settings(payload_keys=SecretStr("k1:" + base64.b64encode(b"x").decode())))
    assert "\n" not in str(info.value)


# --- the codec server --------------------------------------------------------------------------


def serve_codec(token: str | None = TOKEN) -> httpx.AsyncClient:
    """The codec server app, called in-process over ASGI as if at 127.0.0.1:8309."""
    app = create_app(
        EncryptionCodec.from_spec(f"{NEW},{OLD}"),
        ui_origins=[UI],
        token=token,
        allowed_hosts=default_allowed_hosts("127.0.0.1", 8309),
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=CODEC_URL)


@pytest.fixture
async def codec_server() -> AsyncIterator[httpx.AsyncClient]:
    async with serve_codec() as client:
        yield client


def as_json(payloads: list[Payload]) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(Payloads(payloads=payloads))
    return result


def from_json(body: Any) -> list[Payload]:
    return list(json_format.ParseDict(body, Payloads()).payloads)


async def sealed_reason() -> list[Payload]:
    return await EncryptionCodec.from_spec(OLD).encode([plain({"reason": "duplicate"})])


async def test_the_codec_server_encodes_and_decodes_for_the_ui(
    codec_server: httpx.AsyncClient,
) -> None:
    headers = {"Origin": UI, "X-Namespace": "default", **AUTH}
    original = [plain({"reason": "duplicate"}), plain(7)]
    encoded = await codec_server.post("/encode", json=as_json(original), headers=headers)
    assert encoded.status_code == 200
    assert encoded.headers["access-control-allow-origin"] == UI
    sealed = from_json(encoded.json())
    assert all(p.metadata["encoding"] == ENCODING for p in sealed)
    decoded = await codec_server.post("/decode", json=as_json(sealed), headers=headers)
    assert decoded.status_code == 200
    assert from_json(decoded.json()) == original


@pytest.mark.parametrize("path", ["/decode", "/encode"])
async def test_the_codec_server_refuses_a_call_without_the_token(
    codec_server: httpx.AsyncClient, path: str
) -> None:
    # Anyone who reaches the port: no plaintext back, and no ciphertext made with our key
    # (which could be fed to a saga as a forged input).
    response = await codec_server.post(path, json=as_json(await sealed_reason()))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "duplicate" not in response.text and "payloads" not in response.text


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}", TOKEN, "Bearer t"],
    ids=["longer", "shorter", "empty", "basic", "no-scheme", "prefix"],
)
async def test_the_codec_server_refuses_a_wrong_token(
    codec_server: httpx.AsyncClient, authorization: str
) -> None:
    response = await codec_server.post(
        "/decode", json=as_json(await sealed_reason()), headers={"Authorization": authorization}
    )
    assert response.status_code == 401
    assert "duplicate" not in response.text


async def test_the_codec_server_accepts_the_token_with_any_scheme_case(
    codec_server: httpx.AsyncClient,
) -> None:
    response = await codec_server.post(
        "/decode",
        json=as_json(await sealed_reason()),
        headers={"Authorization": f"bearer {TOKEN}"},
    )
    assert response.status_code == 200
    assert from_json(response.json()) == [plain({"reason": "duplicate"})]


@pytest.mark.parametrize(
    "host",
    ["evil.example:8309", "127.0.0.1.evil.example:8309", "evil.example", "127.0.0.1:9999", ""],
    ids=["rebound-name", "lookalike", "no-port", "other-port", "empty"],
)
async def test_the_codec_server_refuses_a_foreign_host_even_with_the_token(
    codec_server: httpx.AsyncClient, host: str
) -> None:
    # DNS rebinding: a page on evil.example points its name at 127.0.0.1 and calls the port;
    # the browser then sends its own name as Host.
    response = await codec_server.post(
        "/decode",
        json=as_json(await sealed_reason()),
        headers={"Host": host, "Origin": "http://evil.example:8309", **AUTH},
    )
    assert response.status_code == 421
    assert "duplicate" not in response.text


async def test_the_codec_server_answers_its_own_names(codec_server: httpx.AsyncClient) -> None:
    for host in ("127.0.0.1:8309", "localhost:8309", "[::1]:8309", "LOCALHOST:8309"):
        response = await codec_server.get("/healthz", headers={"Host": host})
        assert response.status_code == 200, host


async def test_the_codec_server_answers_the_ui_preflight_and_no_other_origin(
    codec_server: httpx.AsyncClient,
) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
    }
    ok = await codec_server.options("/decode", headers={"Origin": UI, **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == UI
    allowed = ok.headers["access-control-allow-headers"].lower()
    assert "x-namespace" in allowed and "authorization" in allowed
    for origin in ("https://evil.example", "http://localhost:8233", "null"):
        other = await codec_server.options("/decode", headers={"Origin": origin, **preflight})
        assert "access-control-allow-origin" not in other.headers, origin
        # And the real request, which a browser would not send after that preflight.
        answer = await codec_server.post(
            "/decode", json=as_json(await sealed_reason()), headers={"Origin": origin, **AUTH}
        )
        assert "access-control-allow-origin" not in answer.headers, origin


async def test_the_codec_server_errors_name_no_key_id_and_echo_no_data(
    codec_server: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    bad_json = await codec_server.post(
        "/decode", content=b'{"payloads": "secret-body"}', headers=AUTH
    )
    assert bad_json.status_code == 400 and "secret-body" not in bad_json.text
    assert (
        await codec_server.post("/decode", content=b"not json", headers=AUTH)
    ).status_code == 400
    unknown = Payload(metadata={"encoding": ENCODING, KEY_ID: b"k1999"}, data=b"x" * 40)
    (sealed,) = await sealed_reason()
    tampered = Payload(
        metadata=dict(sealed.metadata), data=sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    )
    answers = []
    for payload in (unknown, tampered):
        refused = await codec_server.post("/decode", json=as_json([payload]), headers=AUTH)
        assert refused.status_code == 400
        answers.append(refused.json())
    # One answer for an unknown key and an altered payload: no oracle for which ids exist.
    assert answers[0] == answers[1]
    said = json.dumps(answers) + caplog.text
    for kid in ("k1999", "k2026a", "k2026b"):
        assert kid not in said


def run_codec_main(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], token: str | None
) -> dict[str, Any]:
    """`python -m refundsaga.codec ARGV` with uvicorn stubbed; what it would have served."""
    served: dict[str, Any] = {}
    monkeypatch.setenv("REFUND_PAYLOAD_KEYS", OLD)
    if token is None:
        monkeypatch.delenv("REFUND_CODEC_TOKEN", raising=False)
    else:
        monkeypatch.setenv("REFUND_CODEC_TOKEN", token)
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    codec_module.main(argv)
    return served


@pytest.mark.parametrize(
    ("argv", "token", "message"),
    [
        ([], None, "REFUND_CODEC_TOKEN is not set"),
        (["--insecure-local", "--host", "0.0.0.0"], None, "needs a loopback --host"),
        (["--insecure-local", "--host", "192.168.1.5"], None, "needs a loopback --host"),
        ([], "short", "shorter than 32"),
    ],
    ids=["no-token", "insecure-on-all", "insecure-on-lan", "short-token"],
)
def test_the_codec_server_will_not_start_open(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    token: str | None,
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exited:
        run_codec_main(monkeypatch, ["--port", "8309", *argv], token)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


async def test_insecure_local_serves_loopback_without_a_token_but_checks_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = run_codec_main(monkeypatch, ["--port", "8309", "--insecure-local"], None)
    assert served["host"] == "127.0.0.1"
    transport = httpx.ASGITransport(app=served["app"])
    async with httpx.AsyncClient(transport=transport, base_url=CODEC_URL) as client:
        body = as_json(await sealed_reason())
        assert (await client.post("/decode", json=body)).status_code == 200
        rebound = await client.post("/decode", json=body, headers={"Host": "evil.example:8309"})
        assert rebound.status_code == 421


async def test_a_configured_token_is_required_even_with_insecure_local(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = run_codec_main(monkeypatch, ["--port", "8309", "--insecure-local"], TOKEN)
    transport = httpx.ASGITransport(app=served["app"])
    async with httpx.AsyncClient(transport=transport, base_url=CODEC_URL) as client:
        body = as_json(await sealed_reason())
        assert (await client.post("/decode", json=body)).status_code == 401
        assert (await client.post("/decode", json=body, headers=AUTH)).status_code == 200


# --- a saga with encryption on the worker and the client ----------------------------------------


def payloads_in(message: Message) -> Iterator[tuple[str, Payload]]:
    """Every Payload inside a proto message, with the field path that holds it."""
    for field, value in message.ListFields():
        named = [(field.name, v) for v in (value if field.is_repeated else [value])]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            named = [(f"{field.name}[{key}]", v) for key, v in value.items()]
        for name, item in named:
            if isinstance(item, Payload):
                yield name, item
            elif isinstance(item, Message):
                for path, payload in payloads_in(item):
                    yield f"{name}.{path}", payload


async def test_a_saga_runs_encrypted_and_its_history_is_ciphertext(saga_world: SagaWorld) -> None:
    world = saga_world
    settings = world.settings.model_copy(update={"payload_keys": SecretStr(f"{NEW},{OLD}")})
    client = await Client.connect(
        world.env.client.service_client.config.target_host,
        namespace=world.env.client.namespace,
        data_converter=data_converter(settings),
    )
    task_queue = f"refund-encrypted-{uuid.uuid4().hex[:8]}"
    purchase = world.seed("standard")
    async with (
        ProcessorClient(settings.processor_url, settings.processor_api_key) as processor,
        HttpAmsClient(settings.ams_url, settings.ams_api_key) as ams,
    ):
        activities = RefundActivities(
            store=world.store,
            processor=processor,
            ams=ams,
            notifier=world.notifier,
            policy=policy_from_settings(settings),
        )
        async with running(
            build_workers(
                client, settings, activities, task_queue=task_queue, workflows=[RefundSaga]
            )
        ):
            handle = await client.start_workflow(
                RefundSaga.run,
                RefundRequest(
                    purchase_id=purchase.purchase_id,
                    reason="encrypted duplicate",
                    requested_by="sam",
                ),
                id=f"refund-{purchase.purchase_id}-{uuid.uuid4().hex[:8]}",
                task_queue=task_queue,
            )
            for _ in range(400):
                status = await handle.query(RefundSaga.status)
                if status.state == SagaState.AWAITING_APPROVAL:
                    break
            await handle.execute_update(
                RefundSaga.decide, ApprovalDecision(approver="bob", comment="checked")
            )
            result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert world.processor.get_charge(purchase.charge_id)["amount_refunded"] == (
        purchase.amount_cents
    )

    history = await handle.fetch_history()
    found = [(path, p) for event in history.events for path, p in payloads_in(event)]
    # Search attributes stay readable: the server indexes them (identifiers only, by design).
    # Markers' own bookkeeping (a local activity's id and attempt, a patch id) is the SDK's,
    # written unencoded; the local activities' results beside it are encrypted like the rest.
    sdk_owned = [
        p
        for path, p in found
        if path.startswith("marker_recorded_event_attributes.details[")
        and not path.startswith("marker_recorded_event_attributes.details[result]")
    ]
    for payload in sdk_owned:
        assert purchase.charge_id.encode() not in payload.data
        assert b"encrypted duplicate" not in payload.data
    data = [
        (path, p)
        for path, p in found
        if "search_attributes" not in path and not any(p is q for q in sdk_owned)
    ]
    assert len(data) > 20
    readable = [path for path, p in data if p.metadata.get("encoding") != ENCODING]
    assert readable == []
    raw = history.to_json()
    for secret in ("encrypted duplicate", purchase.charge_id, "checked"):
        assert secret not in raw
        assert base64.b64encode(secret.encode()).decode()[:12] not in raw
    for _, payload in data:
        with pytest.raises(ValueError):
            json.loads(payload.data)

    # Ops with the keys read it through the codec server, as the UI would.
    async with serve_codec() as server:
        response = await server.post("/decode", json=as_json([p for _, p in data]), headers=AUTH)
    assert response.status_code == 200
    texts = [p.data.decode() for p in from_json(response.json())]
    assert any("encrypted duplicate" in t for t in texts)
    assert any(purchase.charge_id in t for t in texts)

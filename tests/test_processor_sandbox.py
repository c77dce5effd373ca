"""The processor sandbox as a raw HTTP service: Stripe shapes, idempotency, faults, state."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandboxes.processor import create_app
from tests.fixtures.sandboxes import ProcessorSandbox, serve_app

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def api(processor_sandbox: ProcessorSandbox) -> Iterator[httpx.Client]:
    """A raw client authorised against the processor sandbox's `/v1` API."""
    with httpx.Client(
        base_url=processor_sandbox.url,
        headers={"Authorization": f"Bearer {processor_sandbox.api_key}"},
        timeout=5.0,
    ) as client:
        yield client


def _refund(api: httpx.Client, key: str | None = None, **params: Any) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return api.post("/v1/refunds", data=params, headers=headers)


def test_healthz_needs_no_auth(processor_sandbox: ProcessorSandbox) -> None:
    response = httpx.get(f"{processor_sandbox.url}/healthz")

    assert (response.status_code, response.json()) == (200, {"ok": True})


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "api_key_missing"), ({"Authorization": "Bearer sk_wrong"}, "api_key_invalid")],
)
def test_v1_requires_the_bearer_key(
    processor_sandbox: ProcessorSandbox, headers: dict[str, str], code: str
) -> None:
    charge = processor_sandbox.create_charge(100)

    response = httpx.get(f"{processor_sandbox.url}/v1/charges/{charge['id']}", headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["code"] == code


def test_refund_and_charge_have_stripes_shape(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_sandbox.create_charge(995, currency="USD", payment_intent="pi_shape1")

    refund = _refund(api, charge=charge["id"], amount="300", **{"metadata[saga]": "s-1"}).json()
    seen = api.get(f"/v1/charges/{charge['id']}").json()

    assert charge["id"].startswith("ch_") and len(charge["id"]) == 27
    assert refund["id"].startswith("re_")
    assert {k: refund[k] for k in ("object", "amount", "currency", "charge", "status")} == {
        "object": "refund",
        "amount": 300,
        "currency": "usd",
        "charge": charge["id"],
        "status": "succeeded",
    }
    assert refund["payment_intent"] == "pi_shape1"
    assert refund["failure_reason"] is None
    assert refund["metadata"] == {"saga": "s-1"}
    assert isinstance(refund["created"], int)
    assert seen["object"] == "charge"
    assert (seen["amount"], seen["amount_refunded"], seen["refunded"]) == (995, 300, False)
    assert seen["refunds"] == {
        "object": "list",
        "data": [refund],
        "has_more": False,
        "url": f"/v1/charges/{charge['id']}/refunds",
    }
    assert api.get(f"/v1/refunds/{refund['id']}").json() == refund


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"amount": "abc"}, 400, "parameter_invalid_integer"),
        ({"amount": "0"}, 400, "parameter_invalid_integer"),
        ({"amount": "-5"}, 400, "parameter_invalid_integer"),
        ({"amount": "1.5"}, 400, "parameter_invalid_integer"),
        ({"color": "blue"}, 400, "parameter_unknown"),
        ({"reason": "bored"}, 400, "parameter_invalid"),
    ],
)
def test_invalid_refund_parameters(
    processor_sandbox: ProcessorSandbox,
    api: httpx.Client,
    params: dict[str, str],
    status: int,
    code: str,
) -> None:
    charge = processor_sandbox.create_charge(500)

    response = _refund(api, charge=charge["id"], **params)

    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["code"] == code
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 0


def test_business_errors_have_stripes_codes(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_sandbox.create_charge(500)

    missing = api.post("/v1/refunds", data={"amount": "1"})
    unknown = _refund(api, charge="ch_nope")
    too_large = _refund(api, charge=charge["id"], amount="501")
    _refund(api, charge=charge["id"])
    already = _refund(api, charge=charge["id"])

    assert (missing.status_code, missing.json()["error"]["code"]) == (400, "parameter_missing")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "resource_missing")
    assert (too_large.status_code, too_large.json()["error"]["code"]) == (400, "amount_too_large")
    assert already.status_code == 400
    assert already.json() == {
        "error": {
            "type": "invalid_request_error",
            "code": "charge_already_refunded",
            "message": f"Charge {charge['id']} has already been refunded.",
            "param": "charge",
        }
    }


def test_idempotent_replay_carries_the_replayed_header(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_sandbox.create_charge(500)
    key = str(uuid.uuid4())

    first = _refund(api, key, charge=charge["id"], amount="100", **{"metadata[a]": "1"})
    # Same parameters in another order are the same request.
    second = _refund(api, key, **{"metadata[a]": "1"}, amount="100", charge=charge["id"])
    other = _refund(api, key, charge=charge["id"], amount="200")

    assert first.status_code == second.status_code == 200
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    assert other.status_code == 400
    assert other.json()["error"]["type"] == "idempotency_error"
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 100


def test_business_errors_are_saved_under_the_key_but_validation_errors_are_not(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge_id = f"ch_custom{uuid.uuid4().hex[:12]}"
    key = str(uuid.uuid4())

    not_found = _refund(api, key, charge=charge_id, amount="100")
    processor_sandbox.create_charge(500, id=charge_id)
    replayed = _refund(api, key, charge=charge_id, amount="100")

    assert not_found.status_code == replayed.status_code == 404
    assert replayed.headers["idempotent-replayed"] == "true"

    other_key = str(uuid.uuid4())
    invalid = _refund(api, other_key, charge=charge_id, amount="x")
    fixed = _refund(api, other_key, charge=charge_id, amount="100")
    assert (invalid.status_code, fixed.status_code) == (400, 200)


def test_creating_an_existing_charge_id_conflicts(processor_sandbox: ProcessorSandbox) -> None:
    charge = processor_sandbox.create_charge(500)

    response = processor_sandbox.http.post(
        "/_sandbox/charges", json={"amount": 100, "id": charge["id"]}
    )

    assert response.status_code == 409


def test_list_refunds_is_a_stripe_list_newest_first(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_sandbox.create_charge(500)
    ids = [_refund(api, charge=charge["id"], amount="10").json()["id"] for _ in range(3)]

    first = api.get("/v1/refunds", params={"charge": charge["id"], "limit": 2}).json()
    rest = api.get(
        "/v1/refunds",
        params={"charge": charge["id"], "limit": 2, "starting_after": first["data"][-1]["id"]},
    ).json()
    bad_limit = api.get("/v1/refunds", params={"charge": charge["id"], "limit": 101})

    assert first["object"] == "list" and first["url"] == "/v1/refunds"
    assert [r["id"] for r in first["data"]] == ids[:0:-1]
    assert first["has_more"] is True
    assert [r["id"] for r in rest["data"]] == ids[:1]
    assert rest["has_more"] is False
    assert bad_limit.status_code == 400


def test_settle_endpoint_only_settles_pending_refunds(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_sandbox.create_charge(500, refund_behavior="pending", settle_after_polls=99)
    refund = _refund(api, charge=charge["id"]).json()

    settled = processor_sandbox.settle(refund["id"], "succeeded")
    again = processor_sandbox.settle(refund["id"], "succeeded")
    flip = processor_sandbox.http.post(
        f"/_sandbox/refunds/{refund['id']}/settle", json={"status": "failed"}
    )

    assert settled["status"] == again["status"] == "succeeded"
    assert flip.status_code == 409


def test_fail_behavior_creates_failed_refunds(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_sandbox.create_charge(500, refund_behavior="fail")

    refund = _refund(api, charge=charge["id"]).json()

    assert (refund["status"], refund["failure_reason"]) == ("failed", "declined")
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 0


def test_faulted_requests_are_not_saved_under_their_key(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)
    key = str(uuid.uuid4())
    processor_faults.set_faults(error_rate=1.0, paths=["/v1/refunds"])

    faulted = _refund(api, key, charge=charge["id"], amount="100")
    processor_faults.clear_faults()
    retried = _refund(api, key, charge=charge["id"], amount="100")

    assert faulted.status_code in (500, 503)
    assert faulted.json()["error"]["type"] == "api_error"
    assert retried.status_code == 200
    assert "idempotent-replayed" not in retried.headers
    assert processor_faults.get_charge(charge["id"])["amount_refunded"] == 100


def test_drop_and_hang_faults_are_transport_failures_not_http_errors(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)

    processor_faults.set_faults(drop_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        api.get(f"/v1/charges/{charge['id']}")
    processor_faults.set_faults(timeout_rate=1.0, hang_ms=2000)
    with pytest.raises(httpx.ReadTimeout):
        api.get(f"/v1/charges/{charge['id']}", timeout=0.3)

    assert [(r["fault"], r["status"]) for r in processor_faults.requests()] == [
        ("drop", None),
        ("timeout", None),
    ]


def test_faults_are_deterministic_for_a_seed(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)

    def statuses() -> list[int]:
        processor_faults.set_faults(error_rate=0.5, seed=1234)
        return [api.get(f"/v1/charges/{charge['id']}").status_code for _ in range(30)]

    first, second = statuses(), statuses()

    assert first == second
    assert 200 in first
    assert set(first) - {200} <= {500, 503}
    assert set(first) != {200}


def test_fault_paths_filter_limits_faults_to_matching_paths(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)
    processor_faults.set_faults(error_rate=1.0, paths=["/v1/refunds"])

    assert api.get(f"/v1/charges/{charge['id']}").status_code == 200
    assert _refund(api, charge=charge["id"]).status_code in (500, 503)
    assert httpx.get(f"{processor_faults.url}/healthz").status_code == 200


def test_fault_settings_round_trip_and_are_validated(processor_faults: ProcessorSandbox) -> None:
    http = processor_faults.http

    set_ = processor_faults.set_faults(error_rate=0.25, latency_ms=1, seed=3)
    shown = http.get("/_sandbox/faults").json()
    bad_rate = http.post("/_sandbox/faults", json={"error_rate": 2})
    bad_key = http.post("/_sandbox/faults", json={"explode": True})
    processor_faults.clear_faults()

    assert set_ == shown
    assert (shown["error_rate"], shown["latency_ms"], shown["seed"]) == (0.25, 1, 3)
    assert bad_rate.status_code == bad_key.status_code == 400
    assert http.get("/_sandbox/faults").json()["error_rate"] == 0


def test_request_log_records_v1_requests(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)
    processor_faults.clear_requests()

    _refund(api, "log-key-" + charge["id"], charge=charge["id"], amount="5")
    api.get(f"/v1/charges/{charge['id']}")
    httpx.get(f"{processor_faults.url}/healthz")
    log = processor_faults.requests()
    processor_faults.clear_requests()

    assert [(r["method"], r["path"], r["status"]) for r in log] == [
        ("POST", "/v1/refunds", 200),
        ("GET", f"/v1/charges/{charge['id']}", 200),
    ]
    assert log[0]["idempotency_key"] == "log-key-" + charge["id"]
    assert log[1]["idempotency_key"] is None
    assert isinstance(log[0]["ts"], float)
    assert processor_faults.requests() == []


async def test_concurrent_refunds_never_exceed_the_charge(
    processor_sandbox: ProcessorSandbox,
) -> None:
    charge = processor_sandbox.create_charge(10)

    async with httpx.AsyncClient(
        base_url=processor_sandbox.url,
        headers={"Authorization": f"Bearer {processor_sandbox.api_key}"},
    ) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/refunds", data={"charge": charge["id"], "amount": "1"})
                for _ in range(20)
            )
        )

    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 10 + [400] * 10
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 10


def test_reset_clears_state_faults_and_log(tmp_path: Path) -> None:
    with serve_app(create_app(api_key="k")) as url, httpx.Client(base_url=url) as http:
        charge = http.post("/_sandbox/charges", json={"amount": 100}).json()
        http.post("/_sandbox/faults", json={"error_rate": 0.5})
        http.get(f"/v1/charges/{charge['id']}", headers={"Authorization": "Bearer k"})

        http.post("/_sandbox/reset")

        assert http.get("/_sandbox/faults").json()["error_rate"] == 0
        assert http.get("/_sandbox/requests").json() == []
        gone = http.get(f"/v1/charges/{charge['id']}", headers={"Authorization": "Bearer k"})
        assert gone.status_code == 404


def test_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state" / "processor.json"
    auth = {"Authorization": "Bearer k"}
    with (
        serve_app(create_app(api_key="k", state_path=state)) as url,
        httpx.Client(base_url=url, headers=auth) as http,
    ):
        charge = http.post("/_sandbox/charges", json={"amount": 700}).json()
        refund = http.post(
            "/v1/refunds",
            data={"charge": charge["id"], "amount": "300"},
            headers={"Idempotency-Key": "restart-key"},
        ).json()

    assert json.loads(state.read_text())["charges"][charge["id"]]["amount"] == 700
    assert [p.name for p in state.parent.iterdir()] == ["processor.json"]

    with (
        serve_app(create_app(api_key="k", state_path=state)) as url,
        httpx.Client(base_url=url, headers=auth) as http,
    ):
        seen = http.get(f"/v1/charges/{charge['id']}").json()
        replay = http.post(
            "/v1/refunds",
            data={"charge": charge["id"], "amount": "300"},
            headers={"Idempotency-Key": "restart-key"},
        )

    assert seen["amount_refunded"] == 300
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == refund["id"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_main_serves_with_the_key_from_the_environment(tmp_path: Path) -> None:
    port = _free_port()
    state = tmp_path / "processor.json"
    log = tmp_path / "sandbox.log"
    env = {**os.environ, "SANDBOX_API_KEY": "sk_env_key"}
    cmd = [sys.executable, "-m", "sandboxes.processor", "--port", str(port), "--state", str(state)]
    url = f"http://127.0.0.1:{port}"
    with (
        log.open("wb") as stderr,
        subprocess.Popen(
            [*cmd, "--log-level", "warning"], cwd=REPO_ROOT, env=env, stderr=stderr
        ) as process,
    ):
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    if httpx.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    assert process.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, "sandbox did not start"
                    time.sleep(0.05)
            charge = httpx.post(f"{url}/_sandbox/charges", json={"amount": 100}).json()
            ok = httpx.get(
                f"{url}/v1/charges/{charge['id']}", headers={"Authorization": "Bearer sk_env_key"}
            )
            assert ok.status_code == 200
        finally:
            process.terminate()
    assert charge["id"] in json.loads(state.read_text())["charges"]


def test_main_refuses_to_start_without_a_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SANDBOX_API_KEY"}

    result = subprocess.run(
        [sys.executable, "-m", "sandboxes.processor"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "API key" in result.stderr

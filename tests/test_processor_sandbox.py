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

from sandboxes.processor import DEFAULT_API_VERSION, create_app
from tests.fixtures.sandboxes import ProcessorSandbox, admin_client, serve_app

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
    with serve_app(create_app(api_key="k")) as url, admin_client(url, "k") as http:
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
            auth = {"Authorization": "Bearer sk_env_key"}
            charge = httpx.post(f"{url}/_sandbox/charges", json={"amount": 100}, headers=auth)
            ok = httpx.get(f"{url}/v1/charges/{charge.json()['id']}", headers=auth)
            assert ok.status_code == 200
        finally:
            process.terminate()
    assert charge.json()["id"] in json.loads(state.read_text())["charges"]


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


# --- the sandbox clock and pruned idempotency keys ------------------------------------------


def test_clock_advances_stamps_and_resets() -> None:
    with serve_app(create_app(api_key="k")) as url, admin_client(url, "k") as http:
        before = http.get("/_sandbox/clock").json()
        moved = http.post("/_sandbox/clock", json={"advance_s": 3600.5}).json()
        charge = http.post("/_sandbox/charges", json={"amount": 100}).json()
        refund = http.post("/v1/refunds", data={"charge": charge["id"]}).json()
        backwards = http.post("/_sandbox/clock", json={"advance_s": -1})
        http.post("/_sandbox/reset")
        after = http.get("/_sandbox/clock").json()

    assert before["offset_s"] == 0
    assert moved["offset_s"] == 3600.5
    assert moved["now"] - before["now"] in range(3600, 3603)
    assert charge["created"] >= before["now"] + 3600
    assert refund["created"] >= before["now"] + 3600
    assert backwards.status_code == 400
    assert after["offset_s"] == 0


def test_clock_offset_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "processor.json"
    with serve_app(create_app(api_key="k", state_path=state)) as url, admin_client(url, "k") as h:
        h.post("/_sandbox/clock", json={"advance_s": 120})
    with serve_app(create_app(api_key="k", state_path=state)) as url, admin_client(url, "k") as h:
        assert h.get("/_sandbox/clock").json()["offset_s"] == 120


@pytest.mark.parametrize(("advance_s", "refunds"), [(86_399, 1), (86_400, 2)])
def test_idempotency_keys_are_pruned_after_24_hours(advance_s: int, refunds: int) -> None:
    with serve_app(create_app(api_key="k")) as url, admin_client(url, "k") as http:
        charge = http.post("/_sandbox/charges", json={"amount": 500}).json()
        params = {"charge": charge["id"], "amount": "100"}
        key = {"Idempotency-Key": "day-old-key"}
        first = http.post("/v1/refunds", data=params, headers=key)
        http.post("/_sandbox/clock", json={"advance_s": advance_s})
        again = http.post("/v1/refunds", data=params, headers=key)
        held = http.get(f"/v1/charges/{charge['id']}").json()

    assert len(held["refunds"]["data"]) == refunds
    assert held["amount_refunded"] == 100 * refunds
    replayed = again.headers.get("idempotent-replayed") == "true"
    assert replayed is (refunds == 1)
    assert (again.json()["id"] == first.json()["id"]) is replayed


# --- saved 5xx, 429s and the limiter --------------------------------------------------------


def test_saved_error_is_replayed_and_executes_nothing(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)
    key = str(uuid.uuid4())
    processor_faults.set_faults(saved_error_rate=1.0, paths=["/v1/refunds"])

    first = _refund(api, key, charge=charge["id"], amount="100")
    processor_faults.clear_faults()
    replay = _refund(api, key, charge=charge["id"], amount="100")

    assert first.status_code == replay.status_code == 500
    assert first.json()["error"]["type"] == "api_error"
    assert first.headers["stripe-should-retry"] == "false"
    assert "idempotent-replayed" not in first.headers
    assert replay.headers["stripe-should-retry"] == "false"
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["original-request"] == first.headers["request-id"]
    assert replay.json() == first.json()
    assert processor_faults.get_charge(charge["id"])["refunds"]["data"] == []


def test_executed_saved_error_leaves_a_refund_behind_a_500(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)
    key = str(uuid.uuid4())
    processor_faults.set_faults(executed_saved_error_rate=1.0, paths=["/v1/refunds"])

    first = _refund(api, key, charge=charge["id"], amount="100", **{"metadata[saga]": "s-9"})
    processor_faults.clear_faults()
    replay = _refund(api, key, charge=charge["id"], amount="100", **{"metadata[saga]": "s-9"})
    held = processor_faults.get_charge(charge["id"])

    assert (first.status_code, replay.status_code) == (500, 500)
    assert first.headers["stripe-should-retry"] == replay.headers["stripe-should-retry"] == "false"
    assert replay.headers["idempotent-replayed"] == "true"
    assert held["amount_refunded"] == 100
    assert [r["metadata"] for r in held["refunds"]["data"]] == [{"saga": "s-9"}]


def test_saved_faults_do_not_strike_requests_without_a_key(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)
    processor_faults.set_faults(saved_error_rate=1.0)

    read = api.get(f"/v1/charges/{charge['id']}")
    unkeyed = _refund(api, charge=charge["id"], amount="10")

    assert (read.status_code, unkeyed.status_code) == (200, 200)
    assert [r["fault"] for r in processor_faults.requests()] == [None, None]


def test_plain_error_fault_asks_for_a_retry(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)
    processor_faults.set_faults(error_rate=1.0)

    response = api.get(f"/v1/charges/{charge['id']}")

    assert response.status_code in (500, 503)
    assert response.headers["stripe-should-retry"] == "true"


@pytest.mark.parametrize("kind", ["rate_limit", "lock_timeout"])
def test_injected_429_has_stripes_shape_and_executes_nothing(
    processor_faults: ProcessorSandbox, api: httpx.Client, kind: str
) -> None:
    charge = processor_faults.create_charge(500)
    key = str(uuid.uuid4())
    processor_faults.set_faults(**{f"{kind}_rate": 1.0}, retry_after_s=7)

    limited = _refund(api, key, charge=charge["id"], amount="100")
    processor_faults.clear_faults()
    retried = _refund(api, key, charge=charge["id"], amount="100")

    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    assert limited.headers["stripe-should-retry"] == "true"
    error = limited.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", kind)
    assert error["message"]
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert processor_faults.get_charge(charge["id"])["amount_refunded"] == 100


def test_rate_limiter_admits_the_burst_then_answers_429(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)
    processor_faults.set_faults(rate_limit_per_s=5, retry_after_s=2)

    statuses = [api.get(f"/v1/charges/{charge['id']}").status_code for _ in range(12)]
    limited = api.get(f"/v1/charges/{charge['id']}")
    time.sleep(0.5)  # two tokens come back at 5 a second
    refilled = api.get(f"/v1/charges/{charge['id']}")
    processor_faults.set_faults()
    unlimited = [api.get(f"/v1/charges/{charge['id']}").status_code for _ in range(12)]

    # The burst is the rate; the dozen requests take far less than the second a refill needs.
    assert statuses.count(200) in (5, 6)
    assert statuses[:5] == [200] * 5 and statuses[-1] == 429
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert limited.json()["error"]["code"] == "rate_limit"
    assert refilled.status_code == 200
    assert set(unlimited) == {200}
    assert "rate_limiter" in [r["fault"] for r in processor_faults.requests()]


def test_new_fault_settings_are_validated(processor_faults: ProcessorSandbox) -> None:
    http = processor_faults.http
    bad = [
        {"saved_error_rate": 1.5},
        {"rate_limit_per_s": -1},
        {"retry_after_s": 1.5},
        {"lock_timeout_rate": "x"},
    ]

    codes = [http.post("/_sandbox/faults", json=body).status_code for body in bad]
    shown = processor_faults.set_faults(executed_saved_error_rate=0.2, rate_limit_per_s=2.5)
    processor_faults.clear_faults()

    assert codes == [400] * 4
    assert (shown["executed_saved_error_rate"], shown["rate_limit_per_s"]) == (0.2, 2.5)
    assert shown["retry_after_s"] == 1


# --- refund statuses and the behaviour switch -----------------------------------------------


@pytest.mark.parametrize(
    ("behavior", "status", "counted"),
    [("requires_action", "requires_action", 300), ("canceled", "canceled", 0)],
)
def test_requires_action_and_canceled_behaviors(
    processor_sandbox: ProcessorSandbox,
    api: httpx.Client,
    behavior: str,
    status: str,
    counted: int,
) -> None:
    charge = processor_sandbox.create_charge(500, refund_behavior=behavior, settle_after_polls=1)

    refund = _refund(api, charge=charge["id"], amount="300").json()
    polled = [api.get(f"/v1/refunds/{refund['id']}").json()["status"] for _ in range(3)]

    assert (refund["status"], refund["failure_reason"]) == (status, None)
    assert polled == [status] * 3  # reading does not settle them
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == counted


@pytest.mark.parametrize(
    ("behavior", "settled_as", "refunded", "failure_reason"),
    [
        ("requires_action", "succeeded", 200, None),
        ("requires_action", "failed", 0, "lost_or_stolen_card"),
        ("requires_action", "canceled", 0, None),
        ("pending", "canceled", 0, None),
    ],
)
def test_settling_requires_action_and_pending_refunds(
    processor_sandbox: ProcessorSandbox,
    api: httpx.Client,
    behavior: str,
    settled_as: str,
    refunded: int,
    failure_reason: str | None,
) -> None:
    charge = processor_sandbox.create_charge(500, refund_behavior=behavior, settle_after_polls=99)
    refund = _refund(api, charge=charge["id"], amount="200").json()

    settled = processor_sandbox.settle(refund["id"], settled_as)
    flip = processor_sandbox.http.post(
        f"/_sandbox/refunds/{refund['id']}/settle",
        json={"status": "succeeded" if settled_as != "succeeded" else "failed"},
    )

    assert (settled["status"], settled["failure_reason"]) == (settled_as, failure_reason)
    assert flip.status_code == 409
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == refunded


def test_canceled_refunds_cannot_be_settled(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_sandbox.create_charge(500, refund_behavior="canceled")
    refund = _refund(api, charge=charge["id"]).json()

    response = processor_sandbox.http.post(
        f"/_sandbox/refunds/{refund['id']}/settle", json={"status": "succeeded"}
    )
    bad = processor_sandbox.http.post(
        f"/_sandbox/refunds/{refund['id']}/settle", json={"status": "pending"}
    )

    assert (response.status_code, bad.status_code) == (409, 400)


def test_refund_behavior_switch_applies_to_later_refunds(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_sandbox.create_charge(900)
    before = _refund(api, charge=charge["id"], amount="100").json()

    switched = processor_sandbox.set_refund_behavior(charge["id"], "requires_action")
    after = _refund(api, charge=charge["id"], amount="100").json()
    bad = processor_sandbox.http.post(
        f"/_sandbox/charges/{charge['id']}/refund_behavior", json={"refund_behavior": "explode"}
    )
    missing = processor_sandbox.http.post(
        "/_sandbox/charges/ch_nope/refund_behavior", json={"refund_behavior": "fail"}
    )

    assert switched["refund_behavior"] == "requires_action"
    assert (before["status"], after["status"]) == ("succeeded", "requires_action")
    assert api.get(f"/v1/refunds/{before['id']}").json()["status"] == "succeeded"
    assert (bad.status_code, missing.status_code) == (400, 404)


# --- expand, Stripe-Version, Request-Id ------------------------------------------------------


def test_expand_charge_on_retrieve_create_and_list(
    processor_sandbox: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_sandbox.create_charge(500)
    created = api.post(
        "/v1/refunds", data={"charge": charge["id"], "amount": "50", "expand[]": "charge"}
    ).json()

    indexed = api.get(f"/v1/refunds/{created['id']}", params={"expand[0]": "charge"}).json()
    plain = api.get(f"/v1/refunds/{created['id']}").json()
    listed = api.get(
        "/v1/refunds", params={"charge": charge["id"], "expand[]": "data.charge"}
    ).json()

    assert created["charge"]["object"] == "charge"
    assert created["charge"]["amount_refunded"] == 50
    assert indexed["charge"]["id"] == charge["id"]
    assert indexed["charge"]["refunds"]["data"][0]["id"] == created["id"]
    assert plain["charge"] == charge["id"]
    assert [r["charge"]["id"] for r in listed["data"]] == [charge["id"]]


@pytest.mark.parametrize(
    ("method", "path", "params", "message"),
    [
        ("GET", "/v1/refunds/{refund}", {"expand[]": "payment_intent"}, "(payment_intent)."),
        ("GET", "/v1/refunds", {"expand[]": "charge"}, "expanding 'data.charge' instead."),
        ("POST", "/v1/refunds", {"expand[0]": "data.charge"}, "(data.charge)."),
        ("GET", "/v1/charges/{charge}", {"expand[]": "refunds"}, "(refunds)."),
    ],
)
def test_unknown_expand_paths_are_refused(
    processor_sandbox: ProcessorSandbox,
    api: httpx.Client,
    method: str,
    path: str,
    params: dict[str, str],
    message: str,
) -> None:
    charge = processor_sandbox.create_charge(500)
    refund = _refund(api, charge=charge["id"], amount="10").json()
    url = path.format(refund=refund["id"], charge=charge["id"])

    if method == "GET":
        response = api.get(url, params=params)
    else:
        response = api.post(url, data={"charge": charge["id"], **params})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("This property cannot be expanded")
    assert error["message"].endswith(message)
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 10


def test_stripe_version_is_echoed_or_defaulted_and_request_ids_are_fresh(
    processor_faults: ProcessorSandbox, api: httpx.Client
) -> None:
    charge = processor_faults.create_charge(500)

    pinned = api.get(f"/v1/charges/{charge['id']}", headers={"Stripe-Version": "2024-06-20"})
    named = api.get(f"/v1/charges/{charge['id']}", headers={"Stripe-Version": "2025-12-15.clover"})
    default = api.get(f"/v1/charges/{charge['id']}")
    unauthorised = httpx.get(f"{processor_faults.url}/v1/charges/{charge['id']}")
    log = processor_faults.requests()

    assert pinned.headers["stripe-version"] == "2024-06-20"
    assert named.headers["stripe-version"] == "2025-12-15.clover"
    assert default.headers["stripe-version"] == DEFAULT_API_VERSION
    assert unauthorised.status_code == 401 and unauthorised.headers["request-id"]
    ids = [r.headers["request-id"] for r in (pinned, named, default, unauthorised)]
    assert all(i.startswith("req_") for i in ids) and len(set(ids)) == 4
    assert [(r["stripe_version"], r["request_id"]) for r in log] == [
        ("2024-06-20", ids[0]),
        ("2025-12-15.clover", ids[1]),
        (None, ids[2]),
        (None, ids[3]),
    ]


@pytest.mark.parametrize("version", ["2024-6-20", "latest", "2024-06-20.", "2024-06-20.Clover!"])
def test_malformed_stripe_version_is_refused(
    processor_sandbox: ProcessorSandbox, api: httpx.Client, version: str
) -> None:
    charge = processor_sandbox.create_charge(500)

    response = api.post(
        "/v1/refunds", data={"charge": charge["id"]}, headers={"Stripe-Version": version}
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "api_version_invalid"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["stripe-version"] == DEFAULT_API_VERSION
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 0


# --- the admin API is behind the key ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/_sandbox/faults"),
        ("POST", "/_sandbox/faults"),
        ("GET", "/_sandbox/requests"),
        ("POST", "/_sandbox/charges"),
        ("POST", "/_sandbox/clock"),
        ("GET", "/_sandbox/clock"),
        ("POST", "/_sandbox/reset"),
    ],
)
@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "api_key_missing"), ({"Authorization": "Bearer sk_wrong"}, "api_key_invalid")],
)
def test_admin_api_requires_the_bearer_key(
    processor_sandbox: ProcessorSandbox,
    method: str,
    path: str,
    headers: dict[str, str],
    code: str,
) -> None:
    before = processor_sandbox.clock()["offset_s"]
    response = httpx.request(
        method, f"{processor_sandbox.url}{path}", json={"amount": 100}, headers=headers
    )

    assert response.status_code == 401
    assert response.json()["error"]["code"] == code
    assert processor_sandbox.clock()["offset_s"] == before

"""HttpAmsClient against the AMS sandbox over real HTTP: entitlements go, and stay gone."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from refundsaga.ams import (
    AmsAuthError,
    AmsClient,
    AmsMemberNotFound,
    AmsRejected,
    AmsRemoval,
    AmsUnavailable,
    HttpAmsClient,
)
from sandboxes.ams import create_app
from tests.fixtures.sandboxes import AmsSandbox, serve_app


def _member() -> str:
    return f"M-{uuid.uuid4().hex[:10]}"


def _key() -> str:
    return f"test-{uuid.uuid4()}"


async def test_http_client_implements_the_protocol(ams_client: HttpAmsClient) -> None:
    client: AmsClient = ams_client

    assert isinstance(client, AmsClient)


async def test_list_entitlements(ams_sandbox: AmsSandbox, ams_client: HttpAmsClient) -> None:
    member = _member()
    ams_sandbox.grant(member, "CME-101")
    ams_sandbox.grant(member, "CME-202")

    entitlements = await ams_client.list_entitlements(member)

    assert [e.product_code for e in entitlements] == ["CME-101", "CME-202"]
    assert {e.status for e in entitlements} == {"active"}
    assert all(isinstance(e.granted_at, datetime) for e in entitlements)
    assert await ams_client.has_active_entitlement(member, "CME-101") is True
    assert await ams_client.has_active_entitlement(member, "CME-999") is False


async def test_remove_twice_is_removed_then_already_absent(
    ams_sandbox: AmsSandbox, ams_client: HttpAmsClient
) -> None:
    member = _member()
    ams_sandbox.grant(member, "CME-101")
    ams_sandbox.grant(member, "CME-202")

    first = await ams_client.remove_entitlement(member, "CME-101", idempotency_key=_key())
    second = await ams_client.remove_entitlement(member, "CME-101", idempotency_key=_key())

    assert first == AmsRemoval(
        member_id=member, product_code="CME-101", removed=True, already_absent=False
    )
    assert second == AmsRemoval(
        member_id=member, product_code="CME-101", removed=False, already_absent=True
    )
    assert ams_sandbox.entitlements(member) == ["CME-202"]
    assert await ams_client.has_active_entitlement(member, "CME-101") is False


async def test_removing_a_never_granted_entitlement_is_already_absent(
    ams_sandbox: AmsSandbox, ams_client: HttpAmsClient
) -> None:
    member = _member()
    ams_sandbox.grant(member, "CME-101")

    removal = await ams_client.remove_entitlement(member, "OTHER", idempotency_key=_key())

    assert (removal.removed, removal.already_absent) == (False, True)
    assert ams_sandbox.entitlements(member) == ["CME-101"]


async def test_retried_delete_with_the_same_key_replays_success(
    ams_sandbox: AmsSandbox, ams_client: HttpAmsClient
) -> None:
    member = _member()
    ams_sandbox.grant(member, "CME-101")
    key = _key()

    first = await ams_client.remove_entitlement(member, "CME-101", idempotency_key=key)
    retry = await ams_client.remove_entitlement(member, "CME-101", idempotency_key=key)

    assert first.removed and retry.removed
    assert ams_sandbox.entitlements(member) == []


async def test_unknown_member(ams_client: HttpAmsClient) -> None:
    with pytest.raises(AmsMemberNotFound) as on_list:
        await ams_client.list_entitlements("M-nobody")
    with pytest.raises(AmsMemberNotFound):
        await ams_client.remove_entitlement("M-nobody", "CME-101", idempotency_key=_key())
    with pytest.raises(AmsMemberNotFound):
        await ams_client.has_active_entitlement("M-nobody", "CME-101")

    assert (on_list.value.code, on_list.value.http_status) == ("member_not_found", 404)
    assert on_list.value.retryable is False


async def test_wrong_key_raises_auth_error_without_leaking_it(ams_sandbox: AmsSandbox) -> None:
    secret = "ams_wrong_secret_value"
    member = _member()
    ams_sandbox.grant(member, "CME-101")

    async with HttpAmsClient(ams_sandbox.url, SecretStr(secret), timeout_s=2) as client:
        with pytest.raises(AmsAuthError) as caught:
            await client.remove_entitlement(member, "CME-101", idempotency_key=_key())
        assert secret not in repr(client)

    assert caught.value.http_status == 401
    assert secret not in str(caught.value)
    assert ams_sandbox.entitlements(member) == ["CME-101"]


async def test_bare_404_is_not_mistaken_for_already_absent(ams_sandbox: AmsSandbox) -> None:
    member = _member()
    ams_sandbox.grant(member, "CME-101")

    # A wrong base path yields a 404 without the AMS's entitlement_not_found code.
    wrong = HttpAmsClient(f"{ams_sandbox.url}/v1/typo", SecretStr(ams_sandbox.api_key))
    async with wrong as client:
        with pytest.raises(AmsRejected) as caught:
            await client.remove_entitlement(member, "CME-101", idempotency_key=_key())

    assert caught.value.http_status == 404
    assert ams_sandbox.entitlements(member) == ["CME-101"]


@pytest.mark.parametrize("fault", ["error", "drop"])
async def test_faulted_removal_is_unavailable_and_changes_nothing(
    ams_faults: AmsSandbox, ams_client: HttpAmsClient, fault: str
) -> None:
    member = _member()
    ams_faults.grant(member, "CME-101")
    ams_faults.set_faults(**{f"{fault}_rate": 1.0})

    with pytest.raises(AmsUnavailable) as caught:
        await ams_client.remove_entitlement(member, "CME-101", idempotency_key=_key())

    assert caught.value.retryable is True
    assert ams_faults.entitlements(member) == ["CME-101"]


async def test_hanging_ams_times_out_as_unavailable(ams_faults: AmsSandbox) -> None:
    member = _member()
    ams_faults.grant(member, "CME-101")
    ams_faults.set_faults(timeout_rate=1.0, hang_ms=2000)

    async with HttpAmsClient(ams_faults.url, SecretStr(ams_faults.api_key), timeout_s=0.5) as c:
        with pytest.raises(AmsUnavailable, match="timed out"):
            await c.list_entitlements(member)


async def test_lost_response_then_retries_end_removed(
    ams_faults: AmsSandbox, ams_client: HttpAmsClient
) -> None:
    member = _member()
    ams_faults.grant(member, "CME-101")
    key = _key()
    ams_faults.set_faults(lost_response_rate=1.0)

    with pytest.raises(AmsUnavailable):
        await ams_client.remove_entitlement(member, "CME-101", idempotency_key=key)
    ams_faults.clear_faults()
    same_key = await ams_client.remove_entitlement(member, "CME-101", idempotency_key=key)
    new_key = await ams_client.remove_entitlement(member, "CME-101", idempotency_key=_key())

    assert same_key.removed is True
    assert new_key.already_absent is True
    assert ams_faults.entitlements(member) == []


def test_admin_member_view_shows_removed_entitlements(ams_sandbox: AmsSandbox) -> None:
    member = _member()
    created = ams_sandbox.http.post(
        "/_sandbox/members", json={"member_id": member, "entitlements": ["A", "B"]}
    ).json()
    httpx.delete(
        f"{ams_sandbox.url}/v1/members/{member}/entitlements/A",
        headers={"Authorization": f"Bearer {ams_sandbox.api_key}"},
    )

    view = ams_sandbox.http.get(f"/_sandbox/members/{member}").json()

    assert [e["product_code"] for e in created["entitlements"]] == ["A", "B"]
    assert {e["product_code"]: e["status"] for e in view["entitlements"]} == {
        "A": "removed",
        "B": "active",
    }
    assert view["entitlements"][0]["removed_at"] is not None
    assert ams_sandbox.http.get("/_sandbox/members/M-nobody").status_code == 404


def test_ams_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "ams.json"
    auth = {"Authorization": "Bearer k"}
    with serve_app(create_app(api_key="k", state_path=state)) as url:
        members = {"member_id": "M-1", "entitlements": ["A"]}
        httpx.post(f"{url}/_sandbox/members", json=members, headers=auth)
        grant = {"member_id": "M-1", "product_code": "B"}
        httpx.post(f"{url}/_sandbox/entitlements", json=grant, headers=auth)
        httpx.delete(f"{url}/v1/members/M-1/entitlements/A", headers=auth)

    with serve_app(create_app(api_key="k", state_path=state)) as url:
        listed = httpx.get(f"{url}/v1/members/M-1/entitlements", headers=auth).json()

    assert listed["member_id"] == "M-1"
    assert [e["product_code"] for e in listed["data"]] == ["B"]


@pytest.mark.parametrize("path", ["/_sandbox/members/M-1", "/_sandbox/requests", "/_sandbox/clock"])
def test_ams_admin_api_requires_the_bearer_key(ams_sandbox: AmsSandbox, path: str) -> None:
    missing = httpx.get(f"{ams_sandbox.url}{path}")
    wrong = httpx.get(f"{ams_sandbox.url}{path}", headers={"Authorization": "Bearer nope"})

    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert missing.json()["error"]["code"] == "api_key_missing"
    assert httpx.get(f"{ams_sandbox.url}/healthz").status_code == 200

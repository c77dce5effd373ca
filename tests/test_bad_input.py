"""Bad input, refused: through the `refund` CLI, the CSV starter and raw signals and updates on
the live stack. Each case gets its clear refusal (exit 2 and one line; an update failure; an
`ignored` entry or a dropped signal) and nothing is started or changed: no saga for the
purchase, the processor charge and the store rows as they were, the saga's state and
approvals as they were."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.common import RawValue
from temporalio.service import RPCError, RPCStatusCode

from console import operations as ops
from console.seed import Scenario, SeededPurchase, seed_purchase
from refundsaga.contracts import ApprovalDecision, RefundRequest, SagaState, SagaStatus
from refundsaga.store import OasisStore
from refundsaga.temporal import connect
from tests.fixtures.stack import LiveStack
from workflows.refund_saga import RefundSaga

pytestmark = pytest.mark.devserver

REPO = Path(__file__).resolve().parents[1]
LONG = "x" * 10_000
SQL = "'; DROP TABLE purchases; --"
SCRIPT = "<script>alert(1)</script>"
ANSI = "\x1b[31mrefund now\x1b[0m"
BIDI = "refund \u202edecnac"
EMAIL = "asked by jane.doe@example.org"
UNKNOWN_PURCHASE = 99_999_999
HUGE_PURCHASE = 2**40

# name -> (scenario, who starts a saga for it in the setup, or None for no saga)
PURCHASES: dict[str, tuple[Scenario, str | None]] = {
    "fresh": ("standard", None),  # never gets a saga: every start refusal targets it
    "over": ("standard", None),  # asked for more than the unrefunded rest
    "currency": ("standard", None),  # asked in the wrong currency
    "waiting": ("standard", "alice"),  # AWAITING_APPROVAL, one approval needed
    "dual": ("manual_ams", "sam"),  # AWAITING_APPROVAL, bob approved, one more needed
    "ended": ("standard", "sam"),  # REJECTED by carol
}


# --- the shared scene: purchases and sagas, seeded once ------------------------------------


@dataclass
class Scene:
    live: LiveStack
    client: Client
    purchases: dict[str, SeededPurchase]
    money: dict[str, Any]
    """Per purchase: the processor's charge and the store's row, before any bad input."""
    sagas: dict[str, Any]
    """Per saga: its state and decisions, before any bad input."""

    def pid(self, name: str) -> int:
        return self.purchases[name].purchase_id

    def wid(self, name: str) -> str:
        return ops.workflow_id_for(self.pid(name))

    @property
    def ids(self) -> dict[str, str]:
        return {name: str(self.pid(name)) for name in self.purchases}


def money_of(live: LiveStack, store: OasisStore, purchase: SeededPurchase) -> Any:
    response = httpx.get(
        f"{live.settings.processor_url}/v1/charges/{purchase.charge_id}",
        headers={"Authorization": f"Bearer {live.settings.processor_api_key.get_secret_value()}"},
    )
    response.raise_for_status()
    charge = response.json()
    snapshot = store.load_purchase(purchase.purchase_id)
    assert snapshot is not None
    return (charge["amount_refunded"], len(charge["refunds"]["data"]), snapshot.model_dump())


def saga_of(status: SagaStatus) -> Any:
    return (status.state, [(a.approver, a.approve) for a in status.approvals])


@pytest.fixture(scope="module")
async def scene(live_stack: LiveStack) -> AsyncIterator[Scene]:
    settings = live_stack.settings
    store = OasisStore.from_url(settings.resolved_database_url)
    with httpx.Client(timeout=10.0) as http:
        purchases = {
            name: seed_purchase(
                store,
                http,
                processor_url=settings.processor_url,
                ams_url=settings.ams_url,
                processor_api_key=settings.processor_api_key.get_secret_value(),
                ams_api_key=settings.ams_api_key.get_secret_value(),
                scenario=scenario,
            )
            for name, (scenario, _) in PURCHASES.items()
        }
    client = await connect(settings)
    sagas = {name: by for name, (_, by) in PURCHASES.items() if by}
    for name, by in sagas.items():
        request = RefundRequest(
            purchase_id=purchases[name].purchase_id, reason="set-up", requested_by=by
        )
        await ops.start_refund(client, settings, request)
    wid = {name: ops.workflow_id_for(p.purchase_id) for name, p in purchases.items()}
    for name in sagas:
        await ops.wait_for_state(client, wid[name], {SagaState.AWAITING_APPROVAL}, timeout_s=60)
    await ops.decide(client, wid["dual"], ApprovalDecision(approver="bob"))
    await ops.decide(client, wid["ended"], ApprovalDecision(approver="carol", approve=False))
    await ops.wait_for_state(client, wid["ended"], {SagaState.REJECTED}, timeout_s=60)
    scene = Scene(
        live=live_stack,
        client=client,
        purchases=purchases,
        money={name: money_of(live_stack, store, p) for name, p in purchases.items()},
        sagas={name: saga_of(await ops.get_status(client, wid[name])) for name in sagas},
    )
    try:
        yield scene
    finally:
        store.close()
        for name in ("waiting", "dual"):
            await client.get_workflow_handle(wid[name]).terminate("bad-input suite over")


async def assert_no_saga(scene: Scene, purchase_id: int) -> None:
    """Nothing was started for the purchase: no workflow with its id, none listed for it."""
    workflow_id = ops.workflow_id_for(purchase_id)
    with pytest.raises(RPCError) as info:
        await scene.client.get_workflow_handle(workflow_id).describe()
    assert info.value.status == RPCStatusCode.NOT_FOUND
    query = ops.list_query(purchase_id=purchase_id)
    assert await ops.list_sagas(scene.client, query, limit=5) == []


async def assert_unchanged(scene: Scene, name: str) -> None:
    """The purchase's money and rows, and its saga if it has one, are as before."""
    store = OasisStore.from_url(scene.live.settings.resolved_database_url)
    try:
        assert money_of(scene.live, store, scene.purchases[name]) == scene.money[name]
    finally:
        store.close()
    if name in scene.sagas:
        status = await ops.get_status(scene.client, scene.wid(name))
        assert saga_of(status) == scene.sagas[name]


# --- the `refund` CLI -------------------------------------------------------------------------

Outcome = Literal["nothing", "failed", "unchanged"]


@dataclass(frozen=True)
class CliCase:
    id: str
    args: tuple[str, ...]
    """Arguments; `{fresh}`, `{waiting}`, ... name the scene's purchases."""
    refusal: str
    """Text the one-line refusal contains."""
    target: str
    """The scene purchase that must stay as it was (or a literal purchase id)."""
    outcome: Outcome = "nothing"
    """nothing: no saga was started; failed: the saga refused the request at once (FAILED);
    unchanged: the existing saga is as it was."""


def start(
    purchase: str, *extra: str, reason: str = "duplicate", who: str = "sam"
) -> tuple[str, ...]:
    return ("start", purchase, "--reason", reason, "--as", who, *extra)


CLI_CASES = [
    CliCase("start-amount-zero", start("{fresh}", "--amount", "0"), "greater than 0", "fresh"),
    CliCase(
        "start-amount-fractional", start("{fresh}", "--amount", "12.5"), "valid integer", "fresh"
    ),
    CliCase(
        "start-amount-overflow",
        start("{fresh}", "--amount", str(10**20)),
        "less than or equal to",
        "fresh",
    ),
    CliCase(
        "start-amount-above-the-rest",
        start("{over}", "--amount", "10000000"),
        "exceeds the unrefunded",
        "over",
        "failed",
    ),
    CliCase(
        "start-wrong-currency",
        start("{currency}", "--currency", "eur"),
        "does not match",
        "currency",
        "failed",
    ),
    CliCase(
        "start-malformed-currency",
        start("{fresh}", "--currency", "EURO"),
        "should match pattern",
        "fresh",
    ),
    CliCase(
        "start-unknown-purchase",
        start(str(UNKNOWN_PURCHASE)),
        "does not exist",
        str(UNKNOWN_PURCHASE),
        "failed",
    ),
    CliCase(
        "start-purchase-id-overflow",
        start(str(HUGE_PURCHASE)),
        "less than or equal to",
        str(HUGE_PURCHASE),
    ),
    CliCase(
        "start-reason-10000-chars", start("{fresh}", reason=LONG), "at most 500 characters", "fresh"
    ),
    CliCase("start-reason-sql-injection", start("{fresh}", reason=SQL), "SQL", "fresh"),
    CliCase("start-reason-ansi-escape", start("{fresh}", reason=ANSI), "control", "fresh"),
    CliCase("start-reason-blank", start("{fresh}", reason="   "), "must not be blank", "fresh"),
    CliCase(
        "start-requester-is-a-name",
        start("{fresh}", who="Sam Smith"),
        "should match pattern",
        "fresh",
    ),
    CliCase("start-duplicate", start("{waiting}"), "already running", "waiting", "unchanged"),
    CliCase(
        "approve-not-on-allowlist",
        ("approve", "{waiting}", "--as", "mallory"),
        "not on the approver allowlist",
        "waiting",
        "unchanged",
    ),
    CliCase(
        "approve-own-request",
        ("approve", "{waiting}", "--as", "alice"),
        "four-eyes",
        "waiting",
        "unchanged",
    ),
    CliCase(
        "approve-second-time",
        ("approve", "{dual}", "--as", "bob"),
        "already decided",
        "dual",
        "unchanged",
    ),
    CliCase(
        "reject-ended-saga",
        ("reject", "{ended}", "--as", "bob"),
        "already ended",
        "ended",
        "unchanged",
    ),
    CliCase(
        "approve-comment-email",
        ("approve", "{waiting}", "--as", "bob", "--comment", EMAIL),
        "email",
        "waiting",
        "unchanged",
    ),
    CliCase(
        "approve-unknown-saga",
        ("approve", "refund-does-not-exist", "--as", "bob"),
        "no refund saga",
        "waiting",
        "unchanged",
    ),
    CliCase(
        "approve-markup-in-saga-ref",
        ("approve", "[/x]", "--as", "bob"),
        "no refund saga [/x]",
        "waiting",
        "unchanged",
    ),
    CliCase(
        "resolve-unknown-action",
        ("resolve", "{waiting}", "frobnicate", "--as", "olivia"),
        "'frobnicate' is not one of",
        "waiting",
        "unchanged",
    ),
    CliCase(
        "resolve-not-needing-attention",
        ("resolve", "{waiting}", "retry", "--as", "olivia"),
        "not waiting for ops",
        "waiting",
        "unchanged",
    ),
    CliCase(
        "confirm-ams-not-waiting-for-it",
        ("confirm-ams", "{waiting}", "--as", "olivia", "--reference", "AMS-1"),
        "not waiting for an AMS confirmation",
        "waiting",
        "unchanged",
    ),
    CliCase(
        "confirm-ams-empty-reference",
        ("confirm-ams", "{dual}", "--as", "olivia", "--reference", ""),
        "at least 1 character",
        "dual",
        "unchanged",
    ),
    CliCase(
        "list-since-overflow",
        ("list", "--since", "99999999999d"),
        "reaches back too far",
        "waiting",
        "unchanged",
    ),
]


def run(scene_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "console.cli", *args]
    return subprocess.run(
        command, env=scene_env, capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.fixture(scope="module")
def cli_results(scene: Scene) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every CLI case, run once, a few at a time: each is a fresh interpreter (~1 s)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            case.id: pool.submit(run, scene.live.env, *(a.format(**scene.ids) for a in case.args))
            for case in CLI_CASES
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
async def test_cli_refuses(
    case: CliCase, scene: Scene, cli_results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    done = cli_results[case.id]
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert case.refusal in lines[0]
    purchase_id = scene.pid(case.target) if case.target in scene.purchases else int(case.target)
    if case.outcome == "nothing":
        await assert_no_saga(scene, purchase_id)
    elif case.outcome == "failed":
        result = await ops.get_status(scene.client, ops.workflow_id_for(purchase_id))
        assert result.state == SagaState.FAILED and case.refusal in (result.error or "")
        assert result.approvals == [] and result.refund.amount_cents == 0
    if case.target in scene.purchases:
        await assert_unchanged(scene, case.target)


async def test_a_quoted_list_filter_cannot_widen_the_query(scene: Scene) -> None:
    # A requester name that closes the quote and ORs in every saga: matches nothing.
    injected = 'nobody" OR WorkflowType="RefundSaga'
    done = await asyncio.to_thread(
        run, scene.live.env, "list", "--requested-by", injected, "--json"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


# --- the CSV starter --------------------------------------------------------------------------


@dataclass(frozen=True)
class CsvRow:
    id: str
    purchase: str
    amount: str
    reason: str
    refusal: str


CSV_ROWS = [
    CsvRow("csv-amount-zero", "{fresh}", "0", "dup", "greater than 0"),
    CsvRow("csv-amount-negative", "{fresh}", "-100", "dup", "greater than 0"),
    CsvRow("csv-amount-fractional", "{fresh}", "12.5", "dup", "whole cents"),
    CsvRow("csv-amount-exponent", "{fresh}", "1e3", "dup", "whole cents"),
    CsvRow("csv-amount-superscript", "{fresh}", "\u00b2", "dup", "whole cents"),
    CsvRow("csv-amount-arabic-digits", "{fresh}", "\u0661\u0662", "dup", "whole cents"),
    CsvRow("csv-amount-overflow", "{fresh}", str(10**20), "dup", "less than or equal to"),
    CsvRow("csv-purchase-not-a-number", "abc", "10", "dup", "not a positive whole number"),
    CsvRow("csv-purchase-zero", "0", "10", "dup", "greater than 0"),
    CsvRow("csv-purchase-overflow", str(HUGE_PURCHASE), "10", "dup", "less than or equal to"),
    CsvRow("csv-reason-empty", "{fresh}", "10", "", "at least 1 character"),
    CsvRow("csv-reason-10000-chars", "{fresh}", "10", LONG, "at most 500 characters"),
    CsvRow("csv-reason-sql-injection", "{fresh}", "10", SQL, "SQL"),
    CsvRow("csv-reason-script-tag", "{fresh}", "10", SCRIPT, "markup"),
    CsvRow("csv-reason-ansi-escape", "{fresh}", "10", ANSI, "control"),
    CsvRow("csv-reason-bidi-override", "{fresh}", "10", BIDI, "control"),
    CsvRow("csv-reason-nul", "{fresh}", "10", "dup\x00licate", "control"),
    CsvRow("csv-reason-email", "{fresh}", "10", EMAIL, "email"),
    CsvRow("csv-unquoted-comma", "{fresh}", "10", "dup,licate", "too many fields"),
    CsvRow("csv-saga-already-running", "{waiting}", "", "dup", "already running"),
    CsvRow("csv-same-purchase-twice", "{waiting}", "", "again", "appears twice"),
]


def starter(scene: Scene, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "starter.py", "--csv", str(path), "--as", "sam", *extra]
    return subprocess.run(
        command, env=scene.live.env, capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.fixture(scope="module")
def csv_summary(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One starter run over every bad row (not a dry run: a valid row would start)."""
    path = tmp_path_factory.mktemp("csv") / "refunds.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["purchase_id", "amount", "reason"])
        for row in CSV_ROWS:
            # The unquoted comma case is the one row a spreadsheet would not have written.
            reason = row.reason.split(",") if row.id == "csv-unquoted-comma" else [row.reason]
            writer.writerow([row.purchase.format(**scene.ids), row.amount, *reason])
    done = starter(scene, path, "--json")
    assert done.returncode == 2, done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    assert summary["started"] == [] and summary["valid"] == 1
    return summary


@pytest.mark.parametrize("row", CSV_ROWS, ids=[r.id for r in CSV_ROWS])
async def test_csv_row_refused(row: CsvRow, scene: Scene, csv_summary: dict[str, Any]) -> None:
    number = CSV_ROWS.index(row) + 2  # the header is row 1
    if row.id == "csv-saga-already-running":
        (running,) = csv_summary["already_running"]
        assert running["purchase_id"] == scene.pid("waiting")
        assert row.refusal in running["reason"]
    else:
        (refused,) = [r for r in csv_summary["refused"] if r["row"] == number]
        assert row.refusal in refused["reason"]
    if "{fresh}" in row.purchase:
        await assert_no_saga(scene, scene.pid("fresh"))
        await assert_unchanged(scene, "fresh")
    elif "{waiting}" in row.purchase:
        await assert_unchanged(scene, "waiting")
    elif row.purchase.isdigit() and int(row.purchase) > 0:
        await assert_no_saga(scene, int(row.purchase))


@pytest.mark.parametrize(
    ("content", "refusal"),
    [
        (b"purchase_id,amount,reason\n1,10,caf\xe9\n", "not UTF-8 text"),
        (b"purchase,amount,reason\n1,10,dup\n", "missing column(s) purchase_id"),
    ],
    ids=["csv-file-not-utf8", "csv-file-missing-column"],
)
async def test_csv_file_refused_in_one_line(
    content: bytes, refusal: str, scene: Scene, tmp_path: Path
) -> None:
    path = tmp_path / "refunds.csv"
    path.write_bytes(content.replace(b"1,", f"{scene.pid('fresh')},".encode(), 1))
    done = await asyncio.to_thread(starter, scene, path)
    assert done.returncode == 2
    assert refusal in done.stderr and "Traceback" not in done.stderr
    await assert_no_saga(scene, scene.pid("fresh"))


async def test_a_spreadsheet_csv_with_a_byte_order_mark_is_read(
    scene: Scene, tmp_path: Path
) -> None:
    path = tmp_path / "excel.csv"
    path.write_text(f"purchase_id,amount,reason\n{scene.pid('fresh')},100,dup\n", "utf-8-sig")
    done = await asyncio.to_thread(starter, scene, path, "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["valid"] == 1
    await assert_no_saga(scene, scene.pid("fresh"))


# --- raw signals and updates --------------------------------------------------------------------


@dataclass(frozen=True)
class SignalCase:
    id: str
    target: str
    signal: str
    arg: Any
    ignored: str | None
    """The reason recorded in status.ignored; None: the SDK drops an undecodable signal."""


def raw(data: bytes, encoding: bytes = b"json/plain") -> RawValue:
    return RawValue(Payload(metadata={"encoding": encoding}, data=data))


SIGNAL_CASES = [
    SignalCase(
        "signal-approve-not-on-allowlist",
        "waiting",
        "approve",
        {"approver": "mallory"},
        "not on the approver allowlist",
    ),
    SignalCase(
        "signal-approve-own-request", "waiting", "approve", {"approver": "alice"}, "four-eyes"
    ),
    SignalCase(
        "signal-approve-second-time", "dual", "approve", {"approver": "bob"}, "already decided"
    ),
    SignalCase(
        "signal-confirm-ams-not-waiting-for-it",
        "waiting",
        "confirm_ams_removal",
        {"operator": "olivia", "ams_reference": "AMS-1"},
        "not waiting for an AMS confirmation",
    ),
    SignalCase(
        "signal-resolve-not-needing-attention",
        "waiting",
        "resolve",
        {"action": "retry", "operator": "olivia"},
        "not waiting for ops",
    ),
    SignalCase("signal-approve-not-json", "waiting", "approve", raw(b"{not json"), None),
    SignalCase(
        "signal-approve-binary",
        "waiting",
        "approve",
        raw(b"\x00\xff", b"binary/plain"),
        "malformed message: expected ApprovalDecision, got bytes",
    ),
    SignalCase(
        "signal-reject-binary-null",
        "waiting",
        "reject",
        raw(b"", b"binary/null"),
        "malformed message: expected ApprovalDecision, got NoneType",
    ),
    SignalCase(
        "signal-resolve-binary",
        "waiting",
        "resolve",
        raw(b"retry", b"binary/plain"),
        "malformed message: expected Resolution, got bytes",
    ),
    SignalCase(
        "signal-confirm-ams-binary-null",
        "waiting",
        "confirm_ams_removal",
        raw(b"", b"binary/null"),
        "malformed message: expected AmsConfirmation, got NoneType",
    ),
    SignalCase("signal-approve-wrong-shape", "waiting", "approve", {"who": "bob"}, None),
    SignalCase("signal-approve-list-not-object", "waiting", "approve", ["bob"], None),
    SignalCase(
        "signal-approve-nul-in-comment",
        "waiting",
        "approve",
        {"approver": "bob", "comment": "ok\x00"},
        None,
    ),
    SignalCase(
        "signal-approve-10000-char-comment",
        "waiting",
        "approve",
        {"approver": "bob", "comment": LONG},
        None,
    ),
    SignalCase(
        "signal-approve-sql-in-comment",
        "waiting",
        "approve",
        {"approver": "bob", "comment": SQL},
        None,
    ),
    SignalCase(
        "signal-resolve-unknown-action",
        "waiting",
        "resolve",
        {"action": "frobnicate", "operator": "olivia"},
        None,
    ),
]


async def settled(scene: Scene, name: str) -> list[str]:
    """The saga's history once the worker has handled everything sent so far."""
    handle = scene.client.get_workflow_handle(scene.wid(name))
    for _ in range(200):
        history = await handle.fetch_history()
        names = [EventType.Name(e.event_type) for e in history.events]
        if names[-1] in ("EVENT_TYPE_WORKFLOW_TASK_COMPLETED", "EVENT_TYPE_TIMER_STARTED"):
            return names
        await asyncio.sleep(0.05)
    raise AssertionError(f"{scene.wid(name)} never settled: {names[-3:]}")


@pytest.mark.parametrize("case", SIGNAL_CASES, ids=[c.id for c in SIGNAL_CASES])
async def test_signal_refused(case: SignalCase, scene: Scene) -> None:
    handle = scene.client.get_workflow_handle(scene.wid(case.target))
    before = await ops.get_status(scene.client, scene.wid(case.target))
    await handle.signal(case.signal, case.arg)
    events = await settled(scene, case.target)
    assert "EVENT_TYPE_WORKFLOW_TASK_FAILED" not in events
    status = await ops.get_status(scene.client, scene.wid(case.target))
    new = status.ignored[len(before.ignored) :]
    if case.ignored is None:
        assert new == []  # dropped by the SDK before the saga sees it, and logged
    else:
        (entry,) = new
        assert case.ignored in entry.reason
    await assert_unchanged(scene, case.target)


async def test_an_oversized_signal_is_refused_by_the_server(scene: Scene) -> None:
    handle = scene.client.get_workflow_handle(scene.wid("waiting"))
    with pytest.raises(RPCError, match=r"(?i)size exceeds"):
        await handle.signal("approve", {"approver": "bob", "comment": "x" * 3_000_000})
    await assert_unchanged(scene, "waiting")


async def test_a_signal_to_an_ended_saga_is_refused(scene: Scene) -> None:
    handle = scene.client.get_workflow_handle(scene.wid("ended"))
    with pytest.raises(RPCError, match=r"(?i)completed|not found"):
        await handle.signal(RefundSaga.approve, ApprovalDecision(approver="bob"))
    await assert_unchanged(scene, "ended")


@dataclass(frozen=True)
class UpdateCase:
    id: str
    target: str
    update: str
    arg: Any
    refusal: str


UPDATE_CASES = [
    UpdateCase(
        "update-decide-wrong-shape", "waiting", "decide", {"who": "bob"}, "invalid ApprovalDecision"
    ),
    UpdateCase(
        "update-decide-not-json", "waiting", "decide", raw(b"{not json"), "invalid ApprovalDecision"
    ),
    UpdateCase(
        "update-decide-10000-char-comment",
        "waiting",
        "decide",
        {"approver": "bob", "comment": LONG},
        "invalid ApprovalDecision",
    ),
    UpdateCase(
        "update-decide-script-in-comment",
        "waiting",
        "decide",
        {"approver": "bob", "comment": SCRIPT},
        "invalid ApprovalDecision",
    ),
    UpdateCase(
        "update-decide-not-on-allowlist",
        "waiting",
        "decide",
        {"approver": "mallory"},
        "not on the approver allowlist",
    ),
    UpdateCase(
        "update-resolve-unknown-action",
        "waiting",
        "resolve_attention",
        {"action": "frobnicate", "operator": "olivia"},
        "invalid Resolution: action",
    ),
    UpdateCase(
        "update-confirm-ams-not-waiting-for-it",
        "waiting",
        "confirm_ams",
        {"operator": "olivia", "ams_reference": "AMS-1"},
        "not waiting for an AMS confirmation",
    ),
    UpdateCase(
        "update-decide-binary",
        "waiting",
        "decide",
        raw(b"\x00", b"binary/plain"),
        "malformed message: expected ApprovalDecision, got bytes",
    ),
    UpdateCase(
        "update-resolve-binary-null",
        "waiting",
        "resolve_attention",
        raw(b"", b"binary/null"),
        "malformed message: expected Resolution, got NoneType",
    ),
    UpdateCase("update-unknown-name", "waiting", "frobnicate", {"approver": "bob"}, "not found"),
]


@pytest.mark.parametrize("case", UPDATE_CASES, ids=[c.id for c in UPDATE_CASES])
async def test_update_refused(case: UpdateCase, scene: Scene) -> None:
    handle = scene.client.get_workflow_handle(scene.wid(case.target))
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(case.update, case.arg)
    assert case.refusal in str(info.value.cause)
    await assert_unchanged(scene, case.target)


async def test_an_update_on_an_ended_saga_is_refused(scene: Scene) -> None:
    handle = scene.client.get_workflow_handle(scene.wid("ended"))
    with pytest.raises(RPCError, match=r"(?i)completed"):
        await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    await assert_unchanged(scene, "ended")


# --- forged messages and starts ----------------------------------------------------------------

WIDENING_FILTER = 'RefundAmountCents < 10000) OR (ExecutionStatus="Running"'


@pytest.mark.parametrize("mode", ["--yes", "--dry-run"])
async def test_a_bulk_filter_that_closes_the_bracket_decides_nothing(
    mode: str, scene: Scene
) -> None:
    # Unchecked, `... AND (RefundAmountCents < 10000) OR (ExecutionStatus="Running")` lists every
    # running workflow: the waiting sagas, batches and restores would all be approved.
    done = await asyncio.to_thread(
        run, scene.live.env, "approve", "--query", WIDENING_FILTER, "--as", "bob", mode
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "filter was refused" in lines[0], done.stderr
    assert done.stdout == ""
    for name in ("waiting", "dual", "ended"):
        await assert_unchanged(scene, name)


# --- and what is not bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    [
        "refunded; update the notes later",
        "customer called; delete the old card",
        "amount < 50 and refund > 0",
        "duplicate -- customer asked twice",
        "it's a duplicate, or close to one",
        "the board's call: event cancelled",
        "multi-line\nreason\twith tab",
    ],
)
def test_ordinary_prose_is_not_refused(reason: str) -> None:
    # The free-text rules match statement and markup shapes, not words people write.
    request = RefundRequest(purchase_id=1, reason=reason, requested_by="sam")
    assert request.reason == reason

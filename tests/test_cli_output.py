"""The CLI's human output shows terminal escape sequences from saga text; it never sends them."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from console import cli, operations
from console.cli import support, views
from console.terminal import markup_safe, printable, terminal_console
from refundsaga.contracts import (
    AccessDecision,
    ApprovalRecord,
    BatchIssue,
    BatchState,
    BatchStatus,
    IgnoredMessage,
    RefundSummary,
    RestoreState,
    RestoreStatus,
    SagaState,
    SagaStatus,
    TimelineEntry,
)
from refundsaga.settings import Settings

AT = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
# Retitle the window, clear the screen, a C1 CSI, a right-to-left override, a fake hyperlink
# in rich markup, and a newline that would fake a line of output.
TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J"
EVIL = f"{TITLE}{CLEAR}\x9b31m\u202egpj.exe[link=https://evil.example]click[/link]\nerror: fake"
# Anything a terminal acts on, except the newline rich lays out with: C0, DEL, C1, bidi.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def evil_status() -> SagaStatus:
    return SagaStatus(
        workflow_id="refund-42",
        state=SagaState.NEEDS_ATTENTION,
        purchase_id=42,
        amount_cents=2500,
        currency="usd",
        requested_by=f"sam{CLEAR}",
        refund=RefundSummary(source="processor", processor_refund_ids=[f"re_1{TITLE}"]),
        access=AccessDecision(has_access=True, reasons=["ams_entitlement"]),
        approvals=[ApprovalRecord(approver=f"bob{TITLE}", approve=True, at=AT)],
        required_approvals=1,
        error=f"processor said: {EVIL}",
        ignored=[IgnoredMessage(kind=f"decide{CLEAR}", by=f"mallory{TITLE}", at=AT, reason=EVIL)],
        timeline=[TimelineEntry(at=AT, step=f"refund{CLEAR}", actor=f"x{TITLE}", outcome=EVIL)],
    )


def plain_console(monkeypatch: pytest.MonkeyPatch, *, terminal: bool) -> io.StringIO:
    """`views.out` as a bare rich console (no safety hook): only the CLI's own escaping acts."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        force_terminal=terminal,
        width=300,
        color_system="standard" if terminal else None,
    )
    monkeypatch.setattr(views, "out", console)
    return buffer


def assert_shown_not_sent(text: str) -> None:
    assert "\\x1b]0;pwned" in text  # shown, visibly
    assert not RAW.search(text), repr(RAW.search(text))
    assert not re.search("^error: fake", text, re.MULTILINE)  # no line of its own


def test_printable_makes_every_control_visible() -> None:
    assert printable(EVIL) == (
        "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202egpj.exe"
        "[link=https://evil.example]click[/link]\\nerror: fake"
    )
    assert printable("a\nb", keep_newlines=True) == "a\nb"
    assert printable("café ✓ 日本") == "café ✓ 日本"
    assert markup_safe("[red]x\x1b") == "\\[red]x\\x1b"


def test_status_prints_no_escape_sequence_from_the_saga(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = plain_console(monkeypatch, terminal=False)
    views.render_status(evil_status(), "http://127.0.0.1:8233")
    text = buffer.getvalue()
    assert "\x1b" not in text
    assert_shown_not_sent(text)
    assert "[link=https://evil.example]" in text  # markup shown as text, not applied


def test_status_on_a_terminal_carries_only_rich_own_styles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffer = plain_console(monkeypatch, terminal=True)
    views.render_status(evil_status(), "http://127.0.0.1:8233")
    text = buffer.getvalue()
    # rich's colours are CSI ... m; no OSC (title, hyperlink), no clear, nothing else.
    assert "\x1b]" not in text and CLEAR not in text
    assert set(re.findall(r"\x1b\[[0-9;]*([A-Za-z])", text)) <= {"m"}
    assert_shown_not_sent(re.sub(r"\x1b\[[0-9;]*m", "", text))


def test_batch_and_restore_print_no_escape_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = plain_console(monkeypatch, terminal=False)
    monkeypatch.setattr(views, "load_settings", lambda: Settings())
    batch = BatchStatus(
        workflow_id=f"batch-product-3{TITLE}",
        plan_id="p",
        state=BatchState.RUNNING,
        requested_by=f"sam{CLEAR}",
        reason="event cancelled",
        started_at=AT,
        approvals=[ApprovalRecord(approver=f"bob{TITLE}", approve=True, at=AT)],
        required_approvals=1,
        issues=[BatchIssue(purchase_id=7, outcome=f"failed{CLEAR}", reason=EVIL)],
        error=EVIL,
    )
    views.render_batch(batch, "http://127.0.0.1:8233")
    restore = RestoreStatus(
        workflow_id="restore-refund-42",
        state=RestoreState.FAILED,
        saga_workflow_id=f"refund-42{CLEAR}",
        operator=f"olivia{TITLE}",
        reason="revoked by mistake",
        error=EVIL,
    )
    views.render_restore(restore)
    text = buffer.getvalue()
    assert "\x1b" not in text
    assert_shown_not_sent(text)


def test_the_console_net_shows_controls_printed_without_escaping() -> None:
    # A future print that forgets markup_safe still sends no escape sequence.
    buffer = io.StringIO()
    console = terminal_console(file=buffer, force_terminal=False, width=200)
    console.print(f"forgot to escape {EVIL}", markup=False)
    text = buffer.getvalue()
    assert "\\x1b]0;pwned" in text and "\\u202e" in text
    assert not RAW.search(text)


@pytest.fixture
def saga_is(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make `refund status` see `status` (or raise it) without a Temporal server."""

    def set_status(status: SagaStatus | Exception) -> None:
        async def connect(_: Any) -> None:
            return None

        async def get_status(_: Any, workflow_id: str) -> SagaStatus:
            if isinstance(status, Exception):
                raise status
            return status

        monkeypatch.setattr(support, "connect", connect)
        monkeypatch.setattr(operations, "get_status", get_status)

    return set_status


def test_refund_status_shows_the_saga_text_and_json_keeps_it(saga_is: Any) -> None:
    saga_is(evil_status())
    runner = CliRunner()
    human = runner.invoke(cli.app, ["status", "42"], env={"COLUMNS": "300"})
    assert human.exit_code == 0, human.output
    assert_shown_not_sent(human.output)
    as_json = runner.invoke(cli.app, ["status", "42", "--json"])
    assert as_json.exit_code == 0
    # Valid JSON with the text as it is: scripts decide for themselves.
    assert json.loads(as_json.output)["timeline"][0]["outcome"] == EVIL
    assert not RAW.search(as_json.output)


def test_refund_status_error_from_outside_is_shown_not_sent(saga_is: Any) -> None:
    saga_is(operations.OperationError(f"AMS answered {EVIL}"))
    result = CliRunner().invoke(cli.app, ["status", "42"])
    assert result.exit_code == 1
    assert_shown_not_sent(result.output)

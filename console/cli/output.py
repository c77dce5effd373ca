"""How every `refund` command answers: the consoles, exit codes, `--json`, one-line errors, and
the checks that turn bad input, settings or a failed operation into them."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from console import operations as ops
from console.terminal import json_for_terminal, printable, terminal_console
from refundsaga.contracts import DecisionReceipt, format_money
from refundsaga.settings import Settings, get_settings
from refundsaga.store import OasisStore
from refundsaga.temporal import TemporalUnavailable

T = TypeVar("T")

# Free text is passed through `markup_safe` where it is printed; these consoles also show any
# control character that slips through instead of sending it to the terminal.
out = terminal_console()
err = terminal_console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
SagaRef = Annotated[str, typer.Argument(help="Workflow id (refund-42) or purchase id (42).")]


class ExitCode:
    OK = 0
    ERROR = 1
    REFUSED = 2


def counts_progress(as_json: bool) -> Progress:
    """A bar with a counts column; on stderr when stdout carries JSON, off when not a TTY."""
    console = err if as_json else out
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[counts]}"),
        console=console,
        disable=not console.is_terminal,
    )


def print_error(message: str) -> None:
    # Messages quote user input and outside systems' errors: "[/x]" is text, not markup, and
    # control characters are shown. Newlines stay (a stack error quotes its log's lines) but
    # are indented, so no quoted text stands as a line of its own.
    text = escape(printable(message, keep_newlines=True)).replace("\n", "\n  ")
    err.print(f"[red]error:[/red] {text}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = ExitCode.REFUSED) -> NoReturn:
    print_error(message)
    raise typer.Exit(code)


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "input"
        parts.append(f"{where}: {item['msg']}")
    return "invalid input: " + "; ".join(parts)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine and turn every known failure into a one-line message and exit code."""
    try:
        return asyncio.run(coro)
    except ops.Refused as e:
        fail(str(e), ExitCode.REFUSED)
    except ValidationError as e:
        fail(_validation_message(e), ExitCode.REFUSED)
    except (ops.OperationError, TemporalUnavailable) as e:
        fail(str(e), ExitCode.ERROR)


def load_settings() -> Settings:
    """The settings, or a one-line message naming the bad REFUND_* variable."""
    try:
        return get_settings()
    except ValidationError as e:
        fail("invalid settings: " + _validation_message(e).removeprefix("invalid input: "))


def build(model: type[BaseModel], **fields: Any) -> Any:
    """Validate user input into a message model before anything is sent anywhere."""
    try:
        return model(**fields)
    except ValidationError as e:
        fail(_validation_message(e))


def open_store(settings: Settings) -> OasisStore:
    """The OASIS store, migrated to the current schema; a failure is a one-line exit 1."""
    # Imported here: Alembic would slow the start of every `refund` command, and only the
    # commands that open the store need it.
    from refundsaga.store.migrate import upgrade

    try:
        upgrade(settings.resolved_database_url)
        return OasisStore.from_url(settings.resolved_database_url)
    except Exception as e:
        fail(f"cannot open the OASIS store ({type(e).__name__}): {e}", ExitCode.ERROR)


def emit_json(payload: Any) -> None:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(indent=2)
    else:
        text = json.dumps(payload, indent=2, default=str)
    sys.stdout.write(json_for_terminal(text) + "\n")


def emit_receipt(workflow_id: str, receipt: DecisionReceipt) -> None:
    """A workflow's answer to an update, as JSON."""
    emit_json({"workflow_id": workflow_id, **receipt.model_dump(mode="json")})


def money(cents: int | None, currency: str | None) -> str:
    return "rest" if cents is None else format_money(cents, currency)


def when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"

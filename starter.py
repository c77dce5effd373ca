"""The support script: start one refund saga, or one per row of a CSV file.

    python starter.py 42 --reason "duplicate purchase" --as sam [--amount 2500]
    python starter.py --csv refunds.csv --as sam [--dry-run] [--json]

The CSV has the columns `purchase_id,amount,reason` (amount in cents; empty for the whole
unrefunded rest). Every row is validated before anything starts; a bad row is refused with
its reason and the others go on. Exit code: 0 all started, 2 some refused, 1 other errors.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from console import operations as ops
from refundsaga.contracts import RefundRequest
from refundsaga.settings import get_settings
from refundsaga.temporal import TemporalUnavailable, connect, run_and_exit

MAX_ROWS = 50_000
_DIGITS = re.compile(r"[0-9]+")
err = Console(stderr=True)


def _utf8_lines(handle: TextIO, path: Path) -> Iterator[str]:
    """The file's lines; a file that is not UTF-8 is refused in one line, not a traceback."""
    try:
        yield from handle
    except UnicodeDecodeError as e:
        raise ops.Refused(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def parse_rows(path: Path, requested_by: str) -> tuple[list[RefundRequest], list[dict[str, Any]]]:
    """Valid requests, and refusals (row number, purchase, reason) for the rest."""
    requests: list[RefundRequest] = []
    refused: list[dict[str, Any]] = []
    seen: set[int] = set()
    # utf-8-sig: spreadsheets save CSV with a byte-order mark before the first header.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(_utf8_lines(handle, path))
        missing = {"purchase_id", "amount", "reason"} - set(reader.fieldnames or [])
        if missing:
            raise ops.Refused(
                f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                "expected purchase_id,amount,reason"
            )
        for number, row in enumerate(reader, start=2):
            if number - 1 > MAX_ROWS:
                raise ops.Refused(f"{path}: more than {MAX_ROWS} rows; split the file")
            raw_id = (row.get("purchase_id") or "").strip()
            raw_amount = (row.get("amount") or "").strip()
            try:
                # ASCII digits only: str.isdigit() also takes '²' (int() then fails) and '١٢'.
                if not _DIGITS.fullmatch(raw_id):
                    raise ValueError(f"purchase_id {raw_id!r} is not a positive whole number")
                if raw_amount and not _DIGITS.fullmatch(raw_amount.removeprefix("-")):
                    raise ValueError(f"amount {raw_amount!r} must be whole cents")
                if None in row:
                    # An unquoted comma in the reason would silently cut the reason short.
                    raise ValueError("too many fields; quote a reason that contains commas")
                request = RefundRequest(
                    purchase_id=int(raw_id),
                    amount_cents=int(raw_amount) if raw_amount else None,
                    reason=row.get("reason") or "",
                    requested_by=requested_by,
                )
                if request.purchase_id in seen:
                    raise ValueError(f"purchase {request.purchase_id} appears twice in the file")
                seen.add(request.purchase_id)
                requests.append(request)
            except (ValueError, ValidationError) as e:
                reason = (
                    "; ".join(str(x["msg"]) for x in e.errors())
                    if isinstance(e, ValidationError)
                    else str(e)
                )
                refused.append({"row": number, "purchase_id": raw_id, "reason": reason})
    return requests, refused


async def start_all(
    requests: list[RefundRequest], *, show_progress: bool
) -> tuple[list[str], list[dict[str, Any]]]:
    """Start each saga; a saga already running for a purchase is reported, not started."""
    settings = get_settings()
    client = await connect(settings)
    started: list[str] = []
    running: list[dict[str, Any]] = []
    with Progress(console=err, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("starting sagas", total=len(requests))
        for request in requests:
            try:
                handle = await ops.start_refund(client, settings, request)
                started.append(handle.id)
            except ops.Refused as e:
                running.append({"purchase_id": request.purchase_id, "reason": str(e)})
            progress.advance(task)
    return started, running


def main(
    purchase_id: Annotated[int | None, typer.Argument(help="One purchase to refund.")] = None,
    requested_by: Annotated[
        str, typer.Option("--as", "--requested-by", help="Your user name (e.g. sam).")
    ] = "",
    reason: Annotated[str, typer.Option(help="Why (for one purchase).")] = "",
    amount: Annotated[int | None, typer.Option(help="Cents (for one purchase).")] = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="purchase_id,amount,reason rows.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and report; start nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Start refund sagas: one purchase, or every row of a CSV file."""
    if not requested_by:
        err.print("[red]error:[/red] --as is required (your user name)")
        raise typer.Exit(2)
    try:
        if csv_file is not None:
            if purchase_id is not None:
                raise ops.Refused("give either a purchase id or --csv, not both")
            if not csv_file.is_file():
                raise ops.Refused(f"{csv_file}: no such file")
            requests, refused = parse_rows(csv_file, requested_by)
        elif purchase_id is not None:
            requests, refused = [], []
            try:
                requests.append(
                    RefundRequest(
                        purchase_id=purchase_id,
                        amount_cents=amount,
                        reason=reason,
                        requested_by=requested_by,
                    )
                )
            except ValidationError as e:
                refused.append(
                    {
                        "row": None,
                        "purchase_id": purchase_id,
                        "reason": "; ".join(str(x["msg"]) for x in e.errors()),
                    }
                )
        else:
            raise ops.Refused("give a purchase id or --csv FILE; see --help")
        started: list[str] = []
        running: list[dict[str, Any]] = []
        if not dry_run and requests:
            started, running = asyncio.run(
                start_all(requests, show_progress=not as_json and sys.stderr.isatty())
            )
    except ops.Refused as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e
    except (ops.OperationError, TemporalUnavailable) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    summary = {
        "dry_run": dry_run,
        "valid": len(requests),
        "started": started,
        "refused": refused,
        "already_running": running,
    }
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        verb = "would start" if dry_run else "started"
        count = len(requests) if dry_run else len(started)
        err.print(f"{verb} {count} saga(s); refused {len(refused)}; already running {len(running)}")
        for item in refused:
            where = f"row {item['row']}: " if item["row"] else ""
            # Escaped: the reason quotes the row, and "[/x]" in a file is text, not markup.
            line = f"  refused {where}purchase {item['purchase_id']}: {item['reason']}"
            err.print(escape(line))
        for item in running:
            err.print(escape(f"  {item['reason']}"))
        for workflow_id in started:
            sys.stdout.write(workflow_id + "\n")
    if refused or running:
        raise typer.Exit(2)


def cli() -> None:
    run_and_exit(lambda: typer.run(main))


if __name__ == "__main__":
    cli()

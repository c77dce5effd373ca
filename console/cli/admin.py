"""Admin's commands: the embedded stack, a worker in the foreground, the store's migrations,
demo data, the Temporal schedules, and signing keys."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from console import operations as ops
from console import stack
from console.cli.output import (
    ExitCode,
    JsonOpt,
    emit_json,
    err,
    fail,
    load_settings,
    money,
    open_store,
    out,
    run,
)
from console.seed import SCENARIOS, SeedError
from console.seed import seed as seed_data
from console.terminal import markup_safe
from refundsaga.signing import SigningError, generate_private_key, public_key_b64, write_private_key
from refundsaga.temporal import TemporalUnavailable, connect

app = typer.Typer()
stack_app = typer.Typer(help="The embedded stack: Temporal dev server + UI, sandboxes, worker.")
db_app = typer.Typer(help="The OASIS store's schema migrations.")
schedules_app = typer.Typer(help="Temporal schedules RefundSaga relies on.")
keys_app = typer.Typer(help="Signing keys for attributable approvals.")
webhooks_app = typer.Typer(help="The receiver of the processor's webhooks (Stripe events).")
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")
app.add_typer(schedules_app, name="schedules")
app.add_typer(keys_app, name="keys")
app.add_typer(webhooks_app, name="webhooks")


@app.command()
def seed(
    scenario: Annotated[
        list[str] | None,
        typer.Option(
            help="standard, already_refunded, partial, manual_ams, oasis_entitled, "
            "pending_refund (repeatable; default: all)."
        ),
    ] = None,
    count: Annotated[int, typer.Option(min=1, max=10_000, help="Purchases per scenario.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Create demo purchases, consistent in the store and both sandboxes.

    Example: refund seed --scenario standard --count 3 --json
    """
    chosen = scenario or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        fail(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    settings = load_settings()
    store = open_store(settings)
    try:
        purchases = seed_data(
            store,
            processor_url=settings.processor_url,
            ams_url=settings.ams_url,
            processor_api_key=settings.processor_api_key.get_secret_value(),
            ams_api_key=settings.ams_api_key.get_secret_value(),
            scenarios=chosen,  # type: ignore[arg-type]
            count=count,
        )
    except SeedError as e:
        fail(str(e), ExitCode.ERROR)
    finally:
        store.close()
    if as_json:
        emit_json([p.model_dump(mode="json") for p in purchases])
        return
    table = Table("purchase", "scenario", "amount", "charge", "user", "product", "AMS member")
    for p in purchases:
        table.add_row(
            str(p.purchase_id),
            markup_safe(p.scenario),
            money(p.amount_cents, p.currency),
            markup_safe(p.charge_id),
            str(p.user_id),
            str(p.product_id),
            markup_safe(p.ams_member_id or "-"),
        )
    out.print(table)


@app.command()
def worker() -> None:
    """Run a worker in the foreground (SIGTERM or Ctrl-C stop it gracefully)."""
    # Imported here: the worker loads the activities and the migrations, which only this
    # command needs.
    import worker as worker_module

    try:
        worker_module.main()
    except TemporalUnavailable as e:
        fail(str(e), ExitCode.ERROR)


@webhooks_app.command("serve")
def webhooks_serve() -> None:
    """Receive the processor's events at POST /stripe/webhook (REFUND_WEBHOOKS_HOST/PORT),
    verified with REFUND_PROCESSOR_WEBHOOK_SECRET, in the foreground.

    Example: REFUND_PROCESSOR_WEBHOOK_SECRET=whsec_... refund webhooks serve
    """
    # Imported here: stripe and uvicorn, which only this command needs.
    from console import webhooks

    webhooks.main()


def _progress(message: str) -> None:
    err.print(f"[dim]{markup_safe(message)}[/dim]", highlight=False)


def _stack_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except stack.StackError as e:
        fail(str(e), ExitCode.ERROR)


def _print_components(components: list[Any], as_json: bool) -> None:
    if as_json:
        emit_json({"components": [c.to_dict() for c in components]})
        return
    table = Table("component", "state", "pid", "url")
    for c in components:
        color = "green" if c.state == "running" else "red"
        table.add_row(
            c.name, f"[{color}]{c.state}[/{color}]", str(c.pid or "-"), markup_safe(c.url or "-")
        )
    out.print(table)


@stack_app.command("up")
def stack_up(as_json: JsonOpt = False) -> None:
    """Start Temporal (with its UI), the sandboxes, the store and a worker; wait until ready."""
    settings = load_settings()
    components = _stack_call(stack.up, settings, on_progress=_progress)
    _print_components(components, as_json)
    if not as_json:
        out.print(f"Temporal UI: {settings.temporal_ui_url}")


@stack_app.command("down")
def stack_down(as_json: JsonOpt = False) -> None:
    """Stop every component of the embedded stack and free its ports."""
    components = _stack_call(stack.down, load_settings(), on_progress=_progress)
    _print_components(components, as_json)


@stack_app.command("status")
def stack_status(as_json: JsonOpt = False) -> None:
    """Show each component: running or not, pid, URL."""
    _print_components(_stack_call(stack.status, load_settings()), as_json)


# The db commands import refundsaga.store.migrate inside: Alembic would slow the start of every
# `refund` command.


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the store up to a revision (default: head)."""
    from refundsaga.store.migrate import upgrade, wait_for_database

    url = load_settings().resolved_database_url
    try:
        wait_for_database(url)
        upgrade(url, revision)
    except Exception as e:
        fail(f"upgrade failed ({type(e).__name__}): {e}", ExitCode.ERROR)
    out.print(f"store at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="e.g. -1 or base")]) -> None:
    """Migrate the store down to a revision."""
    from refundsaga.store.migrate import downgrade

    try:
        downgrade(load_settings().resolved_database_url, revision)
    except Exception as e:
        fail(f"downgrade failed ({type(e).__name__}): {e}", ExitCode.ERROR)
    out.print(f"store at {revision}")


@db_app.command("current")
def db_current(as_json: JsonOpt = False) -> None:
    """Show the store's current migration revision."""
    from refundsaga.store.migrate import current

    try:
        revision = current(load_settings().resolved_database_url)
    except Exception as e:
        fail(f"cannot read the revision ({type(e).__name__}): {e}", ExitCode.ERROR)
    if as_json:
        emit_json({"revision": revision})
    else:
        out.print(revision or "empty (no migrations applied)")


@keys_app.command("generate")
def keys_generate(
    out_file: Annotated[
        Path, typer.Option("--out", help="Where to write the private key (PEM, mode 600).")
    ],
    name: Annotated[
        str | None, typer.Option("--as", help="Your approver name, for the settings line.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an approver's signing key; print the public key for REFUND_APPROVER_PUBLIC_KEYS.

    Example: refund keys generate --out ~/.refund/bob.pem --as bob
    """
    key = generate_private_key()
    try:
        write_private_key(key, out_file)
    except SigningError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {out_file}: {e.strerror}")
    public = public_key_b64(key)
    if as_json:
        emit_json({"private_key_file": str(out_file), "public_key": public, "approver": name})
        return
    entry = json.dumps({name or "<approver>": public})
    # Unwrapped and without markup: these lines are copied into settings as they are.
    for line in (
        f"private key written to {out_file}: keep it; set REFUND_SIGNING_KEY_FILE to it",
        f"public key: {public}",
        f"add to the workers' settings: REFUND_APPROVER_PUBLIC_KEYS='{entry}'",
    ):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


@keys_app.command("webhook-secret")
def keys_webhook_secret(as_json: JsonOpt = False) -> None:
    """Make a Standard Webhooks secret for REFUND_NOTIFY_WEBHOOK_SECRET (and its receiver).

    Example: refund keys webhook-secret
    """
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    if as_json:
        emit_json({"secret": secret})
    else:
        out.print(secret, markup=False, highlight=False, soft_wrap=True)


@schedules_app.command("ensure")
def schedules_ensure(as_json: JsonOpt = False) -> None:
    """Create or update the schedules: the snapshot purge and the reconciliation sweep.

    The purge deletes progress snapshots past the restore retention, every day; the sweep
    reconciles what the processor reported that no webhook brought, every REFUND_SWEEP_EVERY.

    Example: refund schedules ensure
    """
    settings = load_settings()

    async def go() -> tuple[str, str]:
        client = await connect(settings)
        purge = await ops.ensure_purge_schedule(client, settings)
        return purge, await ops.ensure_sweep_schedule(client, settings)

    purge, sweep = run(go())
    if as_json:
        emit_json(
            {
                "schedules": [
                    {"schedule_id": ops.PURGE_SCHEDULE_ID, "outcome": purge},
                    {"schedule_id": ops.SWEEP_SCHEDULE_ID, "outcome": sweep},
                ]
            }
        )
    else:
        out.print(
            f"schedule {ops.PURGE_SCHEDULE_ID} {purge}: purges snapshots older than "
            f"{settings.restore_retention} every day"
        )
        out.print(
            f"schedule {ops.SWEEP_SCHEDULE_ID} {sweep}: reconciles what the processor "
            f"reported that no webhook brought, every {settings.sweep_every}"
        )


@schedules_app.command("sweep-now")
def schedules_sweep_now(as_json: JsonOpt = False) -> None:
    """Run the reconciliation sweep once now (skipped while one is running).

    Example: refund schedules sweep-now
    """
    settings = load_settings()

    async def go() -> None:
        await ops.trigger_sweep(await connect(settings))

    run(go())
    if as_json:
        emit_json({"schedule_id": ops.SWEEP_SCHEDULE_ID, "outcome": "triggered"})
    else:
        out.print(
            f"schedule {ops.SWEEP_SCHEDULE_ID} triggered: see its runs in the Temporal UI "
            f"(workflow type ReconciliationSweep)"
        )

"""The `refund` command line: support starts sagas, approvers decide, ops watch and unblock.

Exit codes: 0 done; 2 refused or invalid input (nothing was started or changed); 1 anything
else (Temporal unreachable, a timeout). Every verb has `--json` for scripts.

One module per audience (support, approvers, ops, admin), the `refund batch` group in batches;
what they all print through is in output and views.
"""

from __future__ import annotations

import typer
from typer.main import get_command_name
from typer.models import CommandInfo

from console.cli import admin, approvers, batches, failed, ops, support
from console.cli.output import ExitCode, err, print_error
from refundsaga.temporal import run_and_exit

app = typer.Typer(
    name="refund",
    help=(
        "Durable, auditable refunds for OASIS. Support starts a saga, approvers decide, "
        "ops watch and unblock.\n\nExit codes: 0 done, 2 refused or invalid input "
        "(nothing changed), 1 anything else."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# The order `refund --help` lists the commands in, whichever audience's module holds them;
# typer lists the command groups after the single commands.
_HELP_ORDER = (
    "start",
    "approve",
    "reject",
    "pending",
    "status",
    "list",
    "confirm-ams",
    "resolve",
    "access",
    "audit",
    "seed",
    "restore-progress",
    "restore-status",
    "worker",
    "stack",
    "db",
    "batch",
    "failed",
    "schedules",
    "keys",
    "webhooks",
)


def _name(command: CommandInfo) -> str:
    """The command's name as typer derives it: given, else from its function."""
    assert command.callback is not None
    return command.name or get_command_name(command.callback.__name__)


def _assemble() -> None:
    """Every audience's commands on the one `refund` app, in `_HELP_ORDER`."""
    audiences = (support.app, approvers.app, ops.app, batches.app, failed.app, admin.app)
    commands = {
        _name(info): info for audience in audiences for info in audience.registered_commands
    }
    groups = {info.name: info for audience in audiences for info in audience.registered_groups}
    for name in _HELP_ORDER:
        if name in commands:
            app.registered_commands.append(commands.pop(name))
        else:
            app.registered_groups.append(groups.pop(name))
    assert not commands and not groups, f"not in _HELP_ORDER: {[*commands, *groups]}"


_assemble()


def _run_app() -> int:
    """Run the app; a usage error (bad value, unknown choice or option) is one line, exit 2."""
    try:
        result = app(standalone_mode=False)
    except typer.TyperException as e:
        # Typer's parser errors (its vendored click's UsageError and kin) all derive from this.
        if type(e).__name__ == "NoArgsIsHelpError":
            err.print(e.format_message(), markup=False, highlight=False)  # the help text
            return ExitCode.REFUSED
        message = " ".join(str(getattr(e, "format_message", e.__str__)()).split())
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "refund"
        print_error(f"{message} (see `{command} --help`)")
        code = getattr(e, "exit_code", ExitCode.REFUSED)
        return code if isinstance(code, int) else ExitCode.REFUSED
    except typer.Abort:
        print_error("aborted")
        return ExitCode.ERROR
    return result if isinstance(result, int) else ExitCode.OK


def main() -> None:
    """The `refund` console script."""
    run_and_exit(_run_app)

"""The command-line options every bench on a stack of its own takes, spelled once."""

from __future__ import annotations

import argparse


def add_run_options(parser: argparse.ArgumentParser, *, sandbox_state: bool = True) -> None:
    """`--max-load`/`--max-wait` (wait for a quiet machine), `--bytecode` and, unless told
    otherwise, `--sandbox-state` (how the bench's stack runs)."""
    parser.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="wait (up to --max-wait s) for the 1-minute load to drop below this first",
    )
    parser.add_argument("--max-wait", type=float, default=300)
    if sandbox_state:
        parser.add_argument(
            "--sandbox-state",
            choices=("memory", "file"),
            default="memory",
            help="file: the sandboxes as the stack runs them (whole JSON state rewritten per "
            "change)",
        )
    parser.add_argument(
        "--bytecode",
        choices=("inherit", "cache"),
        default="inherit",
        help="cache: let the workers write and use .pyc files (in the data dir) even when "
        "PYTHONDONTWRITEBYTECODE is set",
    )

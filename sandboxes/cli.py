"""The command line the sandboxes share: where to listen, the state file and the API key."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import uvicorn
from starlette.applications import Starlette


def sandbox_parser(name: str, default_port: int) -> argparse.ArgumentParser:
    """The command line the sandboxes share; a sandbox may add its own options."""
    parser = argparse.ArgumentParser(prog=f"python -m sandboxes.{name}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--state", type=Path, default=None, help="JSON state file")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SANDBOX_API_KEY"),
        help="bearer key clients must send (default: $SANDBOX_API_KEY)",
    )
    parser.add_argument("--log-level", default="info")
    return parser


def parse_sandbox_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse `argv` and insist on an API key."""
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("an API key is required: pass --api-key or set SANDBOX_API_KEY")
    return args


def serve(app: Starlette, args: argparse.Namespace) -> None:
    """Serve `app` with uvicorn on the parsed host and port."""
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=2,
    )


def run_main(
    *,
    name: str,
    create_app: Callable[..., Starlette],
    default_port: int,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse the command line shared by the sandboxes and serve the app with uvicorn.

    Args:
        name: The module name under `sandboxes`, for the usage line.
        create_app: The sandbox's `create_app(*, api_key, state_path)`.
        default_port: Port used when `--port` is not given.
        argv: Arguments (defaults to `sys.argv[1:]`).
    """
    parser = sandbox_parser(name, default_port)
    args = parse_sandbox_args(parser, argv)
    serve(create_app(api_key=args.api_key, state_path=args.state), args)

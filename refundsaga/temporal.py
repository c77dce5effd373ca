"""How every part of RefundSaga reaches Temporal: one place, the pydantic data converter."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from refundsaga.settings import Settings


class TemporalUnavailable(RuntimeError):
    """Temporal could not be reached at the configured address."""


async def connect(settings: Settings) -> Client:
    """A client for the configured Temporal address and namespace.

    Raises:
        TemporalUnavailable: Nothing answers at the address (say what to do next).
    """
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=pydantic_data_converter,
        )
    except RuntimeError as err:
        raise TemporalUnavailable(
            f"cannot reach Temporal at {settings.temporal_address} "
            f"(namespace {settings.temporal_namespace}); start it with `refund stack up` "
            "or set REFUND_TEMPORAL_ADDRESS"
        ) from err


def run_and_exit(entry: Callable[[], object]) -> NoReturn:
    """Run a command's entry point, then leave without interpreter teardown.

    A short-lived process that used a Temporal client can abort during finalization when the
    SDK's Rust threads outlive the interpreter (temporalio/sdk-python#300: "PyGILState_Release
    ... finalizing"), turning a successful command into exit -6. Flushing and `os._exit` keep
    the exit code the command chose.
    """
    code: int = 0
    try:
        result = entry()
        code = result if isinstance(result, int) else 0
    except SystemExit as exit_:
        raw = exit_.code
        code = raw if isinstance(raw, int) else (0 if raw is None else 1)
        if isinstance(raw, str):
            print(raw, file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)

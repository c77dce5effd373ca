"""Which workflow run the store is writing for, so the audit trail keeps every run apart.

The worker sets it around each activity (`activities.run_scope`), from Temporal's own record of
the run, never from a payload; code outside a run (the CLI, seeding) leaves it unset.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CURRENT_RUN: ContextVar[str | None] = ContextVar("refundsaga_current_run", default=None)


def current_run() -> str | None:
    """The workflow run the current activity belongs to, if any."""
    return _CURRENT_RUN.get()


@contextmanager
def run_scope(run_id: str | None) -> Iterator[None]:
    """Attribute the store's writes in this context (threads started from it too) to a run."""
    token = _CURRENT_RUN.set(run_id)
    try:
        yield
    finally:
        _CURRENT_RUN.reset(token)

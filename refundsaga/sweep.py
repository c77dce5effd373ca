"""The reconciliation sweep's messages and arithmetic: which window of the processor's lists it
reads, where it is in them, and what it counted.

The sweep (`workflows/reconciliation_sweep.py`, run by a Temporal schedule) lists what the
processor created since its high-water mark, less an overlap for objects that became visible
late, and starts what a missed webhook would have started. It reads three lists, newest first,
one page per activity (one processor call, on the rate-limited queue):

- refunds: outside refunds to reconcile, refunds of ours to wake their saga for;
- disputes: lost ones to reconcile;
- events of the types whose object changes after it was created (a dispute lost weeks after it
  was opened, a refund that fails days after it succeeded): a listing by creation time does not
  see those changes, the processor's event list (kept 30 days) does.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Literal

from pydantic import Field

from refundsaga.message import Message
from refundsaga.processor import LIST_PAGE_SIZE
from refundsaga.reconcile import DISPUTE_FUNDS_WITHDRAWN, DISPUTE_LOST
from refundsaga.reconcile_dispatch import FAILED_TASK_STARTED, RECONCILE_STARTED, SIGNALLED

SWEEP_WORKFLOW = "ReconciliationSweep"
# The one mark in the store's `processor_sweep_marks`: the processor's lists share one clock.
SWEEP_MARK = "processor"

SweepListing = Literal["refunds", "disputes", "events"]
SWEEP_LISTINGS: tuple[SweepListing, ...] = ("refunds", "disputes", "events")
# A refund that settles or fails after it was created, a dispute lost after it was opened.
LATE_EVENT_TYPES: tuple[str, ...] = (
    "refund.updated",
    "charge.refund.updated",
    "refund.failed",
    DISPUTE_LOST,
    DISPUTE_FUNDS_WITHDRAWN,
)

# Outcomes of the sweep's own, beside the dispatcher's.
ALREADY_SWEPT = "already_swept"
MALFORMED = "malformed"
STARTED_OUTCOMES = frozenset({RECONCILE_STARTED, FAILED_TASK_STARTED})


class SweepWindowInput(Message):
    """How far back the sweep reads: its mark less the overlap, or the first lookback."""

    overlap: timedelta = Field(ge=timedelta(0))
    first_lookback: timedelta = Field(ge=timedelta(0))


class SweepWindow(Message):
    """Where this sweep starts reading (Unix seconds, `created[gte]`), and the mark it read."""

    created_gte: int = Field(ge=0)
    mark: int | None = None


def window_start(
    mark: int | None, *, now: int, overlap: timedelta, first_lookback: timedelta
) -> int:
    """The `created[gte]` of a sweep: the mark less the overlap; before the first sweep, now less
    the first lookback."""
    start = now - int(first_lookback.total_seconds()) if mark is None else mark
    return max(start - int(overlap.total_seconds()), 0)


class SweepPageInput(Message):
    """One page of one list."""

    listing: SweepListing
    created_gte: int = Field(ge=0)
    starting_after: str | None = Field(default=None, max_length=255)
    limit: int = Field(default=LIST_PAGE_SIZE, ge=1, le=LIST_PAGE_SIZE)


class SweepPage(Message):
    """What one page held and what was done about it."""

    listed: int = Field(default=0, ge=0)
    outcomes: dict[str, int] = Field(default_factory=dict)
    newest_created: int | None = None
    newest_id: str | None = None
    # The page's last (oldest) item, where the next page starts; None: the list is done.
    next_after: str | None = None


class SweepProgress(Message):
    """Where a sweep is: carried over continue-as-new, so a long backlog keeps histories small."""

    window: SweepWindow
    # The list being read; None once all are.
    listing: SweepListing | None = SWEEP_LISTINGS[0]
    starting_after: str | None = None
    pages: int = 0
    listed: int = 0
    outcomes: dict[str, int] = Field(default_factory=dict)
    newest_created: int | None = None
    newest_id: str | None = None

    def after(self, page: SweepPage) -> SweepProgress:
        """The progress once `page` of the current list was read."""
        if self.listing is None:
            raise ValueError("the sweep has read every list")
        listing: SweepListing | None = self.listing
        if page.next_after is None:
            following = SWEEP_LISTINGS.index(self.listing) + 1
            listing = SWEEP_LISTINGS[following] if following < len(SWEEP_LISTINGS) else None
        newest_created, newest_id = self.newest_created, self.newest_id
        if page.newest_created is not None and (
            newest_created is None or page.newest_created > newest_created
        ):
            newest_created, newest_id = page.newest_created, page.newest_id
        return self.model_copy(
            update={
                "listing": listing,
                "starting_after": page.next_after,
                "pages": self.pages + 1,
                "listed": self.listed + page.listed,
                "outcomes": dict(Counter(self.outcomes) + Counter(page.outcomes)),
                "newest_created": newest_created,
                "newest_id": newest_id,
            }
        )


class SweepInput(Message):
    """The schedule's input (from the settings when the schedule was ensured)."""

    page_size: int = Field(default=LIST_PAGE_SIZE, ge=1, le=LIST_PAGE_SIZE)
    # Objects the processor shows a little after their `created`: read again next time.
    overlap: timedelta = Field(default=timedelta(minutes=5), ge=timedelta(0))
    # How far the first sweep reads back, without a mark.
    first_lookback: timedelta = Field(default=timedelta(minutes=10), ge=timedelta(0))
    # Set when a sweep continues as new.
    progress: SweepProgress | None = None


class SweepMarkInput(Message):
    """Move the mark to the newest object seen (never back)."""

    created: int = Field(ge=0)
    object_id: str | None = Field(default=None, max_length=255)


class SweepResult(Message):
    """What a sweep read and did."""

    created_gte: int
    # The mark after the sweep; None when nothing was ever listed.
    mark: int | None
    pages: int
    listed: int
    # Reconciliations and ops tasks started, or found already open for the same purchase or
    # refund (the dispatcher cannot tell the two apart).
    started: int
    # Sagas signalled to read their refund again.
    woken: int
    # Everything else: nothing to do, done before, not an OASIS sale.
    ignored: int
    outcomes: dict[str, int]


def sweep_result(progress: SweepProgress, mark: int | None) -> SweepResult:
    """The workflow's result from its final progress."""
    started = sum(n for outcome, n in progress.outcomes.items() if outcome in STARTED_OUTCOMES)
    woken = progress.outcomes.get(SIGNALLED, 0)
    return SweepResult(
        created_gte=progress.window.created_gte,
        mark=mark,
        pages=progress.pages,
        listed=progress.listed,
        started=started,
        woken=woken,
        ignored=progress.listed - started - woken,
        outcomes=dict(sorted(progress.outcomes.items())),
    )

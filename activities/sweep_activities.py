"""Activities of the ReconciliationSweep: read and move its high-water mark, and read one page of
one processor list, acting on each object as a missed webhook would have.

A page is one processor call, on the rate-limited processor queue with the sagas' calls. What
it finds goes through the webhook receiver's dispatcher (`refundsaga.reconcile_dispatch`), so a
reconciliation is started under the same id whichever of the two saw the money go back.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities.refund_activities import RefundActivities
from refundsaga.processor import (
    ProcessorClient,
    ProcessorDispute,
    ProcessorError,
    ProcessorRefund,
)
from refundsaga.reconcile import (
    Action,
    Ignore,
    MalformedEvent,
    classify,
    classify_dispute,
    classify_refund,
    parse_event,
)
from refundsaga.reconcile_dispatch import DUPLICATE, ReconcileDispatcher
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from refundsaga.store.inbox import ProcessorInbox
from refundsaga.sweep import (
    ALREADY_SWEPT,
    LATE_EVENT_TYPES,
    MALFORMED,
    SWEEP_MARK,
    SweepMarkInput,
    SweepPage,
    SweepPageInput,
    SweepWindow,
    SweepWindowInput,
    window_start,
)


def _refund_object(refund: ProcessorRefund) -> dict[str, Any]:
    """The parts of a listed refund the classification reads, in Stripe's shape."""
    return {
        "id": refund.id,
        "status": refund.status,
        "metadata": refund.metadata,
        "charge": refund.charge_id or None,
        "payment_intent": refund.payment_intent_id,
        "amount": refund.amount_cents,
        "currency": refund.currency,
        "failure_reason": refund.failure_reason,
    }


def _dispute_object(dispute: ProcessorDispute) -> dict[str, Any]:
    return {
        "id": dispute.id,
        "status": dispute.status,
        "charge": dispute.charge_id or None,
        "payment_intent": dispute.payment_intent_id,
    }


def _swept_key(object_id: str, status: str) -> str:
    """The inbox's key for an object the sweep acted on in this status: listed again (the
    overlap, a sweep run twice) it does nothing; in a new status it is looked at again."""
    return f"swept/{object_id}/{status}"[:255]


class SweepActivities:
    """The sweep's activities, bound to the worker's store, processor and Temporal client."""

    def __init__(
        self,
        *,
        store: OasisStore,
        processor: ProcessorClient,
        dispatcher: ReconcileDispatcher,
    ) -> None:
        self._store = store
        self._inbox = ProcessorInbox(store.engine)
        self._processor = processor
        self._dispatcher = dispatcher

    @classmethod
    def alongside(
        cls,
        saga: RefundActivities,
        temporal: Client,
        settings: Settings,
        *,
        task_queue: str,
    ) -> SweepActivities:
        """Share the saga activities' store and processor client (one pool per worker); the
        workflows the sweep starts go to `task_queue`, the worker's own."""
        store = saga._store
        return cls(
            store=store,
            processor=saga._processor,
            dispatcher=ReconcileDispatcher(
                temporal,
                ProcessorInbox(store.engine),
                settings.model_copy(update={"task_queue": task_queue}),
            ),
        )

    @activity.defn
    async def sweep_window(self, inp: SweepWindowInput) -> SweepWindow:
        """Where this sweep starts: the mark less the overlap (the processor's clock, which
        stamps `created`, is the wall clock, not workflow time)."""
        mark = await asyncio.to_thread(self._inbox.sweep_mark, SWEEP_MARK)
        created = None if mark is None else mark.created
        start = window_start(
            created,
            now=int(time.time()),
            overlap=inp.overlap,
            first_lookback=inp.first_lookback,
        )
        return SweepWindow(created_gte=start, mark=created)

    @activity.defn
    async def advance_sweep_mark(self, inp: SweepMarkInput) -> int:
        """Move the mark to the newest object the sweep saw, never back.

        Returns:
            The mark after the call.
        """

        def advance() -> int:
            mark = self._inbox.sweep_mark(SWEEP_MARK)
            if mark is not None and mark.created >= inp.created:
                return mark.created
            self._inbox.set_sweep_mark(
                SWEEP_MARK, created=inp.created, last_object_id=inp.object_id
            )
            return inp.created

        return await asyncio.to_thread(advance)

    @activity.defn
    async def sweep_page(self, inp: SweepPageInput) -> SweepPage:
        """Read one page of one list and act on every object on it.

        Raises:
            ApplicationError: The processor refused the request (a wrong key, a bad
                parameter): not retried; the next scheduled sweep tries again. An outage is
                retried, after the processor's Retry-After when it gave one.
        """
        try:
            if inp.listing == "events":
                return await self._events_page(inp)
            return await self._objects_page(inp)
        except ProcessorError as err:
            after = err.retry_after_s
            raise ApplicationError(
                err.message,
                type=type(err).__name__,
                non_retryable=not err.retryable,
                next_retry_delay=timedelta(seconds=after) if after and err.retryable else None,
            ) from err

    async def _objects_page(self, inp: SweepPageInput) -> SweepPage:
        listed: list[tuple[str, int, str, Action]] = []
        if inp.listing == "refunds":
            refunds = await self._processor.refunds_since(
                inp.created_gte, starting_after=inp.starting_after, limit=inp.limit
            )
            has_more = refunds.has_more
            for refund in refunds.items:
                action = classify_refund(
                    _refund_object(refund), event_type=None, source="sweep", event_id=None
                )
                listed.append((refund.id, refund.created, refund.status, action))
        else:
            disputes = await self._processor.disputes_since(
                inp.created_gte, starting_after=inp.starting_after, limit=inp.limit
            )
            has_more = disputes.has_more
            for dispute in disputes.items:
                action = classify_dispute(
                    _dispute_object(dispute), event_type=None, source="sweep", event_id=None
                )
                listed.append((dispute.id, dispute.created, dispute.status, action))
        outcomes: Counter[str] = Counter()
        for object_id, _, status, action in listed:
            outcomes[await self._act_once(inp.listing, object_id, status, action)] += 1
            activity.heartbeat()
        return _page(
            [(object_id, created) for object_id, created, _, _ in listed], outcomes, has_more
        )

    async def _act_once(self, listing: str, object_id: str, status: str, action: Action) -> str:
        """Carry out an action once per object and status, however often it is listed."""
        if isinstance(action, Ignore):
            return await self._dispatcher.dispatch(action)
        key = _swept_key(object_id, status)
        if await asyncio.to_thread(self._inbox.seen, key):
            return ALREADY_SWEPT
        outcome = await self._dispatcher.dispatch(action)
        await asyncio.to_thread(
            self._inbox.record, key, event_type=listing, source="sweep", outcome=outcome
        )
        return outcome

    async def _events_page(self, inp: SweepPageInput) -> SweepPage:
        events = await self._processor.events_since(
            inp.created_gte,
            LATE_EVENT_TYPES,
            starting_after=inp.starting_after,
            limit=inp.limit,
        )
        outcomes: Counter[str] = Counter()
        seen: list[tuple[str, int]] = []
        for body in events.items:
            event_id, created = _id_and_created(body)
            if event_id is None:
                outcomes[MALFORMED] += 1
                continue
            seen.append((event_id, created))
            outcomes[await self._event_once(body)] += 1
            activity.heartbeat()
        return _page(seen, outcomes, events.has_more)

    async def _event_once(self, body: Mapping[str, Any]) -> str:
        """An event the webhook brought does nothing here (the inbox keys on its id); one
        about an object the sweep acted on in that status does nothing either."""
        try:
            event = parse_event(body)
        except MalformedEvent:
            return MALFORMED
        if await asyncio.to_thread(self._inbox.seen, event.id):
            return DUPLICATE
        object_id, status = event.object.get("id"), event.object.get("status")
        outcome = await self._act_once(
            "events",
            object_id if isinstance(object_id, str) else event.id,
            status if isinstance(status, str) else "",
            classify(event, source="sweep"),
        )
        await asyncio.to_thread(
            self._inbox.record, event.id, event_type=event.type, source="sweep", outcome=outcome
        )
        return outcome

    def processor_calls(self) -> list[Callable[..., Any]]:
        """The activities that call the processor (the rate-limited queue)."""
        return [self.sweep_page]

    def others(self) -> list[Callable[..., Any]]:
        """The store-only activities, run local to the sweep's workflow."""
        return [self.sweep_window, self.advance_sweep_mark]


def _id_and_created(body: Mapping[str, Any]) -> tuple[str | None, int]:
    event_id = body.get("id")
    created = body.get("created")
    return (
        event_id if isinstance(event_id, str) and event_id else None,
        created if isinstance(created, int) else 0,
    )


def _page(items: list[tuple[str, int]], outcomes: Counter[str], has_more: bool) -> SweepPage:
    """A page's summary; `items` newest first, as the processor lists them."""
    newest = max(items, key=lambda item: item[1], default=None)
    return SweepPage(
        listed=sum(outcomes.values()),
        outcomes=dict(outcomes),
        newest_created=newest[1] if newest is not None and newest[1] > 0 else None,
        newest_id=newest[0] if newest is not None and newest[1] > 0 else None,
        next_after=items[-1][0] if has_more and items else None,
    )

"""The faults the chaos harness brings about, besides killing processes, and their counts.

The sandboxes' fault profiles (5xx, hung requests, dropped connections, lost responses,
latency) and the counts read back from their request logs; the processor's webhook delivery
faults (dropped, duplicated, held back so that later events overtake them) and the counts read
back from its delivery log. Then two things that happen to real
sagas and that no fault profile imitates: ops reset a workflow in the Temporal UI, which starts
a new run of the same workflow id from an earlier point; and Stripe prunes idempotency keys
once they are a day old, so a resend under an old key executes again. The planning is pure;
the calls that act are thin; the checks that these happened are in `reliability.invariants`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import httpx
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client

from refundsaga import search_attributes as sa
from refundsaga.settings import Settings

__all__ = [
    "APPROVAL_SIGNALS",
    "APPROVAL_UPDATES",
    "FAULT_KINDS",
    "KEY_TTL_S",
    "OUTAGE",
    "PROFILES",
    "PRUNE_ADVANCE_S",
    "WEBHOOK_PROFILES",
    "Call",
    "ProfileWindow",
    "PruneRecord",
    "ResetRecord",
    "WebhookFaults",
    "advance_clock",
    "endpoint",
    "fault_counts",
    "find_reset_point",
    "pick_reset_target",
    "planned_resets",
    "prune_keys",
    "report",
    "reset_marks",
    "reset_point",
    "reset_saga",
    "reset_workflow",
    "sandbox_admin",
    "table_line",
    "webhook_counts",
]

# -- the sandboxes' fault profiles and their counts ----------------------------------------------

FAULT_KINDS = ("error", "timeout", "drop", "lost_response")
REQUEST_LOG_SIZE = 10_000  # the sandboxes keep this many requests (sandboxes.common)

# Fault profiles the sandboxes rotate through, each drawn from the harness's seeded generator.
# Every profile faults 10-30% of requests, so even a small run sees faults; rates stay well
# below 1 so that STEP_RETRY's 8 attempts almost always get through: the AMS outage is what
# sends sagas to NEEDS_ATTENTION.
FaultProfile = Callable[[random.Random], dict[str, Any]]
PROFILES: dict[str, FaultProfile] = {
    "errors": lambda r: {"error_rate": round(r.uniform(0.15, 0.3), 3)},
    "hangs": lambda r: {
        "timeout_rate": round(r.uniform(0.1, 0.2), 3),
        "hang_ms": r.randint(1_000, 5_000),
    },
    "drops": lambda r: {
        "drop_rate": round(r.uniform(0.06, 0.12), 3),
        "lost_response_rate": round(r.uniform(0.08, 0.15), 3),
    },
    "slow": lambda r: {"latency_ms": r.randint(150, 600), "error_rate": 0.1},
    "mixed": lambda r: {
        "error_rate": 0.08,
        "timeout_rate": 0.04,
        "drop_rate": 0.04,
        "lost_response_rate": 0.06,
        "latency_ms": 40,
        "hang_ms": r.randint(1_000, 5_000),
    },
}
OUTAGE = {"error_rate": 1.0}

# Webhook delivery profiles (`POST /_sandbox/webhooks/faults`), drawn like the API's. A dropped
# delivery is never sent: only the reconciliation sweep makes up for it. Duplicates and held
# back deliveries must start nothing twice. Failed attempts (the receiver down) are retried by
# the sandbox as Stripe does.
WEBHOOK_PROFILES: dict[str, FaultProfile] = {
    "drops": lambda r: {"drop_rate": round(r.uniform(0.15, 0.3), 3)},
    "duplicates": lambda r: {"duplicate_rate": round(r.uniform(0.3, 0.6), 3)},
    "reordered": lambda r: {
        "reorder_rate": round(r.uniform(0.4, 0.8), 3),
        "reorder_max_s": round(r.uniform(1.0, 3.0), 1),
    },
    "mixed": lambda r: {
        "drop_rate": 0.1,
        "duplicate_rate": 0.2,
        "reorder_rate": 0.2,
        "reorder_max_s": 2.0,
    },
}
DELIVERY_LOG_SIZE = 10_000  # the processor sandbox keeps this many attempts (sandboxes.webhooks)
# Fates forced on every delivery of the events one action causes, so that even a small run
# sees an event that never arrives and one that arrives twice, out of order.
FORCED_FATES: dict[str, dict[str, Any]] = {
    "drop": {"drop_rate": 1.0},
    "duplicate": {"duplicate_rate": 1.0, "reorder_rate": 1.0, "reorder_max_s": 1.0},
}


class WebhookFaults:
    """The processor's webhook delivery faults: the profile in force, and a fate forced on the
    events of one action (the sandbox draws a delivery's fate when its event is created)."""

    def __init__(self, settings: Settings) -> None:
        self.url, self.headers = sandbox_admin(settings, "processor")
        self.name = "none"
        self.body: dict[str, Any] = {}
        self.forced: Counter[str] = Counter()
        self._lock = asyncio.Lock()

    async def _post(self, body: dict[str, Any]) -> None:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            response = await http.post(
                f"{self.url}/_sandbox/webhooks/faults", json=body, headers=self.headers
            )
        response.raise_for_status()

    async def apply(self, name: str, body: dict[str, Any]) -> None:
        """Put a profile in force (`POST /_sandbox/webhooks/faults` replaces the settings)."""
        async with self._lock:
            await self._post(body)
            self.name, self.body = name, body

    @contextlib.asynccontextmanager
    async def forcing(self, fate: str) -> AsyncIterator[None]:
        """While inside, every new event's deliveries get `fate` (one of FORCED_FATES); the
        profile in force is back afterwards."""
        async with self._lock:
            await self._post({**FORCED_FATES[fate], "seed": len(self.forced)})
            self.forced[fate] += 1
            try:
                yield
            finally:
                await self._post(self.body)


def sandbox_admin(settings: Settings, sandbox: str) -> tuple[str, dict[str, str]]:
    """A sandbox's URL and the headers its admin API needs (its bearer key)."""
    if sandbox == "processor":
        url, key = settings.processor_url, settings.processor_api_key
    else:
        url, key = settings.ams_url, settings.ams_api_key
    return url, {"Authorization": f"Bearer {key.get_secret_value()}"}


@dataclass
class ProfileWindow:
    sandbox: str
    start: float
    latency_ms: int


def endpoint(method: str, path: str) -> str:
    """A request's endpoint with identifiers replaced, e.g. `GET /v1/charges/{charge}`."""
    parts = path.strip("/").split("/")
    names = {
        "charges": "{charge}",
        "refunds": "{refund}",
        "members": "{member}",
        "disputes": "{dispute}",
        "events": "{event}",
    }
    shape = []
    for i, part in enumerate(parts):
        previous = parts[i - 1] if i else ""
        if previous in names:
            shape.append(names[previous])
        elif previous == "entitlements":
            shape.append("{product}")
        else:
            shape.append(part)
    return f"{method} /{'/'.join(shape)}"


def fault_counts(settings: Settings, windows: Sequence[ProfileWindow]) -> dict[str, dict[str, Any]]:
    """Injected faults per sandbox and kind, from the sandboxes' request logs."""
    counts: dict[str, dict[str, Any]] = {}
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        for sandbox in ("processor", "ams"):
            url, headers = sandbox_admin(settings, sandbox)
            response = http.get(f"{url}/_sandbox/requests", headers=headers)
            response.raise_for_status()
            entries: list[dict[str, Any]] = response.json()
            kinds = Counter(e["fault"] for e in entries if e.get("fault"))
            mine = sorted((w for w in windows if w.sandbox == sandbox), key=lambda w: w.start)

            def latency_at(ts: float, mine: list[ProfileWindow] = mine) -> int:
                current = 0
                for window in mine:
                    if window.start > ts:
                        break
                    current = window.latency_ms
                return current

            delayed = sum(1 for e in entries if latency_at(float(e["ts"])) > 0)
            by_endpoint: dict[str, Counter[str]] = {}
            for e in entries:
                counter = by_endpoint.setdefault(endpoint(e["method"], e["path"]), Counter())
                counter["requests"] += 1
                if e.get("fault"):
                    counter[e["fault"]] += 1
            counts[sandbox] = {
                "requests": len(entries),
                **{kind: kinds.get(kind, 0) for kind in FAULT_KINDS},
                "delayed": delayed,
                "by_endpoint": {name: dict(c) for name, c in sorted(by_endpoint.items())},
                # The log keeps the last REQUEST_LOG_SIZE requests: beyond, counts are a floor.
                "log_truncated": len(entries) >= REQUEST_LOG_SIZE,
            }
    return counts


def webhook_counts(settings: Settings) -> dict[str, Any]:
    """What happened to the processor's webhook deliveries, from its delivery log.

    `dropped`: deliveries never sent; `duplicated`: events sent twice; `held_back`: deliveries
    held so that later events overtook them; `failed_attempts`: attempts the receiver did not
    answer with 2xx (it was down or could not reach Temporal), each retried; `undelivered`:
    events no attempt delivered (dropped, or out of attempts).
    """
    url, headers = sandbox_admin(settings, "processor")
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        response = http.get(f"{url}/_sandbox/webhooks/deliveries", headers=headers)
        response.raise_for_status()
        attempts: list[dict[str, Any]] = response.json()
    events = {a["event"] for a in attempts}
    delivered = {a["event"] for a in attempts if a["delivered"]}
    return {
        "events": len(events),
        "attempts": sum(1 for a in attempts if not a["dropped"]),
        "dropped": sum(1 for a in attempts if a["dropped"]),
        "duplicated": len({a["event"] for a in attempts if a["duplicate"]}),
        "held_back": len({(a["event"], a["duplicate"]) for a in attempts if a["held_s"] > 0}),
        "failed_attempts": sum(1 for a in attempts if not a["dropped"] and not a["delivered"]),
        "undelivered": len(events - delivered),
        "by_type": dict(sorted(Counter(a["type"] for a in attempts if a["attempt"] <= 1).items())),
        "log_truncated": len(attempts) >= DELIVERY_LOG_SIZE,
    }


# -- resets and key pruning ---------------------------------------------------------------------

# Stripe's (and the processor sandbox's) idempotency key lifetime; a minute more forgets them all.
KEY_TTL_S = 86_400
PRUNE_ADVANCE_S = KEY_TTL_S + 60
APPROVAL_SIGNALS = ("approve", "reject")
APPROVAL_UPDATES = ("decide",)
# How the harness calls Temporal: it retries through restarts until the run's deadline.
Call = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


@dataclass(frozen=True)
class ResetRecord:
    """One Reset as ops press it: which run, back to which event, and what it was doing."""

    workflow_id: str
    old_run_id: str
    new_run_id: str
    event_id: int
    state: str
    """The saga's state when it was reset, e.g. REFUNDING, NEEDS_ATTENTION or COMPLETED."""
    at_s: float


@dataclass(frozen=True)
class PruneRecord:
    """One jump of the processor's clock past the key lifetime."""

    advanced_s: float
    in_flight: int
    """Sagas started and not ended at that moment (those waiting for ops included)."""
    waiting_for_ops: int
    at_s: float


def planned_resets(n: int, resets: int | None) -> int:
    """About one saga in twenty, at least two, unless the run says how many."""
    return resets if resets is not None else max(2, round(n / 20))


def reset_marks(rng: random.Random, total: float, count: int) -> list[tuple[float, bool]]:
    """Progress marks of the resets, and whether each prefers a saga that already ended.

    They alternate: a saga still running (its refund sent or not, waiting for ops or not) in
    the first half of the run, while most are, and one that ended in the second half.
    """
    marks: list[tuple[float, bool]] = []
    for i in range(count):
        ended = i % 2 == 1
        share = rng.uniform(0.5, 0.95) if ended else rng.uniform(0.1, 0.5)
        marks.append((share * total, ended))
    return sorted(marks)


def pick_reset_target(
    rng: random.Random,
    candidates: Sequence[tuple[int, bool]],
    *,
    prefer_ended: bool,
    strict: bool = False,
    already_reset: set[int] | frozenset[int] = frozenset(),
) -> int | None:
    """One approved saga to reset, or None when there is none to take.

    Args:
        rng: The chaos schedule's generator.
        candidates: `(saga index, ended)` of every approved saga.
        prefer_ended: Prefer a saga that already ended (else one still running).
        strict: Take only what is preferred; the caller waits for one a while first.
        already_reset: Sagas reset before; taken again only when there is no other.
    """
    preferred = [c for c in candidates if c[1] == prefer_ended]
    pool = preferred if strict or preferred else list(candidates)
    fresh = [c for c in pool if c[0] not in already_reset] or pool
    return rng.choice(sorted(fresh))[0] if fresh else None


def _approval_name(event: HistoryEvent) -> str | None:
    """The signal or update name when the event brings a decision to the saga."""
    if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
        name = event.workflow_execution_signaled_event_attributes.signal_name
        return name if name in APPROVAL_SIGNALS else None
    if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ADMITTED:
        name = event.workflow_execution_update_admitted_event_attributes.request.input.name
    elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
        attributes = event.workflow_execution_update_accepted_event_attributes
        name = attributes.accepted_request.input.name
    else:
        return None
    return name if name in APPROVAL_UPDATES else None


def reset_point(events: Sequence[HistoryEvent]) -> int | None:
    """The last completed workflow task before the first decision reached the saga.

    An accepted update is written after the task that accepted it completed, so that task is
    the one reset: its results, the acceptance included, are discarded and Temporal re-applies
    the update to the new run. A signal is written before the task that reads it. In a run made
    by an earlier reset, the re-applied decisions come after the reset's failed task, so the
    same rule finds the same point again.

    Returns:
        A WorkflowTaskCompleted event id, or None when no decision is in the history.
    """
    last_completed: int | None = None
    for event in events:
        if _approval_name(event) is not None:
            return last_completed
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            last_completed = event.event_id
    return None


async def find_reset_point(client: Client, workflow_id: str) -> tuple[str, int, str]:
    """The current run of a saga, the event to reset it to, and its state (reads only).

    Raises:
        LookupError: No decision has reached the current run yet.
    """
    description = await client.get_workflow_handle(workflow_id).describe()
    run_id = description.run_id
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    point = reset_point(history.events)
    if point is None:
        raise LookupError(f"{workflow_id}: no decision in run {run_id} to reset before")
    state = description.typed_search_attributes.get(sa.REFUND_STATE) or "unknown"
    return run_id, point, state


async def reset_workflow(
    client: Client,
    workflow_id: str,
    run_id: str,
    event_id: int,
    *,
    reason: str,
    request_id: str | None = None,
) -> str:
    """Reset as the Temporal UI does, with its default re-application of signals and updates.

    Args:
        request_id: Temporal drops a repeated reset with the same id: pass the same one when
            retrying after a lost answer.

    Returns:
        The new run's id.
    """
    response = await client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            reason=reason,
            workflow_task_finish_event_id=event_id,
            request_id=request_id or str(uuid.uuid4()),
        )
    )
    return str(response.run_id)


async def advance_clock(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], seconds: float
) -> dict[str, Any]:
    """Move a sandbox's clock forward (`POST /_sandbox/clock`); returns its clock view."""
    response = await http.post(
        f"{url}/_sandbox/clock", json={"advance_s": seconds}, headers=headers
    )
    response.raise_for_status()
    view: dict[str, Any] = response.json()
    return view


async def reset_saga(
    client: Client, workflow_id: str, *, call: Call, clock: Callable[[], float]
) -> ResetRecord:
    """Press Reset on a saga's current run, back to just before its first decision."""
    found = await call(functools.partial(find_reset_point, client, workflow_id))
    old_run, event_id, state = cast(tuple[str, int, str], found)
    request_id = str(uuid.uuid4())  # the same on every try: Temporal resets once
    reset = functools.partial(
        reset_workflow,
        client,
        workflow_id,
        old_run,
        event_id,
        reason="chaos: ops pressed Reset",
        request_id=request_id,
    )
    new_run = str(await call(reset))
    return ResetRecord(workflow_id, old_run, new_run, event_id, state, clock())


async def prune_keys(
    http: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    *,
    in_flight: Callable[[], int],
    waiting_for_ops: Callable[[], int],
    clock: Callable[[], float],
) -> PruneRecord:
    """Jump the processor's clock past the key lifetime: it forgets every key it holds."""
    for _ in range(40):  # meant for keys in flight: wait a little for a saga to be running
        if in_flight():
            break
        await asyncio.sleep(0.5)
    await advance_clock(http, url, headers, PRUNE_ADVANCE_S)
    return PruneRecord(PRUNE_ADVANCE_S, in_flight(), waiting_for_ops(), clock())


def report(
    resets: Sequence[ResetRecord], prunes: Sequence[PruneRecord], planned_resets: int
) -> dict[str, Any]:
    """The report's part on resets and key pruning."""
    return {
        "resets": len(resets),
        "planned_resets": planned_resets,
        "reset_from": dict(Counter(r.state for r in resets)),
        "reset_list": [asdict(r) for r in resets],
        "key_prunes": len(prunes),
        "prunes": [asdict(p) for p in prunes],
    }


def table_line(chaos: dict[str, Any]) -> str:
    """The table's line on resets and key pruning, from the report's `chaos` part."""
    in_flight = ", ".join(str(p["in_flight"]) for p in chaos["prunes"]) or "-"
    return (
        f"  resets:      {chaos['resets']} (from {chaos['reset_from']}), key prunings "
        f"{chaos['key_prunes']} (sagas in flight at each: {in_flight})"
    )

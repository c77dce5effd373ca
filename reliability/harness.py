"""The chaos harness: drives the sagas while it breaks things around them on a seeded schedule.

Worker kills, a Temporal restart, an AMS outage, fault profiles rotating on both sandboxes and
on the processor's webhook deliveries, the webhook receiver killed, resets pressed as ops do,
and the processor forgetting its idempotency keys; then the faults are cleared and the sagas
waiting for ops are retried until every saga ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Sequence
from typing import Any

import httpx
from temporalio.client import Client

from console import stack
from refundsaga.settings import Settings
from reliability import faults as ext
from reliability.config import ChaosConfig, Reporter
from reliability.drive import People
from reliability.faults import (
    OUTAGE,
    PROFILES,
    WEBHOOK_PROFILES,
    ProfileWindow,
    WebhookFaults,
    sandbox_admin,
)
from reliability.records import RestartRecord, RunRecord, SagaPlan, SagaRun

__all__ = ["PROCESSES", "Harness"]

PROCESSES = ("temporal", "processor", "ams", "worker", "webhooks")


class Harness:
    """Drives every saga as people would while the chaos schedule breaks things around it."""

    def __init__(
        self, config: ChaosConfig, settings: Settings, plans: Sequence[SagaPlan], say: Reporter
    ) -> None:
        self.config = config
        self.settings = settings
        self.plans = list(plans)
        self.say = say
        self.record = RunRecord()
        self.webhooks = WebhookFaults(settings)
        self.people = People(
            settings,
            plans,
            say,
            self.record,
            seed=config.seed,
            concurrency=config.concurrency,
            deadline=time.monotonic() + config.budget_s,
            webhooks=self.webhooks if config.webhook_faults else None,
        )
        self.reset_indexes: set[int] = set()
        self.rng = random.Random(config.seed * 7919 + 1)  # chaos schedule and fault profiles
        # Webhook faults and receiver kills draw from their own generator, so the schedule
        # above stays what it was for a seed.
        self.events_rng = random.Random(config.seed * 104_729 + 3)
        self.current: dict[str, str] = {"processor": "none", "ams": "none"}
        self.outage_active = False
        self.down: str | None = None  # what the harness killed and has not restarted yet
        self._http: httpx.AsyncClient | None = None

    @property
    def runs(self) -> list[SagaRun]:
        return self.people.runs

    @property
    def client(self) -> Client:
        return self.people.client

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None
        return self._http

    @property
    def progress(self) -> int:
        """Three steps per saga (started, decided, settled): the clock of the chaos schedule."""
        return self.people.started + self.people.decided + self.people.settled

    async def run(self) -> RunRecord:
        began = time.monotonic()
        await self.people.connect()
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            self._http = http
            await self.apply_profiles()
            await self.apply_webhook_profile()
            drivers = [asyncio.create_task(self.people.drive(plan)) for plan in self.plans]
            chaos = asyncio.create_task(self.chaos_schedule())
            rotation = asyncio.create_task(self.rotate_faults())
            ticker = asyncio.create_task(self.tick())
            # Faults stay on until every saga has ended or waits for ops and the schedule is
            # through; a quarter of the budget is kept for the clean finish.
            clear_by = began + self.config.budget_s * 0.75
            while time.monotonic() < clear_by:
                if self.people.settled == len(self.plans) and chaos.done():
                    break
                await asyncio.sleep(0.5)
            if not chaos.done():
                self.say("time is running out: stopping the chaos schedule early")
                chaos.cancel()
            rotation.cancel()
            for outcome in await asyncio.gather(chaos, rotation, return_exceptions=True):
                if isinstance(outcome, Exception):
                    self.record.chaos_errors.append(f"{type(outcome).__name__}: {outcome}")
                    self.say(f"chaos schedule failed: {outcome}")
            await self.clear_faults()
            # Whatever is down now went down on its own: the restart record shows it.
            with contextlib.suppress(stack.StackError):  # recorded in chaos_errors
                await self.restart(self.down or "nothing")
            self.record.cleared_at_s = self.say.elapsed()
            parked = sum(1 for r in self.runs if r.parked and r.end_state is None)
            self.say(f"faults cleared; resolving {parked} saga(s) in NEEDS_ATTENTION with retry")
            self.people.cleared.set()
            remaining = max(5.0, self.people.deadline - time.monotonic())
            _, pending = await asyncio.wait([*drivers, *self.people.followers], timeout=remaining)
            for task in pending:
                task.cancel()
            await asyncio.gather(*drivers, *self.people.followers, return_exceptions=True)
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            self.say(self.status_line())
        self.record.forced_fates = dict(self.webhooks.forced)
        self.record.run_s = time.monotonic() - began
        return self.record

    async def chaos_schedule(self) -> None:
        """Kill the worker, restart Temporal, take the AMS down, reset sagas and let the
        processor forget its keys, at seeded progress marks."""
        total = 3 * len(self.plans)
        actions = [
            (self.rng.uniform(0.08, 0.85) * total, "kill") for _ in range(self.config.planned_kills)
        ]
        actions.append((self.rng.uniform(0.25, 0.6) * total, "temporal"))
        if self.config.outage_s > 0:
            actions.append((self.rng.uniform(0.1, 0.3) * total, "outage"))
        marks = ext.reset_marks(self.rng, total, self.config.planned_resets)
        actions.extend((mark, "reset-ended" if ended else "reset") for mark, ended in marks)
        actions.extend(
            (self.rng.uniform(0.1, 0.7) * total, "prune") for _ in range(self.config.prunes)
        )
        actions.extend(
            (self.events_rng.uniform(0.15, 0.7) * total, "receiver")
            for _ in range(self.config.receiver_kills)
        )
        actions.sort()
        outage: asyncio.Task[None] | None = None
        for mark, action in actions:
            while self.progress < mark:
                await asyncio.sleep(0.2)
            # A moment of our choosing, not the next poll's.
            await asyncio.sleep(self.rng.uniform(0.0, 2.0))
            if action == "kill":
                await self.kill_worker()
            elif action == "temporal":
                await self.restart_temporal()
            elif action.startswith("reset"):
                await self.reset_saga(prefer_ended=action == "reset-ended")
            elif action == "prune":
                await self.prune_keys()
            elif action == "receiver":
                await self.kill_receiver()
            else:
                outage = asyncio.create_task(self.ams_outage())
        if outage is not None:
            await outage

    async def statuses(self) -> dict[str, stack.ComponentStatus]:
        return {c.name: c for c in await asyncio.to_thread(stack.status, self.settings)}

    async def kill(self, name: str) -> bool:
        """SIGKILL a component's process group and wait until the stack sees it stopped."""
        component = (await self.statuses())[name]
        if component.pid is None:
            self.say(f"{name} is not running: nothing to kill")
            return False
        # The stack starts each process in its own session: the group is that process and
        # whatever it spawned, nothing else.
        os.killpg(component.pid, signal.SIGKILL)
        self.down = name
        for _ in range(100):
            if (await self.statuses())[name].state == "stopped":
                break
            await asyncio.sleep(0.1)
        return True

    async def restart(self, killed: str) -> None:
        before = await self.statuses()
        for attempt in range(1, 4):
            try:
                await asyncio.to_thread(stack.up, self.settings, timeout_s=90)
                break
            except stack.StackError as err:
                self.say(f"stack.up failed (attempt {attempt}/3): {err}")
                if attempt == 3:
                    self.record.chaos_errors.append(f"restart after killing {killed}: {err}")
                    raise
                await asyncio.sleep(2.0)
        after = await self.statuses()
        self.record.restarts.append(
            RestartRecord(
                killed=killed,
                down_before=tuple(n for n in PROCESSES if before[n].state == "stopped"),
                restarted=tuple(n for n in PROCESSES if before[n].pid != after[n].pid),
                at_s=self.say.elapsed(),
            )
        )
        self.down = None

    async def kill_worker(self) -> None:
        if not await self.kill("worker"):
            return
        self.record.kills += 1
        down_s = self.rng.uniform(0.3, 3.0)
        self.say(f"worker killed (SIGKILL #{self.record.kills}); restarting in {down_s:.1f}s")
        await asyncio.sleep(down_s)
        await self.restart("worker")
        self.say(f"worker restarted: {self.status_line()}")

    async def kill_receiver(self) -> None:
        """The webhook receiver goes away: the processor's deliveries fail and are retried with
        backoff; those still failing after their last attempt are left to the sweep."""
        if not await self.kill("webhooks"):
            return
        self.record.receiver_kills += 1
        # Short: the schedule waits for it, and the sagas go on meanwhile.
        down_s = self.events_rng.uniform(2.0, 6.0)
        self.say(f"webhook receiver killed; restarting in {down_s:.1f}s")
        await asyncio.sleep(down_s)
        await self.restart("webhooks")
        self.record.receiver_down_s += down_s
        self.say("webhook receiver restarted")

    async def restart_temporal(self) -> None:
        if not await self.kill("temporal"):
            return
        down_s = self.rng.uniform(1.0, 3.0)
        self.say(f"Temporal dev server killed; restarting in {down_s:.1f}s")
        await asyncio.sleep(down_s)
        await self.restart("temporal")
        self.record.temporal_restarts += 1
        restarted = self.record.restarts[-1].restarted
        self.say(f"Temporal restarted (restarted: {', '.join(restarted) or 'nothing'})")

    async def reset_saga(self, *, prefer_ended: bool) -> None:
        """Press Reset on an approved saga, as ops do in the Temporal UI; follow the new run.

        The new run must end as the old one was to. A saga of the kind preferred (ended or
        still running) is awaited for 20 s, then any approved saga will do.
        """
        index, tries = None, 0
        while index is None:
            # Reconciliations and refunds failing late are left alone: a reset of those is
            # not what this reset tests (the refund's single payment across runs).
            candidates = [
                (i, r.end_state is not None)
                for i, r in enumerate(self.runs)
                if r.approved
                and not self.plans[i].reject
                and not self.plans[i].reconciles
                and not self.plans[i].fail_late
            ]
            index = ext.pick_reset_target(
                self.rng,
                candidates,
                prefer_ended=prefer_ended,
                strict=tries < 40,
                already_reset=self.reset_indexes,
            )
            tries += 1
            await asyncio.sleep(0 if index is not None else 0.5)
        plan, run = self.plans[index], self.runs[index]
        async with self.people.locks[index]:
            record = await ext.reset_saga(
                self.client,
                plan.workflow_id,
                call=lambda make: self.people.call(make, timeout_s=20),
                clock=self.say.elapsed,
            )
            ended = run.end_state is not None
            run.end_state = run.ended_at = run.end_run_id = None
            run.decided, run.confirmed = 0, False  # re-applied by Temporal, else decided again
            self.reset_indexes.add(index)
            self.record.resets.append(record)
        self.say(f"{plan.workflow_id} reset from {record.state}: new run {record.new_run_id}")
        if ended:
            self.people.followers.append(asyncio.create_task(self.people.drive(plan, reset=True)))

    async def prune_keys(self) -> None:
        url, headers = sandbox_admin(self.settings, "processor")
        record = await ext.prune_keys(
            self.http,
            url,
            headers,
            in_flight=lambda: sum(1 for r in self.runs if r.started_at and not r.end_state),
            waiting_for_ops=lambda: sum(1 for r in self.runs if r.parked and not r.end_state),
            clock=self.say.elapsed,
        )
        self.record.prunes.append(record)
        self.say(f"processor forgot its idempotency keys (clock +1 day): {self.status_line()}")

    async def ams_outage(self) -> None:
        self.outage_active = True
        self.record.outage = True
        await self.configure("ams", "outage", OUTAGE)
        self.say(f"AMS outage: every AMS call fails for {self.config.outage_s:.0f}s")
        try:
            await asyncio.sleep(self.config.outage_s)
        finally:
            self.outage_active = False
        await self.configure("ams", *self.draw_profile())
        self.say("AMS outage over")

    def draw_profile(self) -> tuple[str, dict[str, Any]]:
        name = self.rng.choice(sorted(PROFILES))
        return name, {**PROFILES[name](self.rng), "seed": self.rng.randrange(2**31)}

    async def configure(self, sandbox: str, name: str, body: dict[str, Any]) -> None:
        url, headers = sandbox_admin(self.settings, sandbox)
        response = await self.http.post(f"{url}/_sandbox/faults", json=body, headers=headers)
        response.raise_for_status()
        self.current[sandbox] = name
        self.record.profiles_applied += 1
        self.record.windows.append(ProfileWindow(sandbox, time.time(), body.get("latency_ms", 0)))

    async def apply_profiles(self) -> None:
        await self.configure("processor", *self.draw_profile())
        profile = self.draw_profile()  # drawn even during an outage: the sequence stays seeded
        if not self.outage_active:
            await self.configure("ams", *profile)

    async def apply_webhook_profile(self) -> None:
        if not self.config.webhook_faults:
            return
        name = self.events_rng.choice(sorted(WEBHOOK_PROFILES))
        body = {**WEBHOOK_PROFILES[name](self.events_rng), "seed": self.events_rng.randrange(2**31)}
        await self.webhooks.apply(name, body)
        self.record.webhook_profiles += 1

    async def rotate_faults(self) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(4.0, 10.0))
            await self.apply_profiles()
            await self.apply_webhook_profile()

    async def clear_faults(self) -> None:
        for sandbox in ("processor", "ams"):
            await self.configure(sandbox, "none", {})
        await self.webhooks.apply("none", {})

    def status_line(self) -> str:
        ended = sum(1 for r in self.runs if r.end_state is not None)
        parked = sum(1 for r in self.runs if r.parked and r.end_state is None)
        people = self.people
        return (
            f"started {people.started}/{len(self.plans)}, decided {people.decided}, ended {ended}, "
            f"waiting for ops {parked} | worker kills {self.record.kills}, restarts "
            f"{len(self.record.restarts)} (Temporal {self.record.temporal_restarts}) | faults "
            f"processor={self.current['processor']} ams={self.current['ams']} "
            f"webhooks={self.webhooks.name}"
        )

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            self.say(self.status_line())

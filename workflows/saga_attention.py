"""The RefundSaga's ops decisions: a step that failed for good waits in NEEDS_ATTENTION for ops
to retry, skip or abort it, and a manual AMS removal waits for its confirmation.

Workflow code. Both decisions count only from an allowlisted operator (signed, with signing on),
as a signal (fire and forget, a refusal recorded as ignored) or a validated update.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.failures import error_text
from workflows.saga_base import SagaAborted, SagaBase
from workflows.waiting import malformed

with workflow.unsafe.imports_passed_through():
    from refundsaga.approval import ops_refusal
    from refundsaga.contracts import (
        AmsConfirmation,
        ApprovalPolicy,
        DecisionReceipt,
        Resolution,
        ResolutionRecord,
        SagaState,
        WaitingFor,
    )

T = TypeVar("T")


class NeedsAttention(SagaBase):
    """NEEDS_ATTENTION and the ops decisions that end it; the AMS confirmation."""

    async def _attempt(
        self,
        step: str,
        action: Callable[[], Awaitable[T]],
        skipped: T | None = None,
    ) -> T:
        """Run a step; when it fails for good, wait for ops to retry, skip or abort it."""
        while True:
            try:
                return await action()
            except (ActivityError, ApplicationError) as err:
                resolution = await self._needs_attention(step, error_text(err))
                if resolution.action == "retry":
                    continue
                if resolution.action == "skip":
                    return skipped  # type: ignore[return-value]
                raise SagaAborted from err

    async def _needs_attention(self, step: str, error: str) -> Resolution:
        resume_state = self._status.state
        resume_waiting = self._status.waiting_for
        self._status.error = f"{step}: {error}"
        self._attention_step = step
        self._set_state(SagaState.NEEDS_ATTENTION, WaitingFor.OPS)
        self._mark(step, f"needs attention: {error}")
        await self._notify("needs_attention", f"step {step} failed: {error}")
        self._resolution = None
        await workflow.wait_condition(lambda: self._resolution is not None)
        resolution = self._take_resolution(step)
        if resolution.action != "abort":
            self._status.error = None
            self._set_state(resume_state, resume_waiting)
        return resolution

    def _take_resolution(self, step: str) -> Resolution:
        resolution = self._resolution
        assert resolution is not None
        self._resolution = None
        self._status.resolutions.append(
            ResolutionRecord(
                step=step,
                action=resolution.action,
                operator=resolution.operator,
                at=workflow.now(),
                note=resolution.note,
            )
        )
        self._mark(step, f"ops chose {resolution.action}", resolution.operator)
        if resolution.action == "abort":
            self._status.error = f"aborted by {resolution.operator} at {step}" + (
                f": {resolution.note}" if resolution.note else ""
            )
        return resolution

    def _operator_refusal(self, decision: Resolution | AmsConfirmation) -> str | None:
        """An ops decision counts only from an allowlisted operator (signed, with signing on).
        Before the plan there is no policy yet, and nothing to move but the saga itself."""
        if self._plan is None:
            return None
        info = workflow.info()
        return ops_refusal(
            self._plan.policy,
            decision,
            requested_by=self._request.requested_by,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
        )

    # --- retry, skip or abort -----------------------------------------------------------------

    def _resolution_refusal(self, resolution: Resolution) -> str | None:
        if self._status.state not in (
            SagaState.NEEDS_ATTENTION,
            SagaState.AWAITING_AMS_CONFIRMATION,
        ):
            return f"the saga is {self._status.state.value}, not waiting for ops"
        if (
            resolution.action == "skip"
            and self._status.state == SagaState.NEEDS_ATTENTION
            and self._attention_step in ("refund", "settle")
        ):
            # Skipping the pivot would revoke access although no money has moved.
            return "skip is refused at the refund: no money has moved; retry or abort"
        return self._operator_refusal(resolution)

    @workflow.signal
    def resolve(self, resolution: Resolution) -> None:
        """Ops' decision for a saga in NEEDS_ATTENTION: retry, skip or abort the step."""
        if self._ignored_malformed("resolve", resolution, Resolution):
            return
        reason = self._resolution_refusal(resolution)
        if reason:
            self._ignore("resolve", resolution.operator, reason)
        else:
            self._resolution = resolution

    @workflow.update
    async def resolve_attention(self, resolution: Resolution) -> DecisionReceipt:
        """Resolve and learn the outcome at once."""
        self._resolution = resolution
        return self._receipt(f"{resolution.action} accepted")

    @resolve_attention.validator
    def _validate_resolve(self, resolution: Resolution) -> None:
        reason = malformed(resolution, Resolution) or self._resolution_refusal(resolution)
        if reason:
            raise ValueError(reason)

    # --- the manual AMS removal -----------------------------------------------------------------

    async def _wait_for_ams_confirmation(self, policy: ApprovalPolicy) -> AmsConfirmation | None:
        """Wait for the confirmation, reminding, and escalating once when it is overdue.

        Returns:
            The confirmation, or None when ops resolved instead (self._resolution).
        """
        escalate_at = workflow.now() + policy.ams_escalate_after
        escalated = False
        self._resolution = None
        while self._ams_confirmation is None and self._resolution is None:
            until_escalation = escalate_at - workflow.now()
            wait = policy.ams_reminder_every
            if not escalated and until_escalation > timedelta(0):
                wait = min(wait, until_escalation)
            try:
                await workflow.wait_condition(
                    lambda: self._ams_confirmation is not None or self._resolution is not None,
                    timeout=wait,
                    timeout_summary="AMS task reminder",
                )
            except TimeoutError:
                if not escalated and workflow.now() >= escalate_at:
                    escalated = True
                    await self._notify("ams_task_escalated", "manual AMS removal is overdue")
                else:
                    await self._notify("ams_task_reminder", "manual AMS removal still open")
        return self._ams_confirmation

    def _confirmation_refusal(self, confirmation: AmsConfirmation) -> str | None:
        if self._status.state != SagaState.AWAITING_AMS_CONFIRMATION:
            return f"the saga is {self._status.state.value}, not waiting for an AMS confirmation"
        return self._operator_refusal(confirmation)

    @workflow.signal
    def confirm_ams_removal(self, confirmation: AmsConfirmation) -> None:
        """Someone removed the entitlement in the AMS by hand."""
        if self._ignored_malformed("confirm_ams_removal", confirmation, AmsConfirmation):
            return
        reason = self._confirmation_refusal(confirmation)
        if reason:
            self._ignore("confirm_ams_removal", confirmation.operator, reason)
        else:
            self._ams_confirmation = confirmation

    @workflow.update
    async def confirm_ams(self, confirmation: AmsConfirmation) -> DecisionReceipt:
        """Confirm the manual AMS removal and learn the outcome at once."""
        self._ams_confirmation = confirmation
        return self._receipt("AMS removal confirmed")

    @confirm_ams.validator
    def _validate_confirm_ams(self, confirmation: AmsConfirmation) -> None:
        reason = malformed(confirmation, AmsConfirmation) or self._confirmation_refusal(
            confirmation
        )
        if reason:
            raise ValueError(reason)

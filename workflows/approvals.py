"""The approval handlers of every workflow that waits for approvers (saga, batch, restore): the
`approve` and `reject` signals and the validating `decide` update, written once.

Workflow code. The rules (allowlist, four eyes, one decision each, signatures) are
refundsaga.approval's; a workflow names what is approved and, while it waits for approval, the
policy and the requester its approvals are checked against.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Protocol

from temporalio import workflow

from workflows.waiting import ignored_malformed, malformed

with workflow.unsafe.imports_passed_through():
    from refundsaga.approval import refusal_reason
    from refundsaga.contracts import (
        ApprovalDecision,
        ApprovalPolicy,
        ApprovalRecord,
        DecisionReceipt,
        IgnoredMessage,
        SagaState,
    )


class ApprovalStatus(Protocol):
    """What the handlers read and write of a workflow's status."""

    @property
    def state(self) -> StrEnum: ...

    @property
    def approvals(self) -> list[ApprovalRecord]: ...

    @property
    def required_approvals(self) -> int | None: ...

    @property
    def ignored(self) -> list[IgnoredMessage]: ...


def approval_record(decision: ApprovalDecision) -> ApprovalRecord:
    """The decision as the workflow keeps it, stamped with workflow time."""
    return ApprovalRecord(
        approver=decision.approver,
        approve=decision.approve,
        at=workflow.now(),
        comment=decision.comment,
        signature=decision.signature,
    )


class ApprovalHandlers:
    """`approve`, `reject` (signals, fire and forget) and `decide` (a validated update) for a
    workflow that implements `_approval_policy` and `_requester`."""

    # What the workflow is called in refusals ("the saga is REFUNDING, ...").
    APPROVAL_SUBJECT: ClassVar[str]
    # What a decision is said to approve in the timeline and receipts ("approved the batch");
    # empty: just "approved".
    APPROVAL_OBJECT: ClassVar[str] = ""
    # How many ignored messages the status keeps (the latest); None: all.
    IGNORED_KEPT: ClassVar[int | None] = None

    if TYPE_CHECKING:
        _status: ApprovalStatus
        _rejected_by: str | None

        def _mark(self, step: str, outcome: str, actor: str = ...) -> None: ...

    def _approval_policy(self) -> ApprovalPolicy | None:
        """The policy decisions are checked against while waiting for approval, else None."""
        raise NotImplementedError

    def _requester(self) -> str:
        """Who asked for what is approved: they may not decide on it (four eyes)."""
        raise NotImplementedError

    def _ignore(self, kind: str, by: str, reason: str) -> None:
        """Record a message the workflow did not act on, and why (shown in its status)."""
        self._status.ignored.append(
            IgnoredMessage(kind=kind, by=by, at=workflow.now(), reason=reason)
        )
        if self.IGNORED_KEPT is not None:
            del self._status.ignored[: -self.IGNORED_KEPT]
        workflow.logger.info("ignored %s: %s", kind, reason)

    def _approved(self) -> bool:
        required = self._status.required_approvals or 0
        return sum(1 for a in self._status.approvals if a.approve) >= required

    def _decided(self) -> bool:
        """Enough approvals, or a rejection: the approval wait is over."""
        return self._approved() or self._rejected_by is not None

    def _decision_refusal(self, decision: ApprovalDecision) -> str | None:
        policy = self._approval_policy()
        if policy is None:
            state = self._status.state.value
            return f"the {self.APPROVAL_SUBJECT} is {state}, not waiting for approval"
        info = workflow.info()
        return refusal_reason(
            policy,
            approver=decision.approver,
            requested_by=self._requester(),
            decisions=self._status.approvals,
            decision=decision,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
        )

    def _decision_message(self, approve: bool) -> str:
        verb = "approved" if approve else "rejected"
        return f"{verb} {self.APPROVAL_OBJECT}" if self.APPROVAL_OBJECT else verb

    def _apply_decision(self, decision: ApprovalDecision) -> None:
        self._status.approvals.append(approval_record(decision))
        comment = f": {decision.comment}" if decision.comment else ""
        self._mark("approve", self._decision_message(decision.approve) + comment, decision.approver)
        if not decision.approve:
            self._rejected_by = decision.approver

    def _take_signalled_decision(self, message: object, *, approve: bool) -> None:
        """An `approve` or `reject` signal: applied, or recorded as ignored with why
        (malformed, or refused)."""
        kind = "approve" if approve else "reject"
        if ignored_malformed(kind, message, ApprovalDecision, self._ignore):
            return
        assert isinstance(message, ApprovalDecision)
        decision = message.model_copy(update={"approve": approve})
        reason = self._decision_refusal(decision)
        if reason:
            self._ignore(kind, decision.approver, reason)
        else:
            self._apply_decision(decision)

    def _receipt(self, message: str) -> DecisionReceipt:
        """What the decider learns. The workflow is still waiting while the update runs; its run
        loop moves it on."""
        return DecisionReceipt(
            state=SagaState.AWAITING_APPROVAL,
            approvals=sum(1 for a in self._status.approvals if a.approve),
            required_approvals=self._status.required_approvals,
            message=message,
        )

    @workflow.signal
    def approve(self, decision: ApprovalDecision) -> None:
        """Approve (fire and forget; a refused approval is recorded as ignored)."""
        self._take_signalled_decision(decision, approve=True)

    @workflow.signal
    def reject(self, decision: ApprovalDecision) -> None:
        """Reject: nothing changes, the workflow ends REJECTED."""
        self._take_signalled_decision(decision, approve=False)

    @workflow.update
    async def decide(self, decision: ApprovalDecision) -> DecisionReceipt:
        """Approve or reject and learn the outcome at once; refusals never touch history.
        `refund approve <workflow id>` sends this."""
        self._apply_decision(decision)
        return self._receipt(self._decision_message(decision.approve))

    @decide.validator
    def _validate_decide(self, decision: ApprovalDecision) -> None:
        reason = malformed(decision, ApprovalDecision) or self._decision_refusal(decision)
        if reason:
            raise ValueError(reason)

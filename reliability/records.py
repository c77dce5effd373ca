"""What a chaos run planned, saw and found: plain data, no I/O, read by the invariants."""

from __future__ import annotations

from dataclasses import dataclass, field

from refundsaga.ids import reconcile_id_for, workflow_id_for
from reliability.faults import ProfileWindow, PruneRecord, ResetRecord

__all__ = [
    "LedgerRow",
    "OpsTaskFact",
    "ProcessorDisputeFact",
    "ProcessorRefundFact",
    "RestartRecord",
    "RunRecord",
    "SagaExecutionFact",
    "SagaFacts",
    "SagaPlan",
    "SagaRun",
    "SweepFact",
]

# The scenario whose seed refunds the whole charge in the processor's dashboard.
# Refunded in the dashboard at seeding, long before anyone listened (console.seed): no event
# reports it, and support finds it by starting a saga (the seed's "already refunded" case).
SEEDED_OUTSIDE = "already_refunded"


@dataclass(frozen=True)
class SagaPlan:
    """One saga as the harness plans it: the seeded purchase and what people will decide."""

    index: int
    scenario: str
    purchase_id: int
    user_id: int
    product_id: int
    charge_id: str
    purchase_cents: int
    partial_cents: int | None
    reject: bool
    approvers: tuple[str, ...]
    entitlement_source: str
    ams_member_id: str | None
    ams_product_code: str | None
    progress_seeded: int
    money_back: str | None = None
    """`refund` (in the processor's dashboard) or `dispute` (lost): money back outside OASIS,
    which no person starts a saga for; the processor's events start its reconciliation."""
    money_back_cents: int = 0
    fail_late: bool = False
    """The saga's refund fails at the processor after the saga completed; ops close the task."""

    @property
    def reconciles(self) -> bool:
        return self.money_back is not None

    @property
    def refunded_at_seeding(self) -> bool:
        """Refunded in full in the dashboard before anyone listened: support's saga finds it."""
        return self.scenario == SEEDED_OUTSIDE

    @property
    def workflow_id(self) -> str:
        """Support's saga, or the reconciliation the processor's events start."""
        if self.reconciles:
            return reconcile_id_for(self.purchase_id)
        return workflow_id_for(self.purchase_id)

    @property
    def expected_state(self) -> str:
        return "REJECTED" if self.reject else "COMPLETED"

    @property
    def full(self) -> bool:
        if self.refunded_at_seeding:
            return True
        if self.reconciles:
            return self.money_back_cents >= self.purchase_cents
        return self.partial_cents is None

    @property
    def revokes(self) -> bool:
        """A completed full refund revokes progress and entitlement; nothing else does."""
        return self.full and not self.reject

    @property
    def asked_cents(self) -> int:
        """The money the saga itself must move at the processor."""
        if self.reject or self.reconciles or self.refunded_at_seeding:
            return 0
        return self.purchase_cents if self.partial_cents is None else self.partial_cents

    @property
    def external_cents(self) -> int:
        """The money refunded in the processor's dashboard."""
        if self.refunded_at_seeding:
            return self.purchase_cents
        return self.money_back_cents if self.money_back == "refund" else 0

    @property
    def chargeback_cents(self) -> int:
        """The money a lost dispute took back."""
        return self.money_back_cents if self.money_back == "dispute" else 0

    @property
    def ledger_cents(self) -> int:
        """What the OASIS ledger must show afterwards; a refund failed late counts nothing."""
        if self.reject or self.fail_late:
            return 0
        back = self.asked_cents + self.external_cents + self.chargeback_cents
        return min(back, self.purchase_cents)

    @property
    def purchase_status(self) -> str:
        """The purchase's status afterwards; access taken for a refund that then failed stays
        taken (`revoked`) until ops decide otherwise."""
        if self.reject:
            return "active"
        if self.fail_late:
            return "revoked"
        return "refunded" if self.full else "partially_refunded"


@dataclass(frozen=True)
class ProcessorRefundFact:
    refund_id: str
    amount_cents: int
    status: str
    workflow_id: str | None
    """From the refund's metadata: the saga that made it; None for refunds made elsewhere."""


@dataclass(frozen=True)
class ProcessorDisputeFact:
    dispute_id: str
    amount_cents: int
    status: str


@dataclass(frozen=True)
class SagaExecutionFact:
    """One run of a RefundSaga of the purchase, as Temporal lists it."""

    workflow_id: str
    run_id: str
    status: str
    """Temporal's: RUNNING, COMPLETED, TERMINATED (a reset's old run)..."""
    state: str | None
    source: str | None
    """`webhook` or `sweep` for a reconciliation; None for a saga support started."""
    started_at: float
    closed_at: float | None
    reconciled: str | None = None
    """For a reconciliation that completed: the refund or dispute it reconciled."""


@dataclass(frozen=True)
class OpsTaskFact:
    """One run of a FailedRefundTask of the purchase."""

    task_id: str
    run_id: str
    status: str
    state: str | None

    @property
    def refund_id(self) -> str:
        return self.task_id.removeprefix("refund-failed-")


@dataclass(frozen=True)
class SweepFact:
    """One run of the reconciliation sweep; outcomes only once it completed."""

    run_id: str
    status: str
    outcomes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LedgerRow:
    processor_refund_id: str
    amount_cents: int
    status: str
    source: str


@dataclass(frozen=True)
class SagaFacts:
    """What the processor, the store and the AMS hold for one saga after the run."""

    end_state: str | None
    error: str | None = None
    saga_ams_state: str | None = None
    processor_refunds: tuple[ProcessorRefundFact, ...] = ()
    processor_refunded_cents: int = 0
    ledger_refunded_cents: int = 0
    purchase_status: str = "active"
    ledger_rows: tuple[LedgerRow, ...] = ()
    archived: int = 0
    progress_left: int = 0
    ams_entitlement: str | None = None
    """`active`, `removed`, or None when the buyer has no AMS entitlement to the product."""
    processor_disputes: tuple[ProcessorDisputeFact, ...] = ()
    sagas: tuple[SagaExecutionFact, ...] = ()
    """Every RefundSaga run of the purchase, whoever started it."""
    ops_tasks: tuple[OpsTaskFact, ...] = ()
    """Every FailedRefundTask run of the purchase."""


@dataclass(frozen=True)
class RestartRecord:
    """One `stack.up` after the harness stopped something: what was down, what restarted."""

    killed: str
    down_before: tuple[str, ...]
    restarted: tuple[str, ...]
    at_s: float


@dataclass
class SagaRun:
    """What the harness saw of one saga while driving it."""

    started_at: float | None = None
    ended_at: float | None = None
    decided: int = 0
    approved: bool = False
    required_approvals: int | None = None
    confirmed: bool = False
    resolutions: int = 0
    settled: bool = False
    parked: bool = False
    end_state: str | None = None
    end_run_id: str | None = None
    last_state: str | None = None
    error: str | None = None
    saga_ams_state: str | None = None
    attention: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    refund_ids: list[str] = field(default_factory=list)
    money_back_id: str | None = None
    """The dashboard refund or lost dispute the harness made (not the seeded ones)."""
    money_back_at: float | None = None
    source: str | None = None
    """Who started the reconciliation: `webhook` or `sweep`."""
    failed_refund_id: str | None = None
    task_closed: bool = False


@dataclass
class RunRecord:
    """Everything the run did, for the report."""

    kills: int = 0
    temporal_restarts: int = 0
    restarts: list[RestartRecord] = field(default_factory=list)
    resets: list[ResetRecord] = field(default_factory=list)
    prunes: list[PruneRecord] = field(default_factory=list)
    outage: bool = False
    profiles_applied: int = 0
    windows: list[ProfileWindow] = field(default_factory=list)
    decisions: int = 0
    confirmations: int = 0
    resolutions: int = 0
    retried_calls: int = 0
    webhook_profiles: int = 0
    forced_fates: dict[str, int] = field(default_factory=dict)
    receiver_kills: int = 0
    receiver_down_s: float = 0.0
    money_back: int = 0
    late_failures: int = 0
    tasks_closed: int = 0
    run_s: float = 0.0
    cleared_at_s: float | None = None
    chaos_errors: list[str] = field(default_factory=list)

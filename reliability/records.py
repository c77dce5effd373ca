"""What a chaos run planned, saw and found: plain data, no I/O, read by the invariants."""

from __future__ import annotations

from dataclasses import dataclass, field

from refundsaga.ids import workflow_id_for
from reliability.faults import ProfileWindow, PruneRecord, ResetRecord

__all__ = [
    "LedgerRow",
    "ProcessorRefundFact",
    "RestartRecord",
    "RunRecord",
    "SagaFacts",
    "SagaPlan",
    "SagaRun",
]


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

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.purchase_id)

    @property
    def expected_state(self) -> str:
        return "REJECTED" if self.reject else "COMPLETED"

    @property
    def full(self) -> bool:
        return self.partial_cents is None

    @property
    def revokes(self) -> bool:
        """A completed full refund revokes progress and entitlement; nothing else does."""
        return self.full and not self.reject

    @property
    def asked_cents(self) -> int:
        """The money the saga itself must move at the processor."""
        if self.reject or self.scenario == "already_refunded":
            return 0
        return self.purchase_cents if self.partial_cents is None else self.partial_cents

    @property
    def external_cents(self) -> int:
        """The money refunded outside OASIS before the saga started."""
        return self.purchase_cents if self.scenario == "already_refunded" else 0

    @property
    def ledger_cents(self) -> int:
        """What the OASIS ledger must show afterwards."""
        return 0 if self.reject else self.asked_cents + self.external_cents


@dataclass(frozen=True)
class ProcessorRefundFact:
    refund_id: str
    amount_cents: int
    status: str
    workflow_id: str | None
    """From the refund's metadata: the saga that made it; None for refunds made elsewhere."""


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
    run_s: float = 0.0
    cleared_at_s: float | None = None
    chaos_errors: list[str] = field(default_factory=list)

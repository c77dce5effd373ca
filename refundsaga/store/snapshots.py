"""Archived progress as a restore sees it: what a snapshot holds, putting it back, and purging
what the retention no longer allows to restore."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from refundsaga.models import Record
from refundsaga.store.audit import has_event, write_event
from refundsaga.store.engine import Transactions, chunks
from refundsaga.store.errors import StoreError
from refundsaga.store.schema import AuditEventRow, CourseProgress, ProgressArchive, utcnow


class RestoreRefused(StoreError):
    """A restore of archived progress that must not happen: expired, conflicting, or done."""


class SnapshotInfo(Record):
    """What the archive holds for one saga's revoke, for a restore to be judged on."""

    workflow_id: str
    saga_state: str | None
    revoked: bool
    purchase_id: int | None
    user_id: int | None
    product_id: int | None
    rows: int
    archived_at: datetime | None
    restored_at: datetime | None
    restored_by: str | None
    conflicts: int


class RestoreOutcome(Record):
    """Progress rows put back by a restore."""

    restored: int
    purchase_id: int
    user_id: int
    product_id: int


class PurgeOutcome(Record):
    """Archived progress rows deleted because their retention ran out."""

    deleted: int
    sagas: int


def _parse_time(value: object) -> datetime | None:
    # Archived payloads hold times as ISO strings (see Progress.revoke_progress).
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _conflicts(session: Session, user_id: int, product_id: int, keys: Sequence[str]) -> int:
    """How many of the archived items `keys` the user has progress in again."""
    count = 0
    for chunk in chunks(keys):
        count += int(
            session.scalar(
                select(func.count())
                .select_from(CourseProgress)
                .where(
                    CourseProgress.user_id == user_id,
                    CourseProgress.product_id == product_id,
                    CourseProgress.item_key.in_(chunk),
                )
            )
            or 0
        )
    return count


class Snapshots:
    """The progress archive's snapshots, one per saga's revoke, for restores and purges."""

    def __init__(self, transactions: Transactions) -> None:
        self._transactions = transactions

    def snapshot_info(self, workflow_id: str) -> SnapshotInfo:
        """What a restore of a saga's revoke would put back, and what stands in its way.

        The snapshot is the saga's latest revoke (rows archived together share a time); rows
        restored already are not counted. Conflicts are archived items the user has progress
        in again, which a restore would overwrite.

        Args:
            workflow_id: The refund saga that revoked the progress.
        """
        archive = ProgressArchive
        with self._transactions.read() as session:
            ended = session.scalar(
                select(AuditEventRow.detail)
                .where(
                    AuditEventRow.workflow_id == workflow_id,
                    AuditEventRow.event == "saga_ended",
                )
                .order_by(AuditEventRow.at.desc(), AuditEventRow.id.desc())
                .limit(1)
            )
            revoked = has_event(session, workflow_id=workflow_id, event="progress_revoked")
            latest = session.execute(
                select(
                    archive.archived_at, archive.purchase_id, archive.user_id, archive.product_id
                )
                .where(archive.workflow_id == workflow_id)
                .order_by(archive.archived_at.desc(), archive.id.desc())
                .limit(1)
            ).one_or_none()
            info: dict[str, Any] = {
                "workflow_id": workflow_id,
                "saga_state": (ended or {}).get("state"),
                "revoked": revoked,
                "purchase_id": None,
                "user_id": None,
                "product_id": None,
                "rows": 0,
                "archived_at": None,
                "restored_at": None,
                "restored_by": None,
                "conflicts": 0,
            }
            if latest is None:
                return SnapshotInfo(**info)
            archived_at, purchase_id, user_id, product_id = latest
            rows = session.execute(
                select(archive.item_key, archive.restored_at, archive.restored_by).where(
                    archive.workflow_id == workflow_id, archive.archived_at == archived_at
                )
            ).all()
            pending = [row.item_key for row in rows if row.restored_at is None]
            restored = [row for row in rows if row.restored_at is not None]
            info.update(
                purchase_id=purchase_id,
                user_id=user_id,
                product_id=product_id,
                rows=len(pending),
                archived_at=archived_at,
                restored_at=max((r.restored_at for r in restored), default=None),
                restored_by=restored[0].restored_by if restored else None,
                conflicts=_conflicts(session, user_id, product_id, pending),
            )
            return SnapshotInfo(**info)

    def restore_progress(
        self,
        *,
        saga_workflow_id: str,
        archived_at: datetime,
        not_before: datetime,
        restore_workflow_id: str,
        operator: str,
        detail: dict[str, Any],
    ) -> RestoreOutcome:
        """Put a saga's archived progress back, in one transaction, and say so in the trail.

        Safe to run again: a second run by the same restore finds its own rows and returns
        the same outcome.

        Args:
            saga_workflow_id: The refund saga whose revoke is undone.
            archived_at: Which snapshot (the one the approvers saw).
            not_before: Snapshots archived before this have expired (now minus the retention).
            restore_workflow_id: The restore, recorded on each row it puts back.
            operator: Who asked for the restore (the audit event's actor).
            detail: Facts for the audit event (approvers, reason); identifiers only.

        Raises:
            RestoreRefused: The snapshot expired, is gone or already restored, or the user has
                progress again in an archived item (restoring would overwrite it).
        """
        archive = ProgressArchive
        with self._transactions.write() as session:
            done = session.scalars(
                select(archive).where(
                    archive.workflow_id == saga_workflow_id,
                    archive.restored_by == restore_workflow_id,
                )
            ).all()
            if done:
                first = done[0]
                return RestoreOutcome(
                    restored=len(done),
                    purchase_id=first.purchase_id,
                    user_id=first.user_id,
                    product_id=first.product_id,
                )
            if archived_at < not_before:
                raise RestoreRefused(
                    f"the progress snapshot of {saga_workflow_id} (archived "
                    f"{archived_at:%Y-%m-%d %H:%M} UTC) has expired: restores are possible "
                    "within the retention window only"
                )
            rows = session.scalars(
                select(archive)
                .where(
                    archive.workflow_id == saga_workflow_id,
                    archive.archived_at == archived_at,
                    archive.restored_at.is_(None),
                )
                .order_by(archive.id)
                .with_for_update()
            ).all()
            if not rows:
                raise RestoreRefused(
                    f"{saga_workflow_id} has no archived progress left to restore "
                    "(restored already, or purged)"
                )
            first = rows[0]
            keys = [row.item_key for row in rows]
            conflicts = _conflicts(session, first.user_id, first.product_id, keys)
            if conflicts:
                raise RestoreRefused(
                    f"user {first.user_id} has new progress in {conflicts} of the "
                    f"{len(rows)} archived item(s) of product {first.product_id}: a restore "
                    "would overwrite it"
                )
            now = utcnow()
            session.execute(
                insert(CourseProgress),
                [
                    {
                        "user_id": row.user_id,
                        "product_id": row.product_id,
                        "item_key": row.item_key,
                        "percent": int(row.payload.get("percent") or 0),
                        "completed_at": _parse_time(row.payload.get("completed_at")),
                        "created_at": _parse_time(row.payload.get("created_at")) or now,
                    }
                    for row in rows
                ],
            )
            for row in rows:
                row.restored_at = now
                row.restored_by = restore_workflow_id
            write_event(
                session,
                event="progress_restored",
                actor=operator,
                workflow_id=saga_workflow_id,
                purchase_id=first.purchase_id,
                detail={
                    **detail,
                    "restore_workflow_id": restore_workflow_id,
                    "user_id": first.user_id,
                    "product_id": first.product_id,
                    "restored": len(rows),
                    "archived_at": archived_at.isoformat(),
                },
            )
            return RestoreOutcome(
                restored=len(rows),
                purchase_id=first.purchase_id,
                user_id=first.user_id,
                product_id=first.product_id,
            )

    def purge_expired_snapshots(self, *, cutoff: datetime) -> PurgeOutcome:
        """Delete archived progress older than the cutoff: it can no longer be restored.

        Args:
            cutoff: Rows archived before this go (now minus the restore retention).

        Returns:
            How many rows went, from how many sagas; a ``snapshots_purged`` audit event says
            the same when any did.
        """
        archive = ProgressArchive
        with self._transactions.write() as session:
            sagas = int(
                session.scalar(
                    select(func.count(func.distinct(archive.workflow_id))).where(
                        archive.archived_at < cutoff
                    )
                )
                or 0
            )
            result = session.execute(
                delete(archive).where(archive.archived_at < cutoff),
                execution_options={"synchronize_session": False},
            )
            deleted = int(result.rowcount or 0)  # type: ignore[attr-defined]
            if deleted:
                write_event(
                    session,
                    event="snapshots_purged",
                    workflow_id=None,
                    purchase_id=None,
                    detail={"cutoff": cutoff.isoformat(), "deleted": deleted, "sagas": sagas},
                )
            return PurgeOutcome(deleted=deleted, sagas=sagas)

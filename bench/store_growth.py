"""Store growth: the saga's store steps timed on a small and a large OASIS database.

Each step is timed by the wall clock and by this process's CPU time: the CPU is what the
step costs the saga's worker (SQLAlchemy, the driver), the wall adds the database's own work
and its commit. `--sizes 1000 --purchases 2000` is a quick run of the store's CPU per saga.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text

from bench.lib.measure import load_1m
from bench.lib.report import RESULTS, write_json
from refundsaga.models import LedgerEntry
from refundsaga.store import OasisStore
from refundsaga.store.migrate import upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "REFUND_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PRODUCTS = 20
# Progress rows of each measured purchase: the standard scenario's buyer has six.
TARGET_ROWS = 4
CHUNK = 50_000
# The saga's five store calls, in its order: prepare, record, revoke, verify, close.
STEPS = ("load_purchase", "record_refunds", "revoke_progress", "access_facts", "close_saga")


@dataclass
class Database:
    """One bench database: its URL, size, and the purchases the steps are timed on."""

    url: str
    progress_rows: int
    targets: list[tuple[int, int, int]]  # (purchase id, user id, product id)


def _users(purchases: int) -> Iterator[tuple[Any, ...]]:
    now = datetime.now(UTC).replace(tzinfo=None)
    for i in range(1, purchases + 1):
        yield (i, f"Bench Learner {i}", f"learner-{i}@example.org", f"M-{i:08d}", now)


def _purchases(purchases: int) -> Iterator[tuple[Any, ...]]:
    now = datetime.now(UTC).replace(tzinfo=None)
    for i in range(1, purchases + 1):
        product = (i % PRODUCTS) + 1
        yield (i, i, product, 9_995, "usd", f"ch_bench_{i:08d}", "active", 0, now, now)


def _progress(purchases: int, rows: int, targets: int) -> Iterator[tuple[Any, ...]]:
    """`TARGET_ROWS` rows for each of the first `targets` purchases, the rest spread evenly."""
    now = datetime.now(UTC).replace(tzinfo=None)
    produced = 0
    for i in range(1, targets + 1):
        for item in range(TARGET_ROWS):
            yield (i, (i % PRODUCTS) + 1, f"module-1/lesson-{item}", 100, now, now)
            produced += 1
    others = purchases - targets
    left = rows - produced
    per, extra = divmod(left, others)
    for offset in range(others):
        i = targets + 1 + offset
        for item in range(per + (1 if offset < extra else 0)):
            yield (i, (i % PRODUCTS) + 1, f"module-{item // 50}/lesson-{item}", 100, now, now)


def _chunks(rows: Iterator[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_TABLES: dict[str, str] = {
    "users": "id, name, email, ams_member_id, created_at",
    "purchases": (
        "id, user_id, product_id, amount_cents, currency, processor_charge_id, status, "
        "refunded_cents, created_at, updated_at"
    ),
    "course_progress": "user_id, product_id, item_key, percent, completed_at, created_at",
}


def bulk_load(url: str, *, purchases: int, progress_rows: int, targets: int) -> float:
    """Fill a migrated database fast (COPY on PostgreSQL, executemany on SQLite); seconds."""
    began = time.perf_counter()
    engine = create_engine(url)
    postgres = engine.dialect.name == "postgresql"
    products = [
        (p, f"BENCH-{p:03d}", f"Bench product {p}", "ams", datetime.now(UTC).replace(tzinfo=None))
        for p in range(1, PRODUCTS + 1)
    ]
    sources: dict[str, Iterator[tuple[Any, ...]]] = {
        "users": _users(purchases),
        "purchases": _purchases(purchases),
        "course_progress": _progress(purchases, progress_rows, targets),
    }
    raw = engine.raw_connection()
    try:
        cursor: Any = raw.cursor()
        cursor.executemany(
            "INSERT INTO products (id, code, title, entitlement_source, created_at) "
            + ("VALUES (%s, %s, %s, %s, %s)" if postgres else "VALUES (?, ?, ?, ?, ?)"),
            products,
        )
        for table, columns in _TABLES.items():
            if postgres:
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in sources[table]:
                        copy.write_row(row)
            else:
                marks = ", ".join("?" for _ in columns.split(","))
                for chunk in _chunks(sources[table]):
                    cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", chunk)
        if postgres:
            # Explicit ids were inserted: move the sequences past them as a real table would be.
            for table in ("users", "purchases", "products", "course_progress"):
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
        raw.commit()
        # What autovacuum (PostgreSQL) or a periodic ANALYZE would have done after the load.
        cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
        engine.dispose()
    return time.perf_counter() - began


@contextmanager
def database(backend: str, label: str, workdir: Path) -> Iterator[str]:
    """A fresh, migrated database of the backend; dropped (PostgreSQL) afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{workdir / f'{label}.db'}"
        return
    name = f"refund_bench_{label}_{os.getpid()}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


def _step_calls(
    store: OasisStore, target: tuple[int, int, int], n: int
) -> dict[str, Callable[[], object]]:
    purchase_id, user_id, product_id = target
    workflow_id = f"refund-bench-{n}-{purchase_id}"
    entry = LedgerEntry(
        processor_refund_id=f"re_bench_{secrets.token_hex(8)}",
        amount_cents=9_995,
        currency="usd",
        source="processor",
        status="succeeded",
    )
    return {
        "load_purchase": lambda: store.load_purchase(purchase_id),
        "record_refunds": lambda: store.record_refunds(
            purchase_id, [entry], workflow_id=workflow_id
        ),
        "revoke_progress": lambda: store.revoke_progress(
            purchase_id=purchase_id,
            user_id=user_id,
            product_id=product_id,
            workflow_id=workflow_id,
        ),
        "access_facts": lambda: store.access_facts(user_id, product_id),
        "close_saga": lambda: store.close_saga(
            workflow_id=workflow_id,
            purchase_id=purchase_id,
            state="COMPLETED",
            revoked=True,
            decisions=[],
            detail={"branch": "refund", "refund_cents": 9_995, "ams": "removed"},
        ),
    }


Times = dict[str, dict[str, list[tuple[float, float]]]]


def _timed(call: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, CPU ms of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def measure(dbs: Sequence[Database], *, reads: int) -> Times:
    """Time each step on every database, interleaved so both see the same machine load.

    Returns:
        Database URL -> step -> (wall, CPU) milliseconds of each call.
    """
    stores = {db.url: OasisStore.from_url(db.url) for db in dbs}
    times: Times = {db.url: {s: [] for s in STEPS} for db in dbs}
    try:
        # Warm-up: connection pools, statement caches, the OS page cache of the hot pages.
        for db in dbs:
            for _ in range(20):
                stores[db.url].load_purchase(db.targets[-1][0])
                stores[db.url].access_facts(db.targets[-1][1], db.targets[-1][2])
        count = min(len(db.targets) for db in dbs) - 1
        for i in range(count):
            for db in dbs:
                calls = _step_calls(stores[db.url], db.targets[i], i)
                # Prepare, record, revoke, verify, close: the saga's order on one purchase.
                for step in STEPS:
                    times[db.url][step].append(_timed(calls[step]))
        # The reads again, many times over, on purchases spread across the table.
        for i in range(reads):
            for db in dbs:
                purchase_id, user_id, product_id = db.targets[i % count]
                store = stores[db.url]
                times[db.url]["load_purchase"].append(
                    _timed(partial(store.load_purchase, purchase_id))
                )
                times[db.url]["access_facts"].append(
                    _timed(partial(store.access_facts, user_id, product_id))
                )
    finally:
        for store in stores.values():
            store.close()
    return times


def run_backend(
    backend: str, *, purchases: int, sizes: Sequence[int], targets: int, reads: int
) -> dict[str, Any]:
    """Build one database per size on the backend, measure, drop; the figures."""
    with tempfile.TemporaryDirectory(prefix="refundsaga-store-growth-") as tmp:
        workdir = Path(tmp)
        result: dict[str, Any] = {"backend": backend, "purchases": purchases, "sizes": {}}
        with contextlib.ExitStack() as stack:
            dbs: list[Database] = []
            for size in sizes:
                url = stack.enter_context(database(backend, f"p{size}", workdir))
                upgrade(url)
                load_s = bulk_load(url, purchases=purchases, progress_rows=size, targets=targets)
                print(f"  {backend}: {size:,} progress rows loaded in {load_s:.1f}s", flush=True)
                result["sizes"][str(size)] = {"load_s": load_s}
                dbs.append(
                    Database(
                        url=url,
                        progress_rows=size,
                        targets=[(i, i, (i % PRODUCTS) + 1) for i in range(1, targets + 1)],
                    )
                )
            times = measure(dbs, reads=reads)
            for db in dbs:
                steps = {}
                for step, calls in times[db.url].items():
                    walls = sorted(wall for wall, _ in calls)
                    cpus = [cpu for _, cpu in calls]
                    steps[step] = {
                        "calls": len(calls),
                        "median_ms": statistics.median(walls),
                        "p90_ms": walls[int(len(walls) * 0.9)],
                        # process_time ticks coarsely: the mean over many calls, not the median.
                        "cpu_mean_ms": statistics.fmean(cpus),
                    }
                size_result = result["sizes"][str(db.progress_rows)]
                size_result["steps"] = steps
                size_result["cpu_ms_per_saga"] = sum(steps[step]["cpu_mean_ms"] for step in STEPS)
        small, large = str(min(sizes)), str(max(sizes))
        result["ratio_large_to_small"] = {
            step: result["sizes"][large]["steps"][step]["median_ms"]
            / result["sizes"][small]["steps"][step]["median_ms"]
            for step in STEPS
        }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.store_growth`: the store's steps at 1,000 and 1,000,000 progress rows."""
    parser = argparse.ArgumentParser(prog="python -m bench.store_growth", description=__doc__)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--purchases", type=int, default=100_000)
    parser.add_argument("--sizes", default="1000,1000000", help="progress rows, comma-separated")
    parser.add_argument("--targets", type=int, default=200, help="purchases timed per size")
    parser.add_argument("--reads", type=int, default=1000, help="extra read calls per size")
    parser.add_argument("--json-out", type=Path, default=RESULTS / "store_growth.json")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if min(sizes) < args.targets * TARGET_ROWS:
        parser.error(f"the smallest size must hold {args.targets} x {TARGET_ROWS} target rows")
    report: dict[str, Any] = {"load_1m_before": load_1m(), "backends": {}}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        print(f"{backend} ...", flush=True)
        report["backends"][backend] = run_backend(
            backend,
            purchases=args.purchases,
            sizes=sizes,
            targets=args.targets,
            reads=args.reads,
        )
    report["load_1m_after"] = load_1m()
    for backend, result in report["backends"].items():
        print(
            f"\n{backend}: median wall ms per call / mean CPU ms per call "
            "(wall ratio largest / smallest)"
        )
        for step in STEPS:
            cells = "  ".join(
                f"{int(size):>9,} rows {result['sizes'][size]['steps'][step]['median_ms']:7.3f}"
                f" / {result['sizes'][size]['steps'][step]['cpu_mean_ms']:6.3f}"
                for size in result["sizes"]
            )
            print(f"  {step:<16} {cells}   x{result['ratio_large_to_small'][step]:.2f}")
        cpu = "  ".join(
            f"{int(size):>9,} rows {result['sizes'][size]['cpu_ms_per_saga']:6.2f}"
            for size in result["sizes"]
        )
        print(f"  {'CPU ms per saga':<16} {cpu}")
    write_json(report, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

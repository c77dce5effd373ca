"""An activity interceptor that tells the store which workflow run it is writing for."""

from __future__ import annotations

from typing import Any

from temporalio import activity
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from refundsaga.store.runs import run_scope


class RunScopeInterceptor(Interceptor):
    """Every activity's store writes carry the run id Temporal gives the activity."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _RunScopeInbound(next)


class _RunScopeInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        with run_scope(activity.info().workflow_run_id):
            return await self.next.execute_activity(input)

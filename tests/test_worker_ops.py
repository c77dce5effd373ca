"""Running the worker: Prometheus metrics, configuration refusals and graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import (
    PollerBehaviorAutoscaling,
    PollerBehaviorSimpleMaximum,
    UnsandboxedWorkflowRunner,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from refundsaga.metrics import MetricsConfigError, metrics_runtime
from refundsaga.settings import Settings
from tests.fixtures.stack import LiveStack, free_ports
from worker import GRACEFUL_SHUTDOWN, poller_behavior, workflow_runner

REPO = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(REPO / "worker.py")]
START_BUDGET_S = 60.0


async def test_the_metrics_runtime_serves_temporal_metrics(time_env: WorkflowEnvironment) -> None:
    (port,) = free_ports(1)
    runtime = metrics_runtime(f"127.0.0.1:{port}")
    client = await Client.connect(
        time_env.client.service_client.config.target_host, runtime=runtime
    )
    await client.workflow_service.get_system_info(GetSystemInfoRequest())
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    assert 'temporal_request{operation="GetSystemInfo"' in response.text


def test_the_worker_runs_without_the_sandbox_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REFUND_WORKFLOW_SANDBOX", raising=False)
    assert isinstance(workflow_runner(Settings()), UnsandboxedWorkflowRunner)
    monkeypatch.setenv("REFUND_WORKFLOW_SANDBOX", "true")
    assert isinstance(workflow_runner(Settings()), SandboxedWorkflowRunner)


def test_pollers_are_a_fixed_maximum_or_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REFUND_WORKER_POLLERS", raising=False)
    assert poller_behavior(Settings()) == PollerBehaviorSimpleMaximum(maximum=5)
    monkeypatch.setenv("REFUND_WORKER_POLLERS", "auto")
    assert isinstance(poller_behavior(Settings()), PollerBehaviorAutoscaling)
    monkeypatch.setenv("REFUND_WORKER_POLLERS", "12")
    assert poller_behavior(Settings()) == PollerBehaviorSimpleMaximum(maximum=12)
    for wrong in ("0", "-3", "many"):
        monkeypatch.setenv("REFUND_WORKER_POLLERS", wrong)
        with pytest.raises(ValidationError, match="worker_pollers"):
            Settings()


@pytest.mark.parametrize("address", ["9464", ":9464", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_malformed_metrics_address_is_refused(address: str) -> None:
    with pytest.raises(MetricsConfigError, match="REFUND_METRICS_ADDRESS"):
        metrics_runtime(address)


def test_the_worker_refuses_a_webhook_without_a_secret(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "REFUND_DATA_DIR": str(tmp_path),
        "REFUND_NOTIFY_WEBHOOK_URL": "https://hooks.example.org/refunds",
    }
    env.pop("REFUND_NOTIFY_WEBHOOK_SECRET", None)
    done = subprocess.run(WORKER, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "REFUND_NOTIFY_WEBHOOK_SECRET must be set" in done.stderr
    assert "Traceback" not in done.stderr


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def _wait_logged(proc: subprocess.Popen[bytes], log: Path, msg: str) -> None:
    deadline = time.monotonic() + START_BUDGET_S
    while not any(line.get("msg") == msg for line in _json_lines(log)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"worker never logged {msg!r} (exit {proc.poll()}):\n{log.read_text()}")
        time.sleep(0.1)


@pytest.mark.devserver
def test_sigterm_stops_the_worker_gracefully(live_stack: LiveStack, tmp_path: Path) -> None:
    (metrics_port,) = free_ports(1)
    env = {
        **live_stack.env,
        # Its own task queue: the stack's worker and the end-to-end tests are not disturbed.
        "REFUND_TASK_QUEUE": f"refund-ops-{uuid.uuid4().hex[:8]}",
        "REFUND_LOG_FORMAT": "json",
        "REFUND_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(WORKER, env=env, cwd=REPO, stdout=stderr, stderr=stderr)
    try:
        _wait_logged(proc, log, "worker started")
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", trust_env=False)
        assert metrics.status_code == 200 and "temporal_" in metrics.text

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=GRACEFUL_SHUTDOWN.total_seconds() + 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()
    messages = [line["msg"] for line in _json_lines(log)]
    stopping = messages.index("worker stopping: finishing in-flight activities")
    assert messages.index("worker stopped") > stopping
    started = next(line for line in _json_lines(log) if line["msg"] == "worker started")
    assert started["task_queue"] == env["REFUND_TASK_QUEUE"]

"""Structured logs: JSON lines with the Temporal context flattened, and the redaction net."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity, workflow
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from refundsaga.logs import (
    JsonFormatter,
    RedactingFormatter,
    TemporalContextFilter,
    configure_logging,
    redact,
)
from tests.fixtures.temporal import binary

step_log = logging.getLogger("refundsaga.test_step")


class Lines(logging.Handler):
    """Formats records like the worker's handler does and keeps the JSON lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.addFilter(TemporalContextFilter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def find(self, msg_start: str) -> dict[str, Any]:
        (line,) = [line for line in self.lines if line["msg"].startswith(msg_start)]
        return line


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    loggers = [step_log, activity.logger.logger, workflow.logger.logger]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def _record(msg: str, *args: object, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("refundsaga.x", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_record_with_extras_is_one_json_object() -> None:
    record = _record(
        "refund %s sent",
        "re_1",
        workflow_id="refund-42",
        purchase_id=42,
        plan={"amount_cents": 4900, "steps": ["refund", "revoke"]},
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "refund re_1 sent"
    assert (entry["level"], entry["logger"]) == ("warning", "refundsaga.x")
    assert entry["workflow_id"] == "refund-42" and entry["purchase_id"] == 42
    assert entry["plan"] == {"amount_cents": 4900, "steps": ["refund", "revoke"]}
    assert entry["ts"].endswith("+00:00")


def test_emails_tokens_and_keys_are_masked() -> None:
    record = _record(
        "mail %s, sent Authorization: Bearer sk_test_x to %s",
        "jane.doe@example.org",
        "postgresql://oasis:hunter2@db.internal/oasis",
        reason="asked by j.doe+refunds@mail.example.com",
        headers={"Authorization": "Bearer abc.def", "accept": "json"},
        processor_api_key="sk_live_123",
        note=["key rk_test_9 leaked", "fine"],
    )
    try:
        raise RuntimeError("boom for x@example.org with whsec_abc")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    entry = json.loads(text)
    for leaked in ("jane.doe", "j.doe+refunds", "sk_test_x", "hunter2", "abc.def", "sk_live"):
        assert leaked not in text
    assert "rk_test_9" not in text and "whsec_abc" not in text and "x@example.org" not in text
    assert entry["msg"] == (
        "mail [email], sent Authorization: Bearer [redacted] to "
        "postgresql://[redacted]@db.internal/oasis"
    )
    assert entry["reason"] == "asked by [email]"
    assert entry["headers"] == {"Authorization": "[redacted]", "accept": "json"}
    assert entry["processor_api_key"] == "[redacted]"
    # Identifiers that merely look alike stay readable.
    assert redact("refund-42 ams_confirmation re_1 12345@worker-host") == (
        "refund-42 ams_confirmation re_1 12345@worker-host"
    )


def test_the_text_format_is_redacted_too() -> None:
    line = RedactingFormatter("%(levelname)s %(message)s").format(
        _record("token Bearer sk_test_x for a@b.org")
    )
    assert line == "WARNING token Bearer [redacted] for [email]"


async def test_records_in_an_activity_carry_workflow_id_step_and_attempt(lines: Lines) -> None:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, workflow_id="refund-7", activity_type="refund_at_processor", attempt=2
    )

    async def step() -> None:
        step_log.info("plain logger")
        activity.logger.info("sdk logger")

    await env.run(step)
    for msg in ("plain logger", "sdk logger"):
        entry = lines.find(msg)
        assert (entry["workflow_id"], entry["activity"], entry["attempt"]) == (
            "refund-7",
            "refund_at_processor",
            2,
        )
        assert "temporal_activity" not in entry


@activity.defn(name="log_test_step")
async def log_test_step() -> None:
    step_log.info("inside the activity", extra={"purchase_id": 7})


@workflow.defn(name="LogTestWorkflow")
class LogTestWorkflow:
    @workflow.run
    async def run(self) -> None:
        workflow.logger.info("inside the workflow")
        await workflow.execute_activity(log_test_step, start_to_close_timeout=timedelta(seconds=10))


async def test_workflow_and_activity_records_on_a_real_worker(
    time_env: WorkflowEnvironment, lines: Lines
) -> None:
    task_queue = f"log-test-{uuid.uuid4().hex[:8]}"
    workflow_id = f"log-test-{uuid.uuid4().hex[:8]}"
    async with Worker(
        time_env.client,
        task_queue=task_queue,
        workflows=[LogTestWorkflow],
        activities=[log_test_step],
        # The saga's own runner: the filter and formatter must work inside the sandbox too.
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules("tests", "pytest")
        ),
    ):
        await time_env.client.execute_workflow(
            LogTestWorkflow.run, id=workflow_id, task_queue=task_queue
        )
    in_workflow = lines.find("inside the workflow")
    assert in_workflow["workflow_id"] == workflow_id
    assert in_workflow["workflow_type"] == "LogTestWorkflow" and in_workflow["run_id"]
    in_activity = lines.find("inside the activity")
    assert in_activity["workflow_id"] == workflow_id
    assert (in_activity["activity"], in_activity["attempt"]) == ("log_test_step", 1)
    assert in_activity["purchase_id"] == 7


def test_configure_logging_json(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    saved_flags = (
        activity.logger.activity_info_on_message,
        workflow.logger.workflow_info_on_message,
    )
    try:
        configure_logging("json")
        logging.getLogger("refundsaga.worker").info("worker started", extra={"task_queue": "q"})
        assert not activity.logger.activity_info_on_message
    finally:
        root.handlers[:], root.level = saved
        activity.logger.activity_info_on_message = saved_flags[0]
        workflow.logger.workflow_info_on_message = saved_flags[1]
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (entry["msg"], entry["task_queue"]) == ("worker started", "q")


# --- the Temporal SDK core's own log lines ----------------------------------------------------

PERSONAL = "jane.doe@example.com"


class Messages(logging.Handler):
    """Keeps each record's message as a plain handler (no redacting formatter) would print it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.messages.append(self.format(record))


@pytest.fixture
def core_lines() -> Iterator[Messages]:
    handler = Messages()
    core = logging.getLogger("temporalio.sdk_core")
    core.addHandler(handler)
    yield handler
    core.removeHandler(handler)


def test_a_forwarded_core_record_is_masked_for_every_handler(core_lines: Messages) -> None:
    from refundsaga.logs import CORE_LOGGER

    # As LogForwardingConfig builds it: message with the core's fields appended, and the raw
    # core entry as the `temporal_log` extra.
    record = CORE_LOGGER.makeRecord(
        CORE_LOGGER.name,
        logging.WARNING,
        "(sdk-core)",
        0,
        f"[sdk_core::worker] Failing workflow task {{'failure': 'input {PERSONAL}'}}",
        (),
        None,
        extra={"temporal_log": f"raw {PERSONAL}"},
    )
    CORE_LOGGER.handle(record)
    (message,) = core_lines.messages
    assert PERSONAL not in message and "[email]" in message
    assert not hasattr(core_lines.records[0], "temporal_log")
    assert PERSONAL not in JsonFormatter().format(core_lines.records[0])


@pytest.fixture
async def own_time_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of its own: a workflow whose tasks keep failing leaves the test
    server unable to skip time, which would stall every later test on the shared one."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary("temporal-test-server")
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def test_the_worker_runtime_masks_core_lines_about_a_rejected_raw_input(
    own_time_env: WorkflowEnvironment,
    core_lines: Messages,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # A raw start whose input carries an email, decoded by the SDK's plain pydantic converter
    # (the product's own ends such a workflow at once, naming no value): the worker fails the
    # workflow task, and the SDK core logs the failure with its cause.
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter

    from refundsaga.metrics import runtime_from_settings
    from refundsaga.settings import Settings
    from workflows.refund_saga import RefundSaga

    client = await Client.connect(
        own_time_env.client.service_client.config.target_host,
        namespace=own_time_env.client.namespace,
        data_converter=pydantic_data_converter,
        runtime=runtime_from_settings(Settings()),
    )
    task_queue = f"core-logs-{uuid.uuid4().hex[:8]}"
    written = ""
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[RefundSaga],
        workflow_runner=SandboxedWorkflowRunner(),
    ):
        handle = await client.start_workflow(
            "RefundSaga",
            {"purchase_id": 1, "reason": f"refund for {PERSONAL}", "requested_by": "sam"},
            id=f"core-logs-{uuid.uuid4().hex[:8]}",
            task_queue=task_queue,
        )
        for _ in range(100):
            written += "".join(capfd.readouterr())
            if any("Failing workflow task" in m for m in core_lines.messages):
                break
            if "Failing workflow task" in written:
                break
            await asyncio.sleep(0.1)
        await handle.terminate("core log test over")
    written += "".join(capfd.readouterr())
    assert PERSONAL not in written  # nothing unmasked straight to stderr
    failing = [m for m in core_lines.messages if "Failing workflow task" in m]
    assert failing, "the core's warning did not reach Python logging"
    assert all(PERSONAL not in m for m in core_lines.messages)
    assert any("[email]" in m for m in failing)

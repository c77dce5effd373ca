"""Tests of the embedded stack: a real dev server, sandboxes and worker on free ports."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from console import stack
from console.stack import processes
from refundsaga import search_attributes
from refundsaga.settings import Settings

pytestmark = pytest.mark.devserver


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers bind: connections left in TIME_WAIT do not block the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ports(settings: Settings) -> list[int]:
    return [settings.temporal_port, settings.ui_port, settings.processor_port, settings.ams_port]


def _assert_all_stopped(settings: Settings) -> None:
    statuses = stack.status(settings)
    assert [(s.name, s.state, s.pid) for s in statuses] == [
        (name, "stopped", None) for name in stack.COMPONENTS
    ]
    assert not list((settings.data_dir / "pids").glob("*.pid"))
    for port in _ports(settings):
        assert _port_free(port), f"port {port} still taken"


def _start_naming_every_search_attribute(address: str) -> None:
    """Start (then terminate) a workflow that sets every saga search attribute, as
    `refund start` does; the server refuses the start if one is not usable yet."""

    async def start() -> None:
        client = await Client.connect(address)
        values: dict[str, object] = {"Keyword": "x", "Int": 1}
        pairs = [
            SearchAttributePair(key, values[key.indexed_value_type.name.title()])
            for key in search_attributes.ALL
        ]
        handle = await client.start_workflow(
            "NoSuchWorkflow",
            id="search-attribute-probe",
            task_queue="nobody-polls-this",
            search_attributes=TypedSearchAttributes(pairs),
        )
        await handle.terminate("probe")

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(start())
    finally:
        loop.close()


def _custom_search_attributes(address: str) -> set[str]:
    # A private loop: asyncio.run would reset the current event loop pytest-asyncio relies on.
    async def fetch() -> set[str]:
        client = await Client.connect(address)
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace="default")
        )
        return set(response.custom_attributes)

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(fetch())
    finally:
        loop.close()


@pytest.fixture
def stack_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings on free ports and a tmp data dir; whatever a test left running is stopped."""
    temporal, ui, processor, ams = stack.free_ports(4)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "stack",
        temporal_port=temporal,
        temporal_address=f"127.0.0.1:{temporal}",
        ui_port=ui,
        processor_port=processor,
        ams_port=ams,
        database_url=None,
    )
    yield settings
    stack.down(settings, timeout_s=10)


def test_up_status_down(stack_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = stack_settings
    # Start the dev server with one search attribute only, as from an old db file: up() must
    # register the others itself.
    all_flags = search_attributes.dev_server_flags()
    monkeypatch.setattr(search_attributes, "dev_server_flags", lambda: all_flags[:1])
    progress: list[str] = []

    started = time.monotonic()
    statuses = stack.up(settings, on_progress=progress.append)
    up_s = time.monotonic() - started

    assert [s.name for s in statuses] == list(stack.COMPONENTS)
    assert all(s.state == "running" and s.pid for s in statuses), statuses
    assert up_s < 30, progress
    assert any("registered missing search attributes" in line for line in progress), progress
    assert "schedules: reconciliation sweep of the processor created" in progress, progress
    assert _custom_search_attributes(f"127.0.0.1:{settings.temporal_port}") >= {
        key.name for key in search_attributes.ALL
    }
    # The server caches search attributes (stack.DEV_SERVER_DYNAMIC_CONFIG): up() returned only
    # once the ones it registered are usable, so a start naming them is accepted at once.
    _start_naming_every_search_attribute(f"127.0.0.1:{settings.temporal_port}")

    current = {s.name: s for s in stack.status(settings)}
    assert [s.state for s in current.values()] == ["running"] * len(stack.COMPONENTS)
    assert current["ui"].pid == current["temporal"].pid
    assert current["temporal"].url == f"127.0.0.1:{settings.temporal_port}"
    assert current["worker"].url == settings.task_queue
    webhook_url = f"http://127.0.0.1:{settings.webhooks_port}/stripe/webhook"
    assert current["webhooks"].url == webhook_url
    with httpx.Client(timeout=5, trust_env=False) as http:
        assert http.get(f"http://127.0.0.1:{settings.ui_port}/").status_code == 200
        for port in (settings.processor_port, settings.ams_port, settings.webhooks_port):
            assert http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        # The processor sandbox sends its events to the stack's receiver, which refuses an
        # unsigned delivery.
        endpoints = http.get(
            f"http://127.0.0.1:{settings.processor_port}/v1/webhook_endpoints",
            headers={"Authorization": f"Bearer {settings.processor_api_key.get_secret_value()}"},
        ).json()["data"]
        assert [e["url"] for e in endpoints] == [webhook_url]
        assert http.post(webhook_url, content=b"{}").status_code == 400
    processor_pid = current["processor"].pid
    cmdline = Path(f"/proc/{processor_pid}/cmdline")
    if cmdline.exists():  # the key travels in the environment, not in what `ps` shows
        assert settings.processor_api_key.get_secret_value().encode() not in cmdline.read_bytes()
    for name in ("temporal", "processor", "ams", "worker", "webhooks"):
        assert (settings.data_dir / "logs" / f"{name}.log").exists()
        pid_file = settings.data_dir / "pids" / f"{name}.pid"
        assert int(pid_file.read_text()) == current[name].pid

    again = stack.up(settings)
    assert [(s.name, s.pid) for s in again] == [(s.name, s.pid) for s in statuses]

    stopped = stack.down(settings)
    assert [s.state for s in stopped] == ["stopped"] * len(stack.COMPONENTS)
    _assert_all_stopped(settings)
    assert stack.down(settings) == stopped  # idempotent


def test_taken_port_is_a_clear_error(stack_settings: Settings) -> None:
    settings = stack_settings
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", settings.processor_port))
        squatter.listen()
        started = time.monotonic()
        with pytest.raises(stack.StackError) as raised:
            stack.up(settings)
        assert time.monotonic() - started < 5
    assert str(raised.value) == (
        f"port {settings.processor_port} (processor) is in use by another process; "
        "stop it or set REFUND_PROCESSOR_PORT"
    )
    _assert_all_stopped(settings)


def test_failed_start_stops_what_it_started(stack_settings: Settings) -> None:
    # The sandbox refuses to start without an API key; temporal is up by then.
    settings = stack_settings.model_copy(update={"processor_api_key": SecretStr("")})
    with pytest.raises(stack.StackError) as raised:
        stack.up(settings, timeout_s=30)
    message = str(raised.value)
    assert message.startswith("processor exited during start-up with code 2: see ")
    assert str(settings.data_dir.resolve() / "logs" / "processor.log") in message
    assert "an API key is required" in message
    _assert_all_stopped(settings)


def test_missing_temporal_cli(
    stack_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(processes, "_VENV_BIN", tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(
        stack.StackError, match=r"temporal CLI not found in .*/bin: run `make install`"
    ):
        stack.up(stack_settings)
    _assert_all_stopped(stack_settings)


def test_stale_pid_files(stack_settings: Settings) -> None:
    settings = stack_settings
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pids = settings.data_dir / "pids"
    pids.mkdir(parents=True)
    # A dead pid, and a live process that is not ours (this test process).
    (pids / "processor.pid").write_text(f"{dead.pid}\n")
    (pids / "worker.pid").write_text(f"{os.getpid()}\n")

    assert {s.name: s.state for s in stack.status(settings)}["processor"] == "stopped"
    assert {s.name: s.state for s in stack.status(settings)}["worker"] == "stopped"
    progress: list[str] = []
    stack.down(settings, on_progress=progress.append)
    assert not list(pids.glob("*.pid"))
    assert sum("stale pid file" in line for line in progress) == 2

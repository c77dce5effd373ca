"""The house rule for `workflows/`, read from the source: orchestration only, nothing that is
different on a replay.

The production worker runs without the SDK's sandbox (worker.py), so this is one of the three
checks that stand in for it: the sandboxed test worlds (tests/fixtures/temporal.py), the replay
of every recorded history under both runners (test_replay.py), and this scan, which also sees
the branches no test reaches.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).parents[1] / "workflows").glob("*.py"))

# Modules whose use in workflow code differs between a run and its replay, or does I/O.
FORBIDDEN_MODULES = {
    "httpx",
    "sqlalchemy",
    "random",
    "secrets",
    "time",
    "uuid",
    "os",
    "threading",
    "socket",
    "subprocess",
    "concurrent",
    "logging",
    "refundsaga.store",
    "refundsaga.processor",
    "refundsaga.ams",
    "refundsaga.notify",
    "refundsaga.settings",
}
# Calls whose result depends on the wall clock, the machine or the outside world.
FORBIDDEN_CALLS = {"now", "utcnow", "today", "open", "print", "sleep", "input", "getenv"}
# `workflow.now()`, `workflow.uuid4()`, `workflow.sleep()`: the deterministic versions.
ALLOWED_RECEIVERS = {"workflow"}


def violations(source: str) -> list[str]:
    """What in a workflow module's source breaks the house rule, one line each."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.stmt | ast.expr):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            if any(name == bad or name.startswith(f"{bad}.") for bad in FORBIDDEN_MODULES):
                found.append(f"line {node.lineno}: imports {name}")
        if isinstance(node, ast.Global):
            found.append(f"line {node.lineno}: global state ({', '.join(node.names)})")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: calls {func.id}()")
            if isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_CALLS:
                receiver = func.value.id if isinstance(func.value, ast.Name) else None
                if receiver not in ALLOWED_RECEIVERS:
                    found.append(f"line {node.lineno}: calls {ast.unparse(func)}()")
    return found


def test_there_are_workflow_modules_to_check() -> None:
    names = {path.name for path in WORKFLOWS}
    assert {"refund_saga.py", "batch_refund.py", "restore_progress.py"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_code_makes_no_call_that_differs_on_replay(path: Path) -> None:
    assert violations(path.read_text()) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import httpx",
        "from sqlalchemy.orm import Session",
        "import random",
        "from refundsaga.store import OasisStore",
        "from datetime import datetime\nx = datetime.now()",
        "import datetime\nx = datetime.datetime.utcnow()",
        "import asyncio\nasyncio.sleep(1)",
        "print('hello')",
        "COUNT = 0\ndef f():\n    global COUNT\n    COUNT += 1",
    ],
)
def test_the_scan_finds_what_it_is_for(snippet: str) -> None:
    assert violations(snippet), snippet


def test_the_deterministic_versions_pass() -> None:
    source = (
        "from temporalio import workflow\n"
        "async def f():\n"
        "    workflow.now()\n"
        "    workflow.uuid4()\n"
        "    await workflow.sleep(1)\n"
    )
    assert violations(source) == []

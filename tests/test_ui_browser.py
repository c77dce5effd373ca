"""Ops in the Temporal UI: a waiting saga under its RefundState query, with its summary."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import quote

import pytest

from tests.fixtures.stack import LiveStack
from tests.test_e2e import refund_json, seed

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.devserver

# Debian's Chromium (`apt-get install -y chromium`); no browser is ever downloaded.
CHROMIUM = Path(os.environ.get("REFUND_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
UI_WAIT_S = 60.0


def _unavailable(reason: str) -> NoReturn:
    # On a laptop without Chromium the test skips; CI must run it.
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """A page in a headless Chromium with a fresh profile."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed: pip install -e '.[dev]'")
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1600, "height": 900},
            )
        except Error as err:
            _unavailable(f"Chromium at {CHROMIUM} did not start: {err.message.splitlines()[0]}")
        context.set_default_timeout(30_000)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def _wait_for_text_in_frames(page: Page, text: str) -> None:
    """Wait until `text` shows in the page or one of its frames (the UI renders Markdown
    user metadata in iframes)."""
    deadline = time.monotonic() + UI_WAIT_S
    while True:
        for frame in page.frames:
            try:
                if text in frame.inner_text("body", timeout=1_000):
                    return
            except Exception:
                continue  # a frame that is being replaced
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never showed on {page.url}")
        page.wait_for_timeout(250)


def test_ops_find_a_waiting_saga_and_its_summary_in_the_ui(
    live_stack: LiveStack, page: Page
) -> None:
    purchase_id = seed(live_stack, "standard")["purchase_id"]
    started = refund_json(
        live_stack, "start", str(purchase_id), "--reason", "ui check", "--as", "sam"
    )
    workflow_id = started["workflow_id"]
    assert started["state"] == "AWAITING_APPROVAL"
    settings = live_stack.settings
    workflows = f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows"
    try:
        query = quote('RefundState="AWAITING_APPROVAL"')
        page.goto(f"{workflows}?query={query}")
        link = page.get_by_role("link", name=workflow_id, exact=True)
        # The list comes from the visibility store, which may trail the start: reload until the
        # saga is listed (the page does not refresh by itself).
        deadline = time.monotonic() + UI_WAIT_S
        while not link.is_visible():
            assert time.monotonic() < deadline, f"{workflow_id} never listed at {page.url}"
            page.wait_for_timeout(500)
            if not link.is_visible():
                page.reload()
                page.get_by_text("Workflow", exact=False).first.wait_for()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-workflows.png"))

        # The list (UI 2.54) has no summary column; the workflow's User Metadata tab shows the
        # static summary and the current details the saga keeps up to date.
        link.click()
        page.wait_for_url(f"**/workflows/{workflow_id}/**")
        page.get_by_role("tab", name="User Metadata").click()
        _wait_for_text_in_frames(page, f"Refund purchase {purchase_id}")
        _wait_for_text_in_frames(page, "State: AWAITING_APPROVAL")
        page.screenshot(path=str(ARTIFACTS / "ui-workflow-summary.png"))
    finally:
        # Leave no saga waiting for the other end-to-end tests to trip over.
        refund_json(live_stack, "reject", workflow_id, "--as", "bob", "--comment", "ui test")

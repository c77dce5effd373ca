"""What the embedded stack is made of: its components, their ports, files and environment, the
command lines of the sandboxes and the worker, and the settings of a stack of one's own."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from refundsaga.settings import Settings

HOST = "127.0.0.1"
COMPONENTS = ("temporal", "ui", "processor", "ams", "worker", "webhooks")
"""Every component `status()` reports, in start order (`ui` is served by the temporal process)."""

ComponentState = Literal["running", "stopped", "starting", "unhealthy"]

# The processes the stack owns, in start order; `down()` stops them in reverse.
PROCESSES = ("temporal", "processor", "ams", "worker", "webhooks")
# Ports each process listens on: (component, settings field). The field names the env var.
_PORTS: dict[str, tuple[tuple[str, str], ...]] = {
    "temporal": (("temporal", "temporal_port"), ("ui", "ui_port")),
    "processor": (("processor", "processor_port"),),
    "ams": (("ams", "ams_port"),),
    "worker": (),
    "webhooks": (("webhooks", "webhooks_port"),),
}
# `python -c` leaves later arguments alone, so this tag only labels the worker's command line:
# it shows which data dir a worker in `ps` belongs to and lets us tell our worker from a
# recycled pid.
_WORKER_TAG = "--refundsaga-stack="
_WEBHOOKS_TAG = "--refundsaga-webhooks="
WEBHOOK_SECRET_FILE = "processor-webhook-secret"


class StackError(RuntimeError):
    """The stack could not be brought up or down; the message says what to do next."""


@dataclass
class ComponentStatus:
    """What one component of the stack is doing.

    Attributes:
        name: `temporal`, `ui`, `processor`, `ams` or `worker`.
        state: `running` (alive and answering), `stopped`, `starting` or `unhealthy` (alive
            but not answering).
        pid: The process id, None when stopped (`ui` shares the temporal process).
        url: Where to reach it: the gRPC address for temporal, HTTP URLs for the UI and the
            sandboxes, the task queue name for the worker.
    """

    name: str
    state: ComponentState
    pid: int | None
    url: str | None

    def to_dict(self) -> dict[str, Any]:
        """The status as a JSON-ready dict."""
        return asdict(self)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, held open together while chosen."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def private_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings of a stack of its own (tests, chaos, benches): `data_dir`, free loopback ports,
    never the default ones, and the addresses that go with them; `overrides` on top.

    Every field set here is explicit, so `settings_env` hands all of it to a subprocess.
    """
    temporal, ui, processor, ams, webhooks = free_ports(5)
    fields: dict[str, Any] = {
        "data_dir": data_dir,
        "temporal_port": temporal,
        "ui_port": ui,
        "processor_port": processor,
        "ams_port": ams,
        "webhooks_port": webhooks,
        "temporal_address": f"{HOST}:{temporal}",
        "temporal_ui_url": http_url(ui),
        "processor_url": http_url(processor),
        "ams_url": http_url(ams),
    }
    return Settings(**(fields | overrides))


def stack_env(settings: Settings) -> dict[str, str]:
    """The `REFUND_*` environment that points a process at the stack's components.

    The stack's worker gets this on top of the current environment (plus the sandbox API keys,
    which are left out here so that printing this dict never shows a secret). URLs are derived
    from the stack's ports, not from `processor_url` and friends.

    Args:
        settings: The settings the stack runs with.

    Returns:
        Variable name to value; `REFUND_DATABASE_URL` may carry a database password.
    """
    return {
        "REFUND_DATA_DIR": str(settings.data_dir.resolve()),
        "REFUND_TEMPORAL_ADDRESS": temporal_address(settings),
        "REFUND_TEMPORAL_NAMESPACE": settings.temporal_namespace,
        "REFUND_TEMPORAL_UI_URL": http_url(settings.ui_port),
        "REFUND_TASK_QUEUE": settings.task_queue,
        "REFUND_DATABASE_URL": settings.resolved_database_url,
        "REFUND_PROCESSOR_URL": http_url(settings.processor_port),
        "REFUND_AMS_URL": http_url(settings.ams_port),
    }


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings given explicitly (not from defaults) as `REFUND_*` variables, so the worker
    process runs with the Settings object the stack was started with, not only the shell's."""
    env: dict[str, str] = {}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            text = json.dumps(value)
        elif isinstance(value, timedelta):
            text = str(int(value.total_seconds()))
        else:
            text = str(value)
        env[f"REFUND_{name.upper()}"] = text
    return env


def worker_env(settings: Settings) -> dict[str, str]:
    """The whole environment of the stack's worker: this one's, the settings, the stack's."""
    env = {**os.environ, **settings_env(settings), **stack_env(settings)}
    # The keys the sandboxes were started with, so the worker's requests are accepted.
    env["REFUND_PROCESSOR_API_KEY"] = settings.processor_api_key.get_secret_value()
    env["REFUND_AMS_API_KEY"] = settings.ams_api_key.get_secret_value()
    return env


def webhook_secret(settings: Settings) -> SecretStr:
    """The secret the processor sandbox signs its webhooks with and the receiver checks: the
    configured one, else one made for this data dir and kept there (mode 600)."""
    if settings.processor_webhook_secret is not None:
        return settings.processor_webhook_secret
    path = settings.data_dir.resolve() / WEBHOOK_SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secret)
    return SecretStr(path.read_text().strip())


def webhook_url(settings: Settings) -> str:
    """Where the stack's processor sandbox delivers its events: the stack's receiver."""
    return f"{http_url(settings.webhooks_port)}/stripe/webhook"


def webhooks_env(settings: Settings) -> dict[str, str]:
    """The receiver's environment: the worker's (Temporal, store) and the webhook secret."""
    env = worker_env(settings)
    env["REFUND_PROCESSOR_WEBHOOK_SECRET"] = webhook_secret(settings).get_secret_value()
    env["REFUND_WEBHOOKS_HOST"] = HOST
    env["REFUND_WEBHOOKS_PORT"] = str(settings.webhooks_port)
    return env


def webhooks_argv(data_dir: Path) -> list[str]:
    """How the stack runs the webhook receiver, tagged with its data dir like the worker."""
    return [
        sys.executable,
        "-c",
        "import console.webhooks as w, refundsaga.temporal as t; t.run_and_exit(w.main)",
        f"{_WEBHOOKS_TAG}{data_dir}",
    ]


def sandbox_argv(name: str, port: int, data_dir: Path) -> list[str]:
    """How the stack runs the `processor` or `ams` sandbox, its state in the data dir."""
    return [
        sys.executable,
        "-m",
        f"sandboxes.{name}",
        "--host",
        HOST,
        "--port",
        str(port),
        "--state",
        str(data_dir / f"{name}.json"),
    ]


def worker_argv(data_dir: Path) -> list[str]:
    """How the stack runs its worker: `worker.main` under the exit codes of `run_and_exit`."""
    return [
        sys.executable,
        "-c",
        "import worker, refundsaga.temporal as t; t.run_and_exit(worker.main)",
        f"{_WORKER_TAG}{data_dir}",
    ]


# -- where things live -----------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Where a stack keeps its files: the data dir, its logs and pid files."""

    data_dir: Path

    @classmethod
    def of(cls, settings: Settings) -> Paths:
        return cls(settings.data_dir.resolve())

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.data_dir / "pids"

    @property
    def temporal_db(self) -> Path:
        return self.data_dir / "temporal.db"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid(self, name: str) -> Path:
        return self.pids / f"{name}.pid"

    def markers(self, name: str) -> tuple[str, ...]:
        """Arguments that the command line of this stack's `name` process contains."""
        return {
            "temporal": ("start-dev", str(self.temporal_db)),
            "processor": ("sandboxes.processor", str(self.data_dir / "processor.json")),
            "ams": ("sandboxes.ams", str(self.data_dir / "ams.json")),
            "worker": (f"{_WORKER_TAG}{self.data_dir}",),
            "webhooks": (f"{_WEBHOOKS_TAG}{self.data_dir}",),
        }[name]


def temporal_address(settings: Settings) -> str:
    return f"{HOST}:{settings.temporal_port}"


def http_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def ports_of(settings: Settings, name: str) -> list[tuple[str, int, str]]:
    """(component, port, env var that moves it) for each port the process listens on."""
    return [
        (component, getattr(settings, attr), f"REFUND_{attr.upper()}")
        for component, attr in _PORTS[name]
    ]

"""Runtime settings: one pydantic-settings model, read from `REFUND_*` environment variables."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from refundsaga.processor import STRIPE_API_VERSION

# Sandbox keys: the embedded stack's processor and AMS sandboxes accept these. They are
# development values for local sandboxes only, never a real processor's or AMS's key.
SANDBOX_PROCESSOR_KEY = "sk_test_sandbox"
SANDBOX_AMS_KEY = "ams_test_sandbox"


_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(value: object) -> object:
    """Durations as people write them: `3600` (seconds), `45s`, `30m`, `72h`, `3d`; anything
    else (ISO 8601 such as `P3D`, a timedelta) goes to pydantic as it is."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return timedelta(seconds=int(text))
        if len(text) > 1 and text[:-1].isdigit() and text[-1] in _UNITS:
            return timedelta(**{_UNITS[text[-1]]: int(text[:-1])})
    return value


class Settings(BaseSettings):
    """Everything the worker, the CLI and the embedded stack need, from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="REFUND_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(default=Path(".data"), description="State, logs and pid files")

    # Temporal
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "refund-saga"
    temporal_ui_url: str = "http://127.0.0.1:8233"
    # A Temporal envconfig profile name (temporal.toml); None: TEMPORAL_PROFILE or "default".
    temporal_profile: str | None = None

    # OASIS store; None means the SQLite file `<data_dir>/oasis.db`.
    database_url: str | None = None
    database_pool_size: int = 5

    # Processor (Stripe-compatible refunds API)
    processor_url: str = "http://127.0.0.1:8301"
    processor_api_key: SecretStr = SecretStr(SANDBOX_PROCESSOR_KEY)
    processor_timeout_s: float = 10.0
    # Calls to the processor per second, for every saga and batch on the task queue together:
    # the activities that call it run on `<task_queue>-processor`, which the Temporal server
    # dispatches at this rate (a token bucket: bursts of up to one second's worth). 0: no limit.
    # Stripe allows 25 operations a second in test mode and 100 in live mode (per account):
    # the default stays under the test-mode limit with room for OASIS itself; live deployments
    # may raise it to about 50. A 429 is still retried after the processor's Retry-After.
    processor_calls_per_s: float = Field(default=20.0, ge=0)
    # Stripe-Version sent with every request; pinned so response shapes stay what we parse.
    processor_api_version: str = Field(
        default=STRIPE_API_VERSION, pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(\.[a-z]+)?$"
    )

    # Processor webhooks (`refund webhooks serve`): the endpoint's signing secret from the
    # processor's dashboard (Stripe: `whsec_...`); without it the receiver refuses to start.
    processor_webhook_secret: SecretStr | None = None
    # How old a signed delivery may be, as Stripe's libraries default to: an older one, however
    # well signed, is a replay and is refused.
    processor_webhook_tolerance_s: int = Field(default=300, ge=1, le=3600)
    webhooks_host: str = "127.0.0.1"
    webhooks_port: int = 8305
    # The reconciliation sweep (schedule `refund-reconciliation-sweep`): how often it lists what
    # the processor created since its last run, how far back it reads again for objects the
    # processor shows late, and the page size of its lists (Stripe's `limit`, 1 to 100).
    sweep_every: timedelta = Field(default=timedelta(minutes=10), gt=timedelta(0))
    sweep_overlap: timedelta = Field(default=timedelta(minutes=5), ge=timedelta(0))
    sweep_page_size: int = Field(default=100, ge=1, le=100)

    # AMS entitlement API
    ams_url: str = "http://127.0.0.1:8302"
    ams_api_key: SecretStr = SecretStr(SANDBOX_AMS_KEY)
    ams_timeout_s: float = 10.0

    # Approval policy
    approvers: Annotated[list[str], NoDecode] = Field(default=["alice", "bob", "carol"])
    # Who may resolve a saga in NEEDS_ATTENTION and confirm a manual AMS removal.
    operators: Annotated[list[str], NoDecode] = Field(default=["olivia", "oscar"])
    dual_approval_cents: int = Field(default=50_000, ge=0)
    auto_approve_below_cents: int = Field(default=0, ge=0)
    approval_timeout: timedelta = timedelta(hours=72)
    approval_reminder_every: timedelta = timedelta(hours=24)
    ams_reminder_every: timedelta = timedelta(hours=24)
    ams_escalate_after: timedelta = timedelta(hours=72)

    # Embedded stack ports
    temporal_port: int = 7233
    ui_port: int = 8233
    processor_port: int = 8301
    ams_port: int = 8302

    # Notifications: the log always; a webhook (JSON POST, HMAC-signed) when a URL is set.
    notify_webhook_url: str | None = None
    notify_webhook_secret: SecretStr | None = None

    # Attributable decisions: person -> Ed25519 public key (base64 of the 32 raw bytes), for
    # requesters, approvers and operators alike. When set, signing is on: every start and every
    # human decision must be signed by its person's key; the CLI signs with `signing_key_file`.
    approver_public_keys: dict[str, str] = Field(default_factory=dict)
    signing_key_file: Path | None = None

    # Payload encryption (optional): "key-id:base64-32-byte-key,..."; the first key encrypts,
    # all decrypt (so keys can rotate).
    payload_keys: SecretStr | None = None
    codec_server_port: int = 8309
    # The codec server decrypts for whoever calls it: callers present this as
    # `Authorization: Bearer <token>`. No default; without one the server runs only with
    # --insecure-local on a loopback address.
    codec_token: SecretStr | None = None
    # Host headers the codec server answers (`host` or `host:port`); empty: its bind host,
    # localhost, 127.0.0.1 and [::1] at its port. Anything else is a DNS rebinding attempt.
    codec_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The one browser origin allowed to call it: the Temporal UI's; None: REFUND_TEMPORAL_UI_URL.
    codec_cors_origin: str | None = None

    # Batch refunds and restore of a mistaken revoke
    batch_window: int = Field(default=20, ge=1)
    batch_rate_per_s: float = Field(default=5.0, gt=0)
    restore_retention: timedelta = timedelta(days=30)

    # Worker
    metrics_address: str | None = Field(default=None, description="host:port for Prometheus")
    max_concurrent_activities: int = 50
    max_concurrent_workflow_tasks: int = 50
    # The SDK's default is 1,000; at ~0.26 MiB a cached saga that is most of a worker's memory
    # when thousands wait for approval (docs/decisions/0007).
    max_cached_workflows: int = Field(default=500, ge=0)
    # The SDK's workflow sandbox re-imports the workflow module for every workflow run and
    # runs each activation through its import guard: ~40 % of the saga worker's CPU
    # (docs/decisions/0005). The worker runs without it; the tests run every saga with it, and CI
    # replays every recorded history under both runners (tests/test_replay.py), so a
    # non-deterministic call fails there, not in production. True: the sandbox here too.
    workflow_sandbox: bool = False
    # How many polls each worker keeps open per task queue and kind: a fixed maximum (the
    # SDK's default, 5), or "auto" to let the Temporal server scale them (1 to 100) from its
    # backlog. On the embedded dev server "auto" matched more tasks to a waiting poll but cost
    # the server more polls, and was no faster (docs/decisions/0007); a cluster with many workers
    # may differ.
    worker_pollers: Annotated[Annotated[int, Field(ge=1)] | Literal["auto"], NoDecode] = 5
    log_format: Literal["auto", "json", "text"] = "auto"

    @field_validator(
        "approval_timeout",
        "approval_reminder_every",
        "ams_reminder_every",
        "ams_escalate_after",
        "restore_retention",
        "sweep_every",
        "sweep_overlap",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value)

    @field_validator("worker_pollers", mode="before")
    @classmethod
    def _pollers(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("approvers", "operators", "codec_allowed_hosts", mode="before")
    @classmethod
    def _split_approvers(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("codec_cors_origin")
    @classmethod
    def _one_origin(cls, value: str | None) -> str | None:
        # A wildcard or a path would let other pages, or none, pass the CORS check.
        if value is None:
            return None
        origin = value.strip().rstrip("/")
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise ValueError("must be one origin, scheme://host[:port], e.g. http://127.0.0.1:8233")
        return origin

    @property
    def codec_ui_origin(self) -> str:
        """The Temporal UI origin the codec server lets call it."""
        if self.codec_cors_origin:
            return self.codec_cors_origin
        parts = urlsplit(self.temporal_ui_url)
        return f"{parts.scheme}://{parts.netloc}"

    @model_validator(mode="after")
    def _no_sandbox_keys_outside_the_laptop(self) -> Settings:
        # The sandbox keys are for the local sandboxes only: a real processor or AMS needs its
        # own key, and a forgotten setting must fail at start, not at the first refund.
        for name, url, key, default in (
            ("PROCESSOR", self.processor_url, self.processor_api_key, SANDBOX_PROCESSOR_KEY),
            ("AMS", self.ams_url, self.ams_api_key, SANDBOX_AMS_KEY),
        ):
            if not is_loopback_url(url) and key.get_secret_value() == default:
                raise ValueError(
                    f"REFUND_{name}_API_KEY must be set for {url}: the built-in key is only "
                    "for the local sandbox"
                )
        return self

    @cached_property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL of the OASIS store."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'oasis.db').resolve()}"


def is_loopback_url(url: str) -> bool:
    """Whether the URL's host is this machine: `localhost` or a loopback address. A prefix
    test would take `127.0.0.1.evil.example`, a name anyone can point anywhere."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def get_settings() -> Settings:
    """Read the settings from the environment (and `.env`), once per call."""
    return Settings()

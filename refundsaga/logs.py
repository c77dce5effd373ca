"""Logging set-up: JSON lines when not on a terminal, text on one; Temporal context, redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from temporalio import activity, workflow
from temporalio.runtime import LogForwardingConfig, LoggingConfig, TelemetryFilter

__all__ = [
    "CORE_LOGGER",
    "JsonFormatter",
    "RedactingFilter",
    "RedactingFormatter",
    "TemporalContextFilter",
    "configure_logging",
    "core_logging",
    "redact",
]

# Attributes every LogRecord has; anything else was passed with `extra=` and is kept.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

# The redaction safety net. Code should not log personal data or secrets in the first place;
# these catch the mistakes (an email in a free-text reason, an Authorization header in an
# error message) before they reach a log shipper.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_AUTH = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
# Stripe-style secret and restricted keys, and webhook signing secrets.
_KEY = re.compile(r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9_]*|\bwhsec_[A-Za-z0-9_]+")
# user:password@ in URLs (database URLs in error messages).
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@")
# Extra fields whose value is a secret by its name alone.
_SECRET_NAME = re.compile(r"(?i)secret|passw|token|api_?key|authorization|signature|cookie")

MASK = "[redacted]"
EMAIL_MASK = "[email]"


def redact(text: str) -> str:
    """`text` with email addresses, bearer/basic credentials and API keys masked."""
    text = _AUTH.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _KEY.sub(MASK, text)
    text = _URL_CREDENTIALS.sub(f"{MASK}@", text)
    return _EMAIL.sub(EMAIL_MASK, text)


def _clean(key: str, value: Any) -> Any:
    """A JSON-ready, redacted copy of an extra field's value."""
    if _SECRET_NAME.search(key):
        return MASK
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(key, v) for v in value]
    return redact(str(value))


class TemporalContextFilter(logging.Filter):
    """Flat `workflow_id`, `run_id`, `activity` (the step) and `attempt` on every record.

    temporalio's `activity.logger` and `workflow.logger` put their context in a nested
    `temporal_activity` / `temporal_workflow` extra; records from any other logger called
    inside an activity (the clients, the notifier) get the same fields from
    `activity.info()`. Fields the caller passed with `extra=` win.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields = vars(record)
        details = fields.pop("temporal_activity", None)
        if isinstance(details, Mapping):
            self._activity(record, details)
        elif activity.in_activity():
            info = activity.info()
            self._activity(
                record,
                {
                    "workflow_id": info.workflow_id,
                    "workflow_run_id": info.workflow_run_id,
                    "activity_type": info.activity_type,
                    "activity_id": info.activity_id,
                    "attempt": info.attempt,
                },
            )
        wf = fields.pop("temporal_workflow", None)
        if isinstance(wf, Mapping):
            _put(record, "workflow_id", wf.get("workflow_id"))
            _put(record, "run_id", wf.get("run_id"))
            _put(record, "workflow_type", wf.get("workflow_type"))
            _put(record, "update", wf.get("update_name"))
        return True

    @staticmethod
    def _activity(record: logging.LogRecord, details: Mapping[str, Any]) -> None:
        _put(record, "workflow_id", details.get("workflow_id"))
        _put(record, "run_id", details.get("workflow_run_id"))
        _put(record, "activity", details.get("activity_type"))
        _put(record, "activity_id", details.get("activity_id"))
        _put(record, "attempt", details.get("attempt"))


def _put(record: logging.LogRecord, key: str, value: object) -> None:
    if value is not None and key not in vars(record):
        setattr(record, key, value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the `extra` fields kept and everything redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = _clean(key, value)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, default=str)


class RedactingFormatter(logging.Formatter):
    """The plain text format, with the same redaction as the JSON lines."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactingFilter(logging.Filter):
    """Masks a record's message in place, so every handler it reaches (also one without the
    redacting formatters, such as logging's last resort) gets the masked text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        # The SDK core's raw entry (its message and fields, unmasked) rides along as an extra.
        vars(record).pop("temporal_log", None)
        return True


# The Temporal SDK core (Rust) writes its own log lines straight to stderr unless forwarded;
# they quote workflow task failures, and so whatever a rejected input carried.
CORE_LOGGER = logging.getLogger("temporalio.sdk_core")
CORE_LOGGER.addFilter(RedactingFilter())


def core_logging(
    log_filter: TelemetryFilter | str = TelemetryFilter(core_level="WARN", other_level="ERROR"),
) -> LoggingConfig:
    """A runtime's logging config that sends the SDK core's lines to `CORE_LOGGER`, masked.

    Args:
        log_filter: Core levels to forward; the default is the SDK's (core WARN, other ERROR).
    """
    return LoggingConfig(
        filter=log_filter,
        forwarding=LogForwardingConfig(logger=CORE_LOGGER, append_target_to_name=False),
    )


def configure_logging(fmt: str = "auto", level: int = logging.INFO) -> None:
    """Log to stderr, as JSON unless `fmt` is `text` or stderr is a terminal under `auto`."""
    handler = logging.StreamHandler(sys.stderr)
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(
        JsonFormatter()
        if as_json
        else RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(TemporalContextFilter())
    if as_json:
        # The context is in fields already; the SDK's copy appended to each message is noise.
        activity.logger.activity_info_on_message = False
        workflow.logger.workflow_info_on_message = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; keep that out of operational logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)

"""The worker's Temporal runtime: SDK core logs through Python logging (masked), and the SDK's
Prometheus metrics served at `REFUND_METRICS_ADDRESS`/metrics when set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from refundsaga.logs import core_logging

if TYPE_CHECKING:
    from refundsaga.settings import Settings

__all__ = ["MetricsConfigError", "metrics_runtime", "runtime_from_settings"]


class MetricsConfigError(ValueError):
    """`REFUND_METRICS_ADDRESS` is not a usable `host:port`, or the port is taken."""


def metrics_runtime(bind_address: str) -> Runtime:
    """A Temporal runtime whose metrics are served for Prometheus at `bind_address`, and whose
    core logs go through Python logging, masked (`refundsaga.logs.core_logging`).

    Create one per process, before the client: the client and every worker on it report
    through the runtime the client was connected with.

    Raises:
        MetricsConfigError: The address is malformed or cannot be bound.
    """
    host, sep, port = bind_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MetricsConfigError(
            f"REFUND_METRICS_ADDRESS must be host:port (e.g. 127.0.0.1:9464), not {bind_address!r}"
        )
    try:
        return Runtime(
            telemetry=TelemetryConfig(
                metrics=PrometheusConfig(bind_address=bind_address), logging=core_logging()
            )
        )
    except Exception as err:  # the SDK's core reports a bind failure as a plain exception
        raise MetricsConfigError(
            f"cannot serve metrics on {bind_address} ({err}); set REFUND_METRICS_ADDRESS to a "
            "free host:port"
        ) from err


def runtime_from_settings(settings: Settings) -> Runtime:
    """The worker's runtime: the metrics runtime when `REFUND_METRICS_ADDRESS` is set, else one
    for the core logs alone (the SDK's default runtime writes them to stderr unmasked)."""
    if not settings.metrics_address:
        return Runtime(telemetry=TelemetryConfig(logging=core_logging()))
    return metrics_runtime(settings.metrics_address)

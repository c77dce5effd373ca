"""How every part of RefundSaga reaches Temporal: one place, the pydantic data converter."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from refundsaga.settings import Settings


class TemporalUnavailable(RuntimeError):
    """Temporal could not be reached at the configured address."""


async def connect(settings: Settings) -> Client:
    """A client for the configured Temporal address and namespace.

    Raises:
        TemporalUnavailable: Nothing answers at the address (say what to do next).
    """
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=pydantic_data_converter,
        )
    except RuntimeError as err:
        raise TemporalUnavailable(
            f"cannot reach Temporal at {settings.temporal_address} "
            f"(namespace {settings.temporal_namespace}); start it with `refund stack up` "
            "or set REFUND_TEMPORAL_ADDRESS"
        ) from err

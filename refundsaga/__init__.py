"""RefundSaga: durable, auditable refunds for OASIS, orchestrated by Temporal."""

__version__ = "0.1.0"

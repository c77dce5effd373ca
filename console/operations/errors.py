"""The two ways a client operation fails; the CLI maps them to exit codes 2 and 1."""

from __future__ import annotations


class Refused(Exception):
    """The request was refused: bad input, or the saga is not in a state to take it (exit 2)."""


class OperationError(Exception):
    """Anything else that went wrong (exit 1)."""

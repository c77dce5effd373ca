"""Activity failures as a person reads them and as a workflow branches on them."""

from __future__ import annotations

from temporalio.exceptions import ActivityError, ApplicationError


def innermost(err: BaseException) -> BaseException:
    """The failure an activity failure wraps: what the activity raised."""
    cause: BaseException | None = err
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    assert cause is not None
    return cause


def error_text(err: BaseException) -> str:
    """The innermost message of an activity failure: what a person needs to read."""
    cause = innermost(err)
    if isinstance(cause, ApplicationError):
        return f"{cause.type or 'Error'}: {cause.message}"
    return str(cause)


def error_type(err: BaseException) -> str | None:
    """The ApplicationError type an activity failed with (the workflow branches on it)."""
    cause = err.cause if isinstance(err, ActivityError) else None
    return cause.type if isinstance(cause, ApplicationError) else None

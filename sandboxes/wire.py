"""The wire format every sandbox speaks: Stripe-style ids, JSON bodies and Stripe-shaped errors."""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

JsonDict = dict[str, Any]

_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    """An object id in Stripe's style: a type prefix and random letters and digits."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def error_body(
    *, type_: str, message: str, code: str | None = None, param: str | None = None
) -> JsonDict:
    """A Stripe-shaped error body: `{"error": {"type", "message", "code"?, "param"?}}`."""
    error: JsonDict = {"type": type_, "message": message}
    if code is not None:
        error["code"] = code
    if param is not None:
        error["param"] = param
    return {"error": error}


class ApiError(Exception):
    """Raised by sandbox handlers to answer with a Stripe-shaped error.

    Inside `Sandbox.run_idempotent` the error becomes the saved response, as Stripe saves
    4xx answers under their idempotency key too.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(type_=type_, message=message, code=code, param=param)

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        return JSONResponse(self.body, status_code=self.status)


async def read_json(request: Request) -> JsonDict:
    """The request body as a JSON object (an empty body is `{}`).

    Raises:
        ApiError: 400 when the body is not a JSON object.
    """
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}", code="parameter_invalid") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "The JSON body must be an object.", code="parameter_invalid")
    return data


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unrecognized request URL ({request.method}: {request.url.path})."
    else:
        message = f"{exc.detail} ({request.method}: {request.url.path})."
    return JSONResponse(
        error_body(type_="invalid_request_error", message=message),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()

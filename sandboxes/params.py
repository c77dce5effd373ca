"""Stripe's request conventions: form bodies, `expand`, integers, lists and their pages."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from sandboxes.wire import ApiError, JsonDict

INTEGER = re.compile(r"^[0-9]+$")
EXPAND_PARAM = re.compile(r"^expand(\[[0-9]*\])?$")
# `created[gt]=` and friends, as every Stripe list takes them.
_CREATED_BOUNDS = {
    "gt": lambda created, bound: created > bound,
    "gte": lambda created, bound: created >= bound,
    "lt": lambda created, bound: created < bound,
    "lte": lambda created, bound: created <= bound,
}


def array_param(params: Iterable[tuple[str, str]], name: str) -> list[str] | None:
    """The values of an array parameter sent as `name[]` or stripe-python's `name[0]`.

    None when the request does not name the array at all.
    """
    pattern = re.compile(rf"^{re.escape(name)}\[[0-9]*\]$")
    values = [value for key, value in params if pattern.match(key)]
    named = any(pattern.match(key) for key, _ in params)
    return values if named else None


def expand_paths(params: Iterable[tuple[str, str]], *, allowed: Sequence[str]) -> set[str]:
    """The `expand[]` (or stripe-python's `expand[0]`) paths of a request, all `allowed`.

    Raises:
        ApiError: 400 for a path this endpoint cannot expand, in Stripe's words.
    """
    paths = {value for name, value in params if EXPAND_PARAM.match(name)}
    for path in sorted(paths):
        if path not in allowed:
            message = f"This property cannot be expanded ({path})."
            if f"data.{path}" in allowed:
                message += f" You may want to try expanding 'data.{path}' instead."
            raise ApiError(400, message)
    return paths


async def form_params(request: Request) -> list[tuple[str, str]]:
    """A form-encoded body as `(name, value)` pairs, in order."""
    raw = await request.body()
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"Invalid form body: {exc}") from exc


def positive_int(value: str, param: str) -> int:
    """A form value that must be an integer of at least 1."""
    number = non_negative_int(value, param)
    if number <= 0:
        raise ApiError(
            400,
            "This value must be greater than or equal to 1.",
            code="parameter_invalid_integer",
            param=param,
        )
    return number


def non_negative_int(value: str, param: str) -> int:
    """A form or query value that must be a whole number."""
    if not INTEGER.match(value):
        raise ApiError(
            400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=param
        )
    return int(value)


def created_filter(query: Any) -> list[tuple[str, int]]:
    """The `created` bounds of a list request: `created=T` or `created[gt|gte|lt|lte]=T`."""
    bounds: list[tuple[str, int]] = []
    for name, value in query.multi_items():
        if name == "created":
            moment = non_negative_int(value, name)
            bounds += [("gte", moment), ("lte", moment)]
        elif name.startswith("created[") and name.endswith("]"):
            op = name[len("created[") : -1]
            if op not in _CREATED_BOUNDS:
                raise ApiError(400, f"Received unknown parameter: {name}", code="parameter_unknown")
            bounds.append((op, non_negative_int(value, name)))
    return bounds


def page(data: list[JsonDict], query: Any, *, url: str) -> JsonDict:
    """One page of a Stripe list from newest-first `data`.

    Honours `created` bounds, `limit` (1 to 100, default 10) and one cursor,
    `starting_after` (older than that object) or `ending_before` (newer than it).
    """
    limit_raw = query.get("limit", "10")
    if not INTEGER.match(limit_raw) or not 1 <= int(limit_raw) <= 100:
        raise ApiError(
            400,
            "Invalid limit: must be an integer between 1 and 100.",
            code="parameter_invalid_integer",
            param="limit",
        )
    limit = int(limit_raw)
    for op, bound in created_filter(query):
        data = [item for item in data if _CREATED_BOUNDS[op](item["created"], bound)]
    starting_after = query.get("starting_after")
    ending_before = query.get("ending_before")
    if starting_after and ending_before:
        raise ApiError(
            400,
            "You may only specify one of these parameters: ending_before, starting_after.",
            code="parameter_invalid",
        )
    if ending_before:
        end = _cursor_index(data, ending_before, "ending_before")
        start = max(0, end - limit)
        return _list(data[start:end], has_more=start > 0, url=url)
    start = _cursor_index(data, starting_after, "starting_after") + 1 if starting_after else 0
    return _list(data[start : start + limit], has_more=start + limit < len(data), url=url)


def _cursor_index(data: list[JsonDict], object_id: str, param: str) -> int:
    for index, item in enumerate(data):
        if item["id"] == object_id:
            return index
    raise ApiError(400, f"No such object: '{object_id}'", code="resource_missing", param=param)


def _list(data: list[JsonDict], *, has_more: bool, url: str) -> JsonDict:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}

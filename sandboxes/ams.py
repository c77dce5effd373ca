"""AMS sandbox: an association management system's entitlement API over HTTP.

Run it with `python -m sandboxes.ams --port 8302 --state .data/ams.json`. Members hold
entitlements to product codes; removing one is idempotent and reports "already absent"
as a distinct 404 `entitlement_not_found`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxes.cli import run_main
from sandboxes.common import Sandbox
from sandboxes.wire import ApiError, JsonDict, read_json

DEFAULT_PORT = 8302


def _initial_state() -> JsonDict:
    return {"members": {}, "idempotency": {}}


class AmsSandbox:
    """The AMS's domain logic on top of the shared `Sandbox` machinery."""

    def __init__(self, *, api_key: str, state_path: Path | None) -> None:
        self.core = Sandbox(
            name="ams", api_key=api_key, state_path=state_path, initial_state=_initial_state
        )

    @property
    def members(self) -> dict[str, JsonDict]:
        """Members by id (internal records)."""
        members: dict[str, JsonDict] = self.core.state["members"]
        return members

    def app(self) -> Starlette:
        """The ASGI app."""
        return self.core.build_app(
            [
                Route(
                    "/v1/members/{member_id}/entitlements",
                    self.list_entitlements,
                    methods=["GET"],
                ),
                Route(
                    "/v1/members/{member_id}/entitlements/{product_code}",
                    self.remove_entitlement,
                    methods=["DELETE"],
                ),
                Route("/_sandbox/members", self.admin_upsert_member, methods=["POST"]),
                Route("/_sandbox/members/{member_id}", self.admin_get_member, methods=["GET"]),
                Route("/_sandbox/entitlements", self.admin_grant, methods=["POST"]),
            ]
        )

    # -- domain operations (caller holds the lock) -------------------------------------

    def _member(self, member_id: str) -> JsonDict:
        member = self.members.get(member_id)
        if member is None:
            raise ApiError(
                404, f"No such member: '{member_id}'", code="member_not_found", param="member_id"
            )
        return member

    def _grant(self, member_id: str, product_code: str) -> None:
        member = self.members.setdefault(
            member_id,
            {"member_id": member_id, "created_at": self.core.now_iso(), "entitlements": {}},
        )
        entitlement = member["entitlements"].get(product_code)
        if entitlement is None or entitlement["status"] != "active":
            member["entitlements"][product_code] = {
                "product_code": product_code,
                "status": "active",
                "granted_at": self.core.now_iso(),
                "removed_at": None,
            }

    def _member_view(self, member: JsonDict) -> JsonDict:
        return {
            "member_id": member["member_id"],
            "created_at": member["created_at"],
            "entitlements": [dict(e) for e in member["entitlements"].values()],
        }

    # -- /v1 endpoints -----------------------------------------------------------------

    async def list_entitlements(self, request: Request) -> Response:
        """`GET /v1/members/{id}/entitlements`: the member's active entitlements."""
        member_id = request.path_params["member_id"]
        async with self.core.lock:
            member = self._member(member_id)
            data = [
                {
                    "product_code": e["product_code"],
                    "status": e["status"],
                    "granted_at": e["granted_at"],
                }
                for e in member["entitlements"].values()
                if e["status"] == "active"
            ]
        return JSONResponse({"object": "list", "member_id": member_id, "data": data})

    async def remove_entitlement(self, request: Request) -> Response:
        """`DELETE /v1/members/{id}/entitlements/{code}`; 404 when already absent."""
        member_id = request.path_params["member_id"]
        product_code = request.path_params["product_code"]

        def handler() -> tuple[int, JsonDict]:
            member = self._member(member_id)
            entitlement = member["entitlements"].get(product_code)
            if entitlement is None or entitlement["status"] != "active":
                raise ApiError(
                    404,
                    f"Member {member_id} has no active entitlement to {product_code}.",
                    code="entitlement_not_found",
                    param="product_code",
                )
            entitlement["status"] = "removed"
            entitlement["removed_at"] = self.core.now_iso()
            return 200, {
                "member_id": member_id,
                "product_code": product_code,
                "removed": True,
                "removed_at": entitlement["removed_at"],
            }

        return await self.core.run_idempotent(request, [], handler)

    # -- admin endpoints ---------------------------------------------------------------

    async def admin_upsert_member(self, request: Request) -> Response:
        """`POST /_sandbox/members` `{"member_id", "entitlements": [codes]}`.

        Creates the member if needed and grants each listed code; entitlements not listed
        are left as they are.
        """
        data = await read_json(request)
        member_id = _string(data, "member_id")
        codes = data.get("entitlements", [])
        if not isinstance(codes, list) or not all(isinstance(c, str) and c for c in codes):
            raise ApiError(400, "entitlements must be a list of product codes")
        async with self.core.lock:
            self.members.setdefault(
                member_id,
                {"member_id": member_id, "created_at": self.core.now_iso(), "entitlements": {}},
            )
            for code in codes:
                self._grant(member_id, code)
            self.core.save()
            return JSONResponse(self._member_view(self.members[member_id]))

    async def admin_grant(self, request: Request) -> Response:
        """`POST /_sandbox/entitlements` `{"member_id", "product_code"}`: grant one."""
        data = await read_json(request)
        member_id = _string(data, "member_id")
        product_code = _string(data, "product_code")
        async with self.core.lock:
            self._grant(member_id, product_code)
            self.core.save()
            return JSONResponse(self._member_view(self.members[member_id]))

    async def admin_get_member(self, request: Request) -> Response:
        """`GET /_sandbox/members/{id}`: active and removed entitlements."""
        async with self.core.lock:
            member = self._member(request.path_params["member_id"])
            return JSONResponse(self._member_view(member))


def _string(data: JsonDict, name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name} must be a non-empty string", param=name)
    return value


def create_app(*, api_key: str, state_path: Path | None = None) -> Starlette:
    """Build the AMS sandbox app.

    Args:
        api_key: The bearer key `/v1/*` requests must carry.
        state_path: JSON file to load state from and save it to after each change;
            None keeps state in memory only.
    """
    return AmsSandbox(api_key=api_key, state_path=state_path).app()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: serve the AMS sandbox with uvicorn."""
    run_main(name="ams", create_app=create_app, default_port=DEFAULT_PORT, argv=argv)


if __name__ == "__main__":
    main()

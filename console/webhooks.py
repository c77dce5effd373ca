"""The processor's webhook receiver (`refund webhooks serve`): `POST /stripe/webhook`.

It verifies `Stripe-Signature` with the official `stripe` package, acts on the event through
`refundsaga.reconcile_dispatch` and answers: 200 once the event is acted on (or ignored), 400
for what no retry will fix (a bad signature, a stale timestamp, a body that is not an event),
500 when acting failed (Temporal or the store unreachable), so that the processor delivers
it again. Logs name the event's id, type and outcome, never its body.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.client import Client

from refundsaga.logs import configure_logging
from refundsaga.reconcile import MalformedEvent, parse_event
from refundsaga.reconcile_dispatch import ReconcileDispatcher
from refundsaga.settings import Settings, get_settings
from refundsaga.store import OasisStore
from refundsaga.store.inbox import ProcessorInbox
from refundsaga.temporal import TemporalUnavailable, connect

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/stripe/webhook"
SIGNATURE_HEADER = "stripe-signature"
# Stripe's events are a few kilobytes; a larger body is not one of them.
MAX_BODY_BYTES = 512 * 1024


class WebhooksRefused(RuntimeError):
    """The receiver cannot start as configured; the message says why in one line."""


def webhook_secret(settings: Settings) -> str:
    """The endpoint's signing secret.

    Raises:
        WebhooksRefused: It is not set.
    """
    secret = settings.processor_webhook_secret
    if secret is None or not secret.get_secret_value().strip():
        raise WebhooksRefused(
            "REFUND_PROCESSOR_WEBHOOK_SECRET is not set: the receiver cannot tell the "
            "processor's events from forged ones (use the endpoint's signing secret, whsec_...)"
        )
    return secret.get_secret_value()


def _refusal(err: stripe.SignatureVerificationError) -> str:
    """One line on why a signature was refused, without the header or the body it quotes."""
    message = err.user_message or ""
    if message.startswith("No Stripe-Signature header"):
        return "no Stripe-Signature header"
    if message.startswith("Timestamp outside the tolerance zone"):
        return "the signature's timestamp is outside the tolerance"
    if message.startswith("Unable to extract") or message.startswith("No signatures found with"):
        return "malformed Stripe-Signature header"
    return "the signature does not match the body"


async def _read_limited(request: Request) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _bad_request(reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=400)


def build_app(
    settings: Settings,
    client: Client,
    inbox: ProcessorInbox,
) -> Starlette:
    """The receiver: `POST /stripe/webhook` and `GET /healthz`.

    Args:
        settings: The signing secret, its tolerance and the sagas' task queue.
        client: A Temporal client with the project's data converter.
        inbox: The store's processor-event inbox.

    Raises:
        WebhooksRefused: No signing secret is set.
    """
    secret = webhook_secret(settings)
    tolerance = settings.processor_webhook_tolerance_s
    dispatcher = ReconcileDispatcher(client, inbox, settings)

    async def receive(request: Request) -> Response:
        body = await _read_limited(request)
        if body is None:
            return JSONResponse({"error": "body too large for an event"}, status_code=413)
        try:
            verified = stripe.Webhook.construct_event(
                body, request.headers.get(SIGNATURE_HEADER), secret, tolerance
            )
            event = parse_event(verified.to_dict())
        except stripe.SignatureVerificationError as err:
            reason = _refusal(err)
            log.warning("processor webhook refused: %s", reason)
            return _bad_request(reason)
        except MalformedEvent as err:
            log.warning("processor webhook refused: %s", err)
            return _bad_request(f"not a processor event: {err}")
        except (ValueError, TypeError, AttributeError, KeyError):
            # A signed body that is not UTF-8 JSON, or not an event object.
            log.warning("processor webhook refused: the body is not a JSON event")
            return _bad_request("the body is not a JSON event")
        try:
            outcome = await dispatcher.handle(event, source="webhook")
        except Exception as err:  # Temporal or the store: the processor delivers it again
            log.error(
                "processor event %s (%s) not acted on: %s",
                event.id,
                event.type,
                type(err).__name__,
                extra={"event_id": event.id, "event_type": event.type},
            )
            return JSONResponse({"error": "not acted on; deliver it again"}, status_code=500)
        log.info(
            "processor event %s (%s): %s",
            event.id,
            event.type,
            outcome,
            extra={"event_id": event.id, "event_type": event.type, "outcome": outcome},
        )
        return JSONResponse({"received": True})

    async def healthz(_: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, receive, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def main() -> None:
    """`refund webhooks serve` and the stack's receiver process: one line and exit 2 when it
    is misconfigured, 1 when Temporal cannot be reached."""
    settings = get_settings()
    configure_logging(settings.log_format)
    try:
        serve(settings)
    except WebhooksRefused as err:
        print(f"refund webhooks: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TemporalUnavailable as err:
        print(f"refund webhooks: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def serve(settings: Settings) -> None:
    """Run the receiver on `webhooks_host:webhooks_port` until stopped.

    Raises:
        WebhooksRefused: No signing secret is set (checked before anything connects).
        refundsaga.temporal.TemporalUnavailable: Temporal cannot be reached.
    """
    webhook_secret(settings)
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    import uvicorn

    client = await connect(settings)
    store = OasisStore.from_url(
        settings.resolved_database_url, pool_size=settings.database_pool_size
    )
    try:
        app = build_app(settings, client, ProcessorInbox(store.engine))
        config = uvicorn.Config(
            app,
            host=settings.webhooks_host,
            port=settings.webhooks_port,
            # The project's logging (refundsaga.logs) stays; the access log would add nothing
            # the receiver's own line does not say.
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        await uvicorn.Server(config).serve()
    finally:
        store.close()

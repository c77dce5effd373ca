"""Local HTTP stand-ins for the outside world: a Stripe-compatible processor and an AMS.

The sandboxes import nothing from the rest of the project (only the standard library,
Starlette, uvicorn, and httpx to send webhooks), so they behave like a third party the
project cannot reach into.
"""

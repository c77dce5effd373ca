"""How every part of RefundSaga reaches Temporal: one place, the pydantic data converter."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import temporalio.api.common.v1
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.contrib.pydantic import (
    PydanticJSONPlainPayloadConverter,
    PydanticPayloadConverter,
)
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
)
from temporalio.envconfig import ClientConfigProfile
from temporalio.exceptions import ApplicationError
from temporalio.runtime import Runtime

from refundsaga.codec import EncryptionCodec
from refundsaga.settings import Settings


class TemporalUnavailable(RuntimeError):
    """Temporal could not be reached at the configured address."""


INVALID_MESSAGE = "InvalidMessage"


def _where_invalid(err: ValidationError, type_hint: object) -> str:
    """Which fields of which model are wrong and why, without the values that were sent."""
    model = getattr(type_hint, "__name__", "message")
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or model}: {e['msg']}"
        for e in err.errors(include_url=False, include_input=False, include_context=False)[:5]
    )
    return f"invalid {model}: {problems}"


class _CheckedJsonConverter(PydanticJSONPlainPayloadConverter):
    """JSON that is not its model fails as a non-retryable error naming fields, not values.

    A workflow started by hand with an invalid input then ends FAILED at once instead of
    failing its first task forever, and nothing the sender typed (personal data, say) reaches
    the failure, the history or the logs.
    """

    def from_payload(
        self, payload: temporalio.api.common.v1.Payload, type_hint: type | None = None
    ) -> object:
        try:
            return super().from_payload(payload, type_hint)
        except ValidationError as err:
            raise ApplicationError(
                _where_invalid(err, type_hint), type=INVALID_MESSAGE, non_retryable=True
            ) from None


class RefundPayloadConverter(CompositePayloadConverter):
    """The pydantic payload converter with `_CheckedJsonConverter` for JSON."""

    def __init__(self) -> None:
        checked = _CheckedJsonConverter()
        super().__init__(
            *(
                checked if isinstance(c, PydanticJSONPlainPayloadConverter) else c
                for c in PydanticPayloadConverter().converters.values()
            )
        )


payload_data_converter = DataConverter(payload_converter_class=RefundPayloadConverter)
"""The converter every client and worker uses (without encryption)."""


def data_converter(settings: Settings) -> DataConverter:
    """The pydantic converter, encrypting payloads when REFUND_PAYLOAD_KEYS is set.

    Raises:
        ValueError: REFUND_PAYLOAD_KEYS is malformed (the message names the key id, never a key).
    """
    if settings.payload_keys is None:
        return payload_data_converter
    codec = EncryptionCodec.from_spec(settings.payload_keys.get_secret_value())
    return dataclasses.replace(
        payload_data_converter,
        payload_codec=codec,
        # Error messages and stack traces quote data too: encrypt them with the payloads.
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def connect_options(settings: Settings) -> dict[str, Any]:
    """Where and how to connect: a Temporal envconfig profile, then the REFUND_ settings.

    The profile (`temporal.toml`, selected with REFUND_TEMPORAL_PROFILE or TEMPORAL_PROFILE,
    plus TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_TLS_* variables)
    supplies TLS, mTLS and Temporal Cloud API keys without code changes. REFUND_TEMPORAL_ADDRESS
    and REFUND_TEMPORAL_NAMESPACE win when set explicitly; they are the defaults otherwise.

    Raises:
        TemporalUnavailable: The profile cannot be read.
    """
    try:
        profile = ClientConfigProfile.load(settings.temporal_profile)
    except Exception as err:  # a bad TOML file or TLS path: one line for a person
        raise TemporalUnavailable(f"cannot read the Temporal client profile: {err}") from err
    options: dict[str, Any] = dict(profile.to_client_connect_config())
    explicit = settings.model_fields_set
    if "temporal_address" in explicit or not options.get("target_host"):
        options["target_host"] = settings.temporal_address
    if "temporal_namespace" in explicit or not options.get("namespace"):
        options["namespace"] = settings.temporal_namespace
    return options


async def connect(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """A client for the configured Temporal address and namespace.

    `runtime` (the worker's, with metrics) defaults to the SDK's default runtime.

    Raises:
        TemporalUnavailable: Nothing answers at the address (say what to do next), or the
            payload keys or the client profile are unusable (every caller already reports
            this one in one line).
    """
    try:
        converter = data_converter(settings)
    except ValueError as err:
        raise TemporalUnavailable(f"cannot encrypt payloads: REFUND_PAYLOAD_KEYS: {err}") from err
    options = connect_options(settings)
    try:
        return await Client.connect(**options, data_converter=converter, runtime=runtime)
    except RuntimeError as err:
        raise TemporalUnavailable(
            f"cannot reach Temporal at {options['target_host']} "
            f"(namespace {options['namespace']}); start it with `refund stack up` "
            "or set REFUND_TEMPORAL_ADDRESS (or a Temporal client profile)"
        ) from err


def run_and_exit(entry: Callable[[], object]) -> NoReturn:
    """Run a command's entry point, then leave without interpreter teardown.

    A short-lived process that used a Temporal client can abort during finalization when the
    SDK's Rust threads outlive the interpreter (temporalio/sdk-python#300: "PyGILState_Release
    ... finalizing"), turning a successful command into exit -6. Flushing and `os._exit` keep
    the exit code the command chose.
    """
    code: int = 0
    try:
        result = entry()
        code = result if isinstance(result, int) else 0
    except SystemExit as exit_:
        raw = exit_.code
        code = raw if isinstance(raw, int) else (0 if raw is None else 1)
        if isinstance(raw, str):
            print(raw, file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)

"""The sandbox keys go only to this machine: a host that merely starts like a loopback
address is another machine."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from refundsaga.settings import Settings, is_loopback_url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1.evil.example",
        "http://127.0.0.1.evil.example:8301",
        "http://localhost.evil.example",
        "http://127.evil.example",
        "https://api.stripe.com",
        "http://10.0.0.5:8301",
        "http://[::ffff:10.0.0.5]:8301",
        "http://[::1",
    ],
)
def test_the_sandbox_key_is_refused_for_another_host(url: str) -> None:
    assert not is_loopback_url(url)
    with pytest.raises(ValidationError, match="REFUND_PROCESSOR_API_KEY must be set"):
        Settings(processor_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8301",
        "http://127.1.2.3:8301",
        "http://localhost:8301",
        "http://[::1]:8301",
        "http://LOCALHOST:8301",
    ],
)
def test_the_sandbox_key_goes_to_this_machine(url: str) -> None:
    assert is_loopback_url(url)
    assert Settings(processor_url=url).processor_url == url

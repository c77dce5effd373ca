"""The Temporal connection comes from configuration: envconfig profiles, TEMPORAL_* variables,
then REFUND_* settings, so TLS and Temporal Cloud API keys need no code change."""

from __future__ import annotations

from pathlib import Path

import pytest

from refundsaga.settings import Settings
from refundsaga.temporal import TemporalUnavailable, connect_options

CLOUD = """
[profile.cloud]
address = "refunds.a1b2c.tmprl.cloud:7233"
namespace = "refunds.a1b2c"
api_key = "cloud-api-key"
"""


@pytest.fixture(autouse=True)
def no_ambient_temporal_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TEMPORAL_API_KEY", "TEMPORAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "absent.toml"))


def test_defaults_are_the_embedded_dev_server() -> None:
    assert connect_options(Settings()) == {"target_host": "127.0.0.1:7233", "namespace": "default"}


def test_a_cloud_profile_supplies_address_namespace_api_key_and_tls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text(CLOUD)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(config))
    options = connect_options(Settings(temporal_profile="cloud"))
    assert options["target_host"] == "refunds.a1b2c.tmprl.cloud:7233"
    assert options["namespace"] == "refunds.a1b2c"
    assert options["api_key"] == "cloud-api-key"
    assert options["tls"] is True


def test_temporal_environment_variables_work_without_a_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", "temporal.internal:7233")
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "refunds")
    options = connect_options(Settings())
    assert (options["target_host"], options["namespace"]) == ("temporal.internal:7233", "refunds")


def test_explicit_refund_settings_win_over_the_profile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text(CLOUD)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(config))
    options = connect_options(Settings(temporal_profile="cloud", temporal_address="127.0.0.1:7999"))
    assert options["target_host"] == "127.0.0.1:7999"
    assert options["api_key"] == "cloud-api-key"


def test_an_unreadable_profile_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text("[profile.cloud\naddress = ")
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(config))
    with pytest.raises(TemporalUnavailable, match="Temporal client profile"):
        connect_options(Settings(temporal_profile="cloud"))

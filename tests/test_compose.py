"""The production packaging: docker-compose.yml, .env.example, the Dockerfile, .dockerignore.

Static checks of the files' structure and text, which need no Docker engine, and `compose config`
(the Compose file model, interpolation and `${VAR:?}` guards) when a Compose binary is installed:
the `docker compose` plugin or `docker-compose` (Debian: `apt-get install docker-compose`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from refundsaga.search_attributes import ALL
from refundsaga.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"

# Settings the worker cannot run in production without: each must be named in its environment.
REQUIRED_SETTINGS = (
    "temporal_address",
    "temporal_namespace",
    "task_queue",
    "database_url",
    "processor_url",
    "processor_api_key",
    "ams_url",
    "ams_api_key",
    "approvers",
)
ONE_SHOT = {"temporal-admin-tools", "temporal-search-attributes", "migrate"}
LONG_RUNNING = {"postgresql", "temporal", "temporal-ui", "worker", "webhooks"}
SANDBOXES = {"processor-sandbox", "ams-sandbox"}
CLI_TYPES = {"KEYWORD": "Keyword", "INT": "Int", "DOUBLE": "Double", "BOOL": "Bool"}
# `$$` is Compose's escape for a literal `$`; `${NAME...}` and `$NAME` are interpolated.
INTERPOLATION = re.compile(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
VERSION_TAG = re.compile(r"^v?\d+\.\d+")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def interpolated(text: str) -> list[tuple[str, str]]:
    """(variable, modifier) for every interpolation in `text`, e.g. ("X", ":?message")."""
    found = []
    for match in INTERPOLATION.finditer(text):
        if match.group(0) == "$$":
            continue
        if match.group(2):
            found.append((match.group(2), ""))
            continue
        body = match.group(1)
        name = VAR_NAME.match(body)
        assert name, f"malformed interpolation ${{{body}}}"
        found.append((name.group(0), body[name.end() :]))
    return found


def compose_variables() -> set[str]:
    return {name for name, _ in interpolated(COMPOSE_FILE.read_text())}


def env_example_names() -> set[str]:
    """Variables .env.example sets or documents (a commented-out `# NAME=value` counts)."""
    pattern = re.compile(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)=", re.MULTILINE)
    return set(pattern.findall(ENV_EXAMPLE.read_text()))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def with_defaults(text: str) -> str:
    """`text` with `${NAME:-default}` replaced by its default, as Compose would with NAME unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)


def image_tag(image: str) -> str | None:
    name = with_defaults(image).split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return command if isinstance(command, str) else "\n".join(map(str, command))


# --- services --------------------------------------------------------------------------------


def test_expected_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == ONE_SHOT | LONG_RUNNING | SANDBOXES


def test_every_image_is_pinned_or_built(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            if "image" in service:
                assert image_tag(service["image"]) not in (None, "latest"), name
            continue
        assert "image" in service, f"{name} has neither an image nor a build"
        tag = image_tag(service["image"])
        assert tag is not None and tag != "latest", f"{name}: {service['image']} is not pinned"
        assert VERSION_TAG.match(tag), f"{name}: tag {tag!r} is not a version"


def test_no_build_context_is_outside_the_repository(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            assert (ROOT / context).resolve() == ROOT, name


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in LONG_RUNNING | SANDBOXES:
        check = services[name].get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        assert check["test"] != ["NONE"], name


def test_restart_policies(services: dict[str, dict[str, Any]]) -> None:
    for name in LONG_RUNNING | SANDBOXES:
        assert services[name].get("restart") in ("always", "unless-stopped"), name
    for name in ONE_SHOT:
        # `always` would rerun a finished one-shot forever.
        assert str(services[name].get("restart", "no")).split(":")[0] in ("no", "on-failure"), name


def test_every_service_is_on_the_network(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    networks = set(compose.get("networks", {}))
    assert networks
    for name, service in services.items():
        assert set(service.get("networks", [])) & networks, name


def test_start_up_order(services: dict[str, dict[str, Any]]) -> None:
    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    for starts_sagas in ("worker", "webhooks"):
        assert conditions(starts_sagas) == {
            "migrate": "service_completed_successfully",
            "temporal": "service_healthy",
            "temporal-search-attributes": "service_completed_successfully",
        }
    assert conditions("migrate") == {"postgresql": "service_healthy"}
    assert conditions("temporal-admin-tools") == {"postgresql": "service_healthy"}
    assert conditions("temporal") == {"temporal-admin-tools": "service_completed_successfully"}
    assert conditions("temporal-search-attributes") == {"temporal": "service_healthy"}
    assert conditions("temporal-ui") == {"temporal": "service_healthy"}


def test_migrate_runs_the_store_migrations(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert migrate["image"] == services["worker"]["image"]
    # `refund db upgrade` waits for the database, then runs the Alembic migrations to head.
    assert migrate["command"] == ["refund", "db", "upgrade"]
    assert "REFUND_DATABASE_URL" in environment(migrate)


# --- the worker's environment and secrets ---------------------------------------------------


def test_worker_environment_names_every_required_setting(
    services: dict[str, dict[str, Any]],
) -> None:
    prefix = Settings.model_config["env_prefix"]
    env = environment(services["worker"])
    for field in REQUIRED_SETTINGS:
        assert field in Settings.model_fields, f"Settings has no field {field}"
        assert f"{prefix}{field.upper()}" in env, f"worker environment lacks {field}"
    assert env["REFUND_TEMPORAL_ADDRESS"] == "${REFUND_TEMPORAL_ADDRESS:-temporal:7233}"
    assert "postgresql+psycopg://" in ENV_EXAMPLE.read_text()


def test_worker_environment_names_only_real_settings(services: dict[str, dict[str, Any]]) -> None:
    prefix = Settings.model_config["env_prefix"]
    for name in environment(services["worker"]):
        assert name.startswith(prefix), name
        assert name.removeprefix(prefix).lower() in Settings.model_fields, name


def test_worker_defaults_match_the_settings_defaults(services: dict[str, dict[str, Any]]) -> None:
    """A `${REFUND_X:-default}` must not silently change a setting's default."""
    prefix = Settings.model_config["env_prefix"]
    # Inside compose Temporal and its UI are other containers, not the embedded stack's ports.
    differ_on_purpose = {"temporal_address", "temporal_ui_url"}
    checked = 0
    for name, value in environment(services["worker"]).items():
        field = name.removeprefix(prefix).lower()
        match = re.fullmatch(r"\$\{[A-Za-z0-9_]+:-([^}]*)\}", value)
        if match and field not in differ_on_purpose:
            # As the worker would read it: "false" is the default False.
            parsed = getattr(Settings.model_validate({field: match.group(1)}), field)
            assert parsed == Settings.model_fields[field].default, name
            checked += 1
    assert checked >= 5


def test_secrets_are_required_and_not_committed(services: dict[str, dict[str, Any]]) -> None:
    prefix = Settings.model_config["env_prefix"]
    secret_fields = [
        name for name, info in Settings.model_fields.items() if info.annotation is SecretStr
    ]
    assert {"processor_api_key", "ams_api_key"} <= set(secret_fields)
    env = environment(services["worker"])
    for field in [*secret_fields, "database_url"]:
        variable = f"{prefix}{field.upper()}"
        if variable in env:
            assert env[variable].startswith(f"${{{variable}:?"), f"{variable} must use :?"
    assert environment(services["postgresql"])["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    # No secret is written into the compose file itself.
    for name, service in services.items():
        for key, value in environment(service).items():
            if re.search(r"KEY|PASSWORD|PWD|SECRET|TOKEN|DATABASE_URL", key):
                assert value.startswith("${"), f"{name}: {key} is not taken from .env"


def test_env_example_holds_placeholders_only() -> None:
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        assert not re.match(r"(sk|rk)_live_", value), name
        if re.search(r"KEY|PASSWORD|SECRET|TOKEN", name):
            assert value == "change-me", f"{name} must be a placeholder"


def test_every_compose_variable_is_in_env_example() -> None:
    missing = compose_variables() - env_example_names()
    assert not missing, f".env.example does not mention {sorted(missing)}"


def test_env_is_ignored_by_git_and_docker() -> None:
    for ignore_file in (ROOT / ".gitignore", ROOT / ".dockerignore"):
        lines = {line.strip() for line in ignore_file.read_text().splitlines()}
        assert ".env" in lines, f"{ignore_file.name} must list .env"


def test_webhooks_service_runs_the_receiver_with_the_workers_temporal_and_store(
    services: dict[str, dict[str, Any]],
) -> None:
    prefix = Settings.model_config["env_prefix"]
    webhooks = services["webhooks"]
    env = environment(webhooks)
    worker = environment(services["worker"])
    assert webhooks["image"] == services["worker"]["image"]
    assert webhooks["command"] == ["refund", "webhooks", "serve"]
    for name in env:
        assert name.removeprefix(prefix).lower() in Settings.model_fields, name
    # It starts sagas on the worker's queue, in the worker's namespace and store.
    for shared in (
        "REFUND_TEMPORAL_ADDRESS",
        "REFUND_TEMPORAL_NAMESPACE",
        "REFUND_TASK_QUEUE",
        "REFUND_DATABASE_URL",
    ):
        assert env[shared] == worker[shared], shared
    assert env["REFUND_PROCESSOR_WEBHOOK_SECRET"].startswith("${REFUND_PROCESSOR_WEBHOOK_SECRET:?")
    port = env["REFUND_WEBHOOKS_PORT"]
    assert webhooks["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f":{port}/healthz" in command_text({"command": webhooks["healthcheck"]["test"]})


# --- Temporal setup and the sandbox profile --------------------------------------------------


def test_search_attribute_registration_names_every_attribute(
    services: dict[str, dict[str, Any]],
) -> None:
    registration = services["temporal-search-attributes"]
    text = command_text(registration)
    assert "temporal operator search-attribute create" in text
    for key in ALL:
        kind = CLI_TYPES[key.indexed_value_type.name.removeprefix("INDEXED_VALUE_TYPE_")]
        assert f"{key.name}:{kind}" in text, f"{key.name} ({kind}) is not registered"
    # Registered in the namespace the worker uses.
    namespace = environment(services["worker"])["REFUND_TEMPORAL_NAMESPACE"]
    assert environment(registration)["TEMPORAL_NAMESPACE"] == namespace
    assert environment(services["temporal-ui"])["TEMPORAL_DEFAULT_NAMESPACE"] == namespace


def test_temporal_schema_setup_covers_both_databases(services: dict[str, dict[str, Any]]) -> None:
    text = command_text(services["temporal-admin-tools"])
    for step in ("create", "setup-schema", "update-schema"):
        assert f" {step}" in text
    assert "temporal/versioned" in text and "visibility/versioned" in text


def test_sandboxes_only_in_the_sandbox_profile(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in SANDBOXES:
            assert service.get("profiles") == ["sandbox"], name
            assert service["image"] == services["worker"]["image"], name
        else:
            assert not service.get("profiles"), f"{name} must start without a profile"
    worker = environment(services["worker"])
    for name, module, key in (
        ("processor-sandbox", "sandboxes.processor", "REFUND_PROCESSOR_API_KEY"),
        ("ams-sandbox", "sandboxes.ams", "REFUND_AMS_API_KEY"),
    ):
        text = command_text(services[name])
        assert module in text and "0.0.0.0" in text, name
        # The sandbox accepts exactly the key the worker sends.
        assert environment(services[name])["SANDBOX_API_KEY"] == worker[key]


def test_published_ports_are_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} publicly"


def test_worker_can_finish_activities_before_it_is_killed(
    services: dict[str, dict[str, Any]],
) -> None:
    from worker import GRACEFUL_SHUTDOWN

    grace = services["worker"]["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)
    assert match and int(match.group(1)) > GRACEFUL_SHUTDOWN.total_seconds()


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_dockerfile_base_images_are_pinned() -> None:
    stages: set[str] = set()
    bases = []
    for keyword, rest in dockerfile_instructions():
        if keyword != "FROM":
            continue
        words = [w for w in rest.split() if not w.startswith("--")]
        if len(words) >= 3 and words[1].lower() == "as":
            stages.add(words[2].lower())
        if words[0].lower() not in stages:
            bases.append(words[0])
    assert bases
    for base in bases:
        tag = image_tag(base)
        assert tag and tag != "latest" and VERSION_TAG.match(tag), f"{base} is not pinned"
        assert "$" not in base, f"{base}: the base image must be pinned literally"


def test_dockerfile_runs_the_worker_as_non_root() -> None:
    instructions = dockerfile_instructions()
    final_stage = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    users = [rest for keyword, rest in instructions[final_stage:] if keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    cmd = [rest for keyword, rest in instructions if keyword in ("CMD", "ENTRYPOINT")]
    assert cmd and "worker.py" in cmd[-1]


def test_dockerfile_bakes_in_no_secrets_and_no_dev_extras() -> None:
    for keyword, rest in dockerfile_instructions():
        if keyword in ("COPY", "ADD"):
            sources = [w for w in rest.split() if not w.startswith("--")][:-1]
            assert not any(Path(s).name.startswith(".env") for s in sources), rest
            assert "." not in sources, "COPY . would send the whole context into the image"
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(KEY|PASSWORD|SECRET|TOKEN)\w*=", rest), rest
        if keyword == "RUN" and "pip install" in rest:
            assert "[dev]" not in rest and "-e " not in rest, rest


# --- `compose config`, when a Compose binary is installed ------------------------------------


def compose_binary() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    command = compose_binary()
    if command is None:
        pytest.skip(
            "no Compose binary: neither the `docker compose` plugin nor `docker-compose` "
            "(Debian: apt-get install docker-compose)"
        )
    return command


def run_config(
    compose_cmd: list[str], env_file: Path, variables: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    """`compose config -q` with exactly `variables` set (and no developer's `.env` read)."""
    referenced = compose_variables()
    env = {k: v for k, v in os.environ.items() if k not in referenced}
    env.update(variables)
    return subprocess.run(
        [
            *compose_cmd,
            "--env-file",
            str(env_file),
            "-f",
            str(COMPOSE_FILE),
            *extra,
            "config",
            "-q",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def dummy_variables() -> dict[str, str]:
    return {name: "dummy" for name in compose_variables()} | {"WORKER_REPLICAS": "3"}


@pytest.mark.parametrize("profile", [[], ["--profile", "sandbox"]], ids=["default", "sandbox"])
def test_compose_config_is_valid(
    compose_cmd: list[str], tmp_path: Path, profile: list[str]
) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run_config(compose_cmd, empty, dummy_variables(), *profile)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_a_secret(compose_cmd: list[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    variables = dummy_variables()
    del variables["REFUND_PROCESSOR_API_KEY"]
    result = run_config(compose_cmd, empty, variables)
    assert result.returncode != 0, "compose accepted a missing REFUND_PROCESSOR_API_KEY"
    assert "REFUND_PROCESSOR_API_KEY" in result.stdout + result.stderr


def test_env_example_is_a_complete_env_file(compose_cmd: list[str]) -> None:
    result = run_config(compose_cmd, ENV_EXAMPLE, {}, "--profile", "sandbox")
    assert result.returncode == 0, result.stderr

"""deploy/compose.yaml and deploy/ticketgate.service: validated by the tools that run them where
they are installed, and checked for what this project relies on everywhere.

On this project's machines (Debian 12) the docker CLI may be present without its compose plugin
or an engine; ``apt-cache policy docker.io docker-compose`` shows both as installable, neither as
installed. The compose file is then read as YAML and its structure checked; ``docker compose
config`` and the end-to-end stack (scripts/compose_smoke.py) run where an engine is.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import load_settings
from gateway.cli import cmd_check_config
from gateway.startup import EXIT_BROKER, EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CONFIG = DEPLOY / "ticketgate.compose.toml"
UNIT = DEPLOY / "ticketgate.service"
SECRETS = ("rabbitmq_password", "postgres_password", "amqp_url", "postgres_dsn", "api_key", "admin_token")


def compose_missing() -> str | None:
    """Why ``docker compose`` cannot run here, or ``None`` when it can."""
    if shutil.which("docker") is None:
        return "docker is not installed (Debian package docker.io)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "the docker CLI has no compose plugin (docker compose)"
    return None


def engine_missing() -> str | None:
    missing = compose_missing()
    if missing is None and subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers (docker info failed)"
    return missing


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir()
    values = {
        "amqp_url": "amqp://ticketgate:pw@rabbitmq:5672/",
        "postgres_dsn": "postgresql://ticketgate:pw@postgres:5432/ticketgate",
        "api_key": "a-long-enough-api-key-for-tests",
        "admin_token": "a-long-enough-admin-token-for-tests",
    }
    for name in SECRETS:
        (directory / name).write_text(values.get(name, "pw") + "\n")
    return directory


def compose_file() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def test_docker_compose_config_accepts_the_file(secret_dir: Path) -> None:
    missing = compose_missing()
    if missing is not None:
        pytest.skip(f"{missing}; the structure test below reads the file instead")
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin:/usr/local/bin",
                                             "TICKETGATE_SECRETS": str(secret_dir)},
    )
    assert done.returncode == 0, done.stderr


def test_the_compose_file_has_the_stack_ops_rely_on() -> None:
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {"rabbitmq", "postgres", "gateway"}

    rabbitmq, postgres, gateway = services["rabbitmq"], services["postgres"], services["gateway"]
    assert "management" in rabbitmq["image"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host's loopback"
    assert any(port.endswith(":15672") for port in rabbitmq["ports"]), "the management UI"
    for name in ("rabbitmq", "postgres"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert "HEALTHCHECK" in (ROOT / "Dockerfile").read_text(), "the gateway's health check is the image's"
    assert gateway["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert gateway["build"]["context"] == ".."
    assert gateway["read_only"] is True
    assert gateway["cap_drop"] == ["ALL"]
    assert gateway["security_opt"] == ["no-new-privileges:true"]

    # Data survives `docker compose down` (without --volumes).
    mounts = {name: service.get("volumes", []) for name, service in services.items()}
    assert "rabbitmq-data:/var/lib/rabbitmq" in mounts["rabbitmq"]
    assert "postgres-data:/var/lib/postgresql/data" in mounts["postgres"]
    assert "ticketgate-data:/var/lib/ticketgate" in mounts["gateway"]
    assert set(compose["volumes"]) == {"rabbitmq-data", "postgres-data", "ticketgate-data"}

    # Secrets come from files, never from the environment or the compose file.
    declared = compose["secrets"]
    assert set(declared) == set(SECRETS)
    assert all(set(entry) == {"file"} for entry in declared.values())
    for name, service in services.items():
        assert set(service.get("secrets", [])) <= set(declared), name
        for key in service.get("environment", {}):
            assert "PASS" not in key or key.endswith("_FILE"), f"{name}: {key} is a secret in the environment"
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "/run/secrets/rabbitmq_password" in " ".join(rabbitmq["entrypoint"])


def test_the_gateway_config_in_compose_passes_check_config_and_matches_the_ports(
    tmp_path: Path, secret_dir: Path
) -> None:
    text = COMPOSE_CONFIG.read_text(encoding="utf-8").replace("/run/secrets/", f"{secret_dir}/")
    config = tmp_path / "ticketgate.toml"
    config.write_text(text)
    out = io.StringIO()
    assert cmd_check_config(argparse.Namespace(config=str(config)), out=out) == 0
    assert "channels: api, email" in out.getvalue()

    settings = load_settings(config)
    assert settings.store.backend == "postgresql"
    assert all(queue.quorum for queue in settings.broker.queues), "desk queues are quorum queues"
    assert settings.control.quorum
    container_ports = {port.rsplit(":", 1)[1] for port in compose_file()["services"]["gateway"]["ports"]}
    smtp = settings.channels["email"]["smtp"]
    assert container_ports == {str(settings.server.port), str(smtp["port"])}
    assert settings.server.host == smtp["host"] == "0.0.0.0"  # published ports reach only 0.0.0.0


def test_the_compose_stack_takes_a_mail_and_publishes_its_event() -> None:
    """scripts/compose_smoke.py end to end: build, up --wait, SMTP in, event out, stop with 0."""
    missing = engine_missing()
    if missing is not None:
        pytest.skip(missing)
    done = subprocess.run(
        [sys.executable, "scripts/compose_smoke.py"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "message.received event on the compose broker" in done.stdout


def unit_lines() -> dict[str, list[str]]:
    """``Key=value`` lines of the unit, every value of a key (comments left out)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_systemd_unit_is_hardened_and_restarts_only_what_can_heal() -> None:
    unit = unit_lines()
    for key, value in {
        "DynamicUser": "yes", "ProtectSystem": "strict", "NoNewPrivileges": "yes", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "StateDirectory": "ticketgate",
        "ConfigurationDirectory": "ticketgate", "Restart": "on-failure", "KillMode": "mixed",
        "WorkingDirectory": "/var/lib/ticketgate", "CapabilityBoundingSet": "",
    }.items():
        assert unit.get(key) == [value], f"{key}={unit.get(key)}"
    # The exit codes that no restart can fix (gateway/startup.py).
    assert set(unit["RestartPreventExitStatus"][0].split()) == {str(EXIT_CONFIG), str(EXIT_BROKER)}
    # Long enough for the drain: shutdown_timeout + drain_timeout with their defaults.
    assert int(re.sub(r"s$", "", unit["TimeoutStopSec"][0])) >= 20


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's ticketgate: verify checks that it exists."""
    ticketgate = shutil.which("ticketgate", path=str(Path(sys.executable).parent))
    assert ticketgate is not None
    copy = tmp_path / "ticketgate.service"
    copy.write_text(UNIT.read_text(encoding="utf-8").replace("/opt/ticketgate/bin/ticketgate", ticketgate))
    return copy


def test_systemd_analyze_verifies_the_unit(unit_here: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    done = subprocess.run(["systemd-analyze", "verify", str(unit_here)], capture_output=True, text=True)
    # verify exits 0 on a misspelt key or a bad value and only prints a warning: none is allowed.
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit_here)], capture_output=True, text=True
    )
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert exposure is not None, security.stdout + security.stderr
    print(f"systemd-analyze security: exposure {exposure.group(1)} (0 best, 10 worst)")
    assert float(exposure.group(1)) <= 2.0

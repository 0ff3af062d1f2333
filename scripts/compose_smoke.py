"""Start deploy/compose.yaml (gateway image, RabbitMQ, PostgreSQL) and check one mail in, one event out.

Usage: .venv/bin/python scripts/compose_smoke.py [--no-build] [--keep]

Needs a Docker engine with the compose plugin (``docker compose``). The stack runs as a project of
its own (``tg-smoke-<random>``) on free loopback ports, with fresh random secrets in a temporary
directory, so it disturbs nothing; ``docker compose down --volumes`` removes it afterwards (unless
``--keep``). Checked, in order: the image builds; ``up --wait`` sees every health check pass; the
gateway serves /readyz; a mail sent over SMTP gets its 250 and arrives on RabbitMQ as a
message.received event; ``docker compose stop`` ends the gateway with exit code 0. Prints what it
measured and exits non-zero at the first check that fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docker_smoke import SmokeFailure, free_port, http_ok, send_and_receive, stopped_cleanly, wait_until

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose.yaml"
INBOX_ADDRESS = "support@acme.example"  # deploy/ticketgate.compose.toml


def write_secrets(directory: Path) -> dict[str, str]:
    """Fresh random secrets, readable by the gateway image's user (compose mounts them as they are)."""
    rabbitmq, postgres = secrets.token_hex(16), secrets.token_hex(16)
    values = {
        "rabbitmq_password": rabbitmq,
        "postgres_password": postgres,
        "amqp_url": f"amqp://ticketgate:{rabbitmq}@rabbitmq:5672/",
        "postgres_dsn": f"postgresql://ticketgate:{postgres}@postgres:5432/ticketgate",
        "api_key": secrets.token_urlsafe(24),
        "admin_token": secrets.token_urlsafe(24),
    }
    directory.chmod(0o755)
    for name, value in values.items():
        path = directory / name
        path.write_text(value + "\n", encoding="utf-8")
        path.chmod(0o644)  # a throwaway stack; a real one chowns them to uid 10001 with mode 0400
    return values


def compose(env: dict[str, str], *args: str, check: bool = True) -> str:
    done = subprocess.run(  # noqa: S603
        ["docker", "compose", "-f", str(COMPOSE), *args],  # noqa: S607
        capture_output=True, text=True, env=env,
    )
    if check and done.returncode != 0:
        raise SmokeFailure(f"docker compose {' '.join(args[:1])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="use the image as it is")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args(argv)
    if shutil.which("docker") is None:
        print("docker is not installed", file=sys.stderr)
        return 2
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:  # noqa: S607
        print("the docker compose plugin is not installed", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as secret_dir:
        values = write_secrets(Path(secret_dir))
        ports = {name: free_port() for name in ("HTTP", "SMTP", "AMQP", "RABBITMQ_UI")}
        project = f"tg-smoke-{secrets.token_hex(4)}"
        env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": project,
            "TICKETGATE_SECRETS": secret_dir,
            **{f"TICKETGATE_{name}_PORT": str(port) for name, port in ports.items()},
        }
        try:
            if not args.no_build:
                started = time.monotonic()
                compose(env, "build", "gateway")
                print(f"image built in {time.monotonic() - started:.0f} s")
            started = time.monotonic()
            compose(env, "up", "--detach", "--wait", "--wait-timeout", "180")
            print(f"stack healthy in {time.monotonic() - started:.0f} s (project {project})")
            return check_stack(env, ports, values["rabbitmq_password"])
        except SmokeFailure as failure:
            print(f"FAILED: {failure}", file=sys.stderr)
            print(compose(env, "logs", "--tail", "40", check=False), file=sys.stderr)
            return 1
        finally:
            if not args.keep:
                compose(env, "down", "--volumes", "--timeout", "30", check=False)


def check_stack(env: dict[str, str], ports: dict[str, int], rabbitmq_password: str) -> int:
    http = ports["HTTP"]
    took = wait_until("ready (/readyz)", 60, lambda: http_ok(f"http://127.0.0.1:{http}/readyz"))
    print(f"gateway ready {took:.1f} s later")
    amqp_url = f"amqp://ticketgate:{rabbitmq_password}@127.0.0.1:{ports['AMQP']}/"
    subject = f"compose smoke {secrets.token_hex(4)}"
    event, took = asyncio.run(
        send_and_receive("ticketgate", ports["SMTP"], subject, amqp_url=amqp_url, to=INBOX_ADDRESS)
    )
    if event.get("type") != "message.received":
        raise SmokeFailure(f"event type {event.get('type')!r}, expected message.received")
    print(f"mail -> 250 -> {event['type']} event on the compose broker in {took * 1000:.0f} ms")

    started = time.monotonic()
    compose(env, "stop", "--timeout", "30", "gateway")
    container = compose(env, "ps", "--all", "--quiet", "gateway")
    return stopped_cleanly(container, "docker compose stop gateway", started)


if __name__ == "__main__":
    sys.exit(main())

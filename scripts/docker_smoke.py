"""Build the container image and check it does its job: a mail in, an event out, a clean stop.

Usage: .venv/bin/python scripts/docker_smoke.py [--image ticketgate:smoke] [--no-build]

Needs a Docker engine and the RabbitMQ of config/ticketgate.dev.toml (127.0.0.1:5672). The
container runs on the host network with the dev config mounted read-only at /etc/ticketgate and
ports, exchange and queues overridden through TICKETGATE__ variables, so it disturbs nothing.
Checked, in order: the image builds; the container turns healthy (its HEALTHCHECK); it runs as
the unprivileged user with its two child processes; a mail sent over SMTP gets its 250 and arrives
as a message.received event on the broker; `docker stop` (SIGTERM) ends it with exit code 0.
Prints what it measured and exits non-zero at the first check that fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aio_pika

ROOT = Path(__file__).resolve().parents[1]
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
INBOX_ADDRESS = "support@demo.localhost"


class SmokeFailure(Exception):
    """A check that failed; the message says which and why."""


def docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True)  # noqa: S603, S607
    if check and done.returncode != 0:
        raise SmokeFailure(f"docker {' '.join(args[:2])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, seconds: float, probe: Callable[[], bool]) -> float:
    """Poll ``probe()`` until it returns true; the seconds it took. Raises after ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if probe():
            return time.monotonic() - started
        time.sleep(0.5)
    raise SmokeFailure(f"{what}: not within {seconds:.0f} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own http:// URL
            return bool(response.status == 200)
    except OSError:
        return False


async def send_and_receive(
    exchange_name: str,
    smtp_port: int,
    subject: str,
    *,
    amqp_url: str = AMQP_URL,
    to: str = INBOX_ADDRESS,
) -> tuple[dict[str, Any], float]:
    """Bind a private queue to the gateway's exchange, send one mail, return the event it became."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name, ensure=True)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(exchange, routing_key="#")
        mail = EmailMessage()
        mail["From"] = "Smoke Test <smoke@example.org>"
        mail["To"] = to
        mail["Subject"] = subject
        mail.set_content("Sent by a smoke test of the container image.\n")
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
            refused = smtp.send_message(mail)
        if refused:
            raise SmokeFailure(f"SMTP refused recipients: {refused}")
        async with queue.iterator(timeout=15) as messages:
            async for message in messages:
                async with message.process():
                    event = json.loads(message.body)
                    if subject in json.dumps(event, ensure_ascii=False):
                        return event, time.monotonic() - started
        raise SmokeFailure("no event carrying the mail's subject arrived")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="ticketgate:smoke")
    parser.add_argument("--no-build", action="store_true", help="use the image as it is")
    args = parser.parse_args(argv)
    if shutil.which("docker") is None:
        print("docker is not installed", file=sys.stderr)
        return 2

    if not args.no_build:
        started = time.monotonic()
        docker("build", "--tag", args.image, str(ROOT))
        print(f"image built in {time.monotonic() - started:.0f} s")
    size = int(docker("image", "inspect", "--format", "{{.Size}}", args.image))
    print(f"image size {size / 1e6:.0f} MB")

    name = f"tg-smoke-{secrets.token_hex(4)}"
    exchange = f"ticketgate.smoke.{secrets.token_hex(4)}"
    http_port, smtp_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as config_dir:
        shutil.copy(ROOT / "config" / "ticketgate.dev.toml", Path(config_dir) / "ticketgate.toml")
        Path(config_dir).chmod(0o755)
        (Path(config_dir) / "ticketgate.toml").chmod(0o644)
        overrides = {
            "TICKETGATE__SERVER__PORT": str(http_port),
            "TICKETGATE__SERVER__PUBLIC_URL": f'"http://127.0.0.1:{http_port}"',
            "TICKETGATE__CHANNELS__EMAIL__SMTP__PORT": str(smtp_port),
            "TICKETGATE__BROKER__EXCHANGE": exchange,
            "TICKETGATE__BROKER__QUEUES": "[]",
        }
        env_args = [arg for key, value in overrides.items() for arg in ("--env", f"{key}={value}")]
        docker(
            "run", "--detach", "--name", name, "--network", "host",
            "--volume", f"{config_dir}:/etc/ticketgate:ro", *env_args, args.image,
        )
        try:
            return check_container(name, exchange, http_port, smtp_port)
        except SmokeFailure as failure:
            print(f"FAILED: {failure}", file=sys.stderr)
            print(docker("logs", "--tail", "40", name, check=False), file=sys.stderr)
            return 1
        finally:
            docker("rm", "--force", "--volumes", name, check=False)


def check_container(name: str, exchange: str, http_port: int, smtp_port: int) -> int:
    took = wait_until("ready (/readyz)", 60, lambda: http_ok(f"http://127.0.0.1:{http_port}/readyz"))
    print(f"ready after {took:.1f} s")
    took = wait_until(
        "healthy (HEALTHCHECK)", 60,
        lambda: docker("inspect", "--format", "{{.State.Health.Status}}", name) == "healthy",
    )
    print(f"HEALTHCHECK healthy {took:.1f} s later")

    uid = docker("exec", name, "id", "-u")
    if uid != "10001":
        raise SmokeFailure(f"runs as uid {uid}, not the image's unprivileged user 10001")
    names = docker("exec", name, "python", "-c", (
        "import glob; print(' '.join(sorted(open(p).read().strip() for p in glob.glob('/proc/[0-9]*/comm'))))"
    )).split()
    missing = {"tg-relay", "tg-normalize"} - set(names)
    if missing:
        raise SmokeFailure(f"child processes missing: {sorted(missing)} (running: {names})")
    print(f"uid {uid}; processes: {' '.join(names)}")

    subject = f"docker smoke {secrets.token_hex(4)}"
    event, took = asyncio.run(send_and_receive(exchange, smtp_port, subject))
    if event.get("type") != "message.received":
        raise SmokeFailure(f"event type {event.get('type')!r}, expected message.received")
    print(f"mail -> 250 -> {event['type']} event on the broker in {took * 1000:.0f} ms")

    started = time.monotonic()
    docker("stop", "--time", "30", name)
    return stopped_cleanly(name, "docker stop", started)


def stopped_cleanly(container: str, what: str, started: float) -> int:
    """After a stop: 0 when the container exited 0 (its graceful drain), else SmokeFailure."""
    code = docker("inspect", "--format", "{{.State.ExitCode}}", container)
    if code != "0":
        raise SmokeFailure(f"{what}: exit code {code}, expected 0 (graceful drain)")
    print(f"{what}: exit code 0 after {time.monotonic() - started:.1f} s")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

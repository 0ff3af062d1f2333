"""Start-up and shutdown you can read: the real ``ticketgate run`` as a child process.

The summary names every listener and every inbox's endpoint; a port in use or a broker that refuses
the gateway is one line on stderr and a distinct exit code, never a traceback; SIGTERM ends with one
line saying what the drain published and what stays in the outbox.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.channels import Registry
from gateway.startup import EXIT_BROKER, EXIT_LISTEN
from tests.e2e.harness import free_port
from tests.gateway.test_config_files import CONFIG, EXAMPLE_ENV
from tests.support.rabbitmq import unique

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Ports:
    http: int
    smtp: int


@pytest.fixture
def ports() -> Ports:
    return Ports(http=free_port(), smtp=free_port())


def example_env(tmp_path: Path, ports: Ports, amqp_url: str) -> dict[str, str]:
    """The example config (every channel) on this machine: loopback, free ports, a tmp store, its
    own exchange and queues, and provider APIs pointed at a closed local port."""
    nowhere = "http://127.0.0.1:9"
    exchange = unique("startup")
    overrides = {
        "TICKETGATE__SERVER__HOST": "127.0.0.1",
        "TICKETGATE__SERVER__PORT": str(ports.http),
        "TICKETGATE__SERVER__PUBLIC_URL": "https://support-gateway.example.com",
        "TICKETGATE__SERVER__SHUTDOWN_TIMEOUT": "2",
        "TICKETGATE__SERVER__NORMALIZER_PROCESS": "false",
        "TICKETGATE__LOG__FORMAT": "json",
        "TICKETGATE__STORE__PATH": str(tmp_path / "ticketgate.db"),
        "TICKETGATE__STORE__BLOB_DIR": str(tmp_path / "blobs"),
        "TICKETGATE__BROKER__EXCHANGE": exchange,
        "TICKETGATE__BROKER__QUEUES": "[]",
        "TICKETGATE__BROKER__RECONNECT_INTERVAL": "0.2",
        "TICKETGATE__OUTBOX__DRAIN_TIMEOUT": "2",
        "TICKETGATE__CONTROL__QUEUE": unique("control"),
        "TICKETGATE__CHANNELS__EMAIL__SMTP__HOST": "127.0.0.1",
        "TICKETGATE__CHANNELS__EMAIL__SMTP__PORT": str(ports.smtp),
        "TICKETGATE__CHANNELS__EMAIL__IMAP__HELPDESK__HOST": "127.0.0.1",
        "TICKETGATE__CHANNELS__EMAIL__IMAP__HELPDESK__PORT": "9",
        "TICKETGATE__CHANNELS__WECHAT__ACCOUNTS__ACME__API_BASE": nowhere,
        "TICKETGATE__CHANNELS__WECOM__APPS__HELPDESK__API_BASE": nowhere,
        "TICKETGATE__CHANNELS__WECHAT_KF__APPS__KF__API_BASE": nowhere,
        "TICKETGATE__CHANNELS__TELEGRAM__API_BASE": nowhere,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE__")}
    return {**env, **EXAMPLE_ENV, "TICKETGATE_AMQP_URL": amqp_url, **overrides, "PYTHONUNBUFFERED": "1"}


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(CONFIG / "ticketgate.example.toml")],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def messages(log: Path) -> list[str]:
    """The ``msg`` of every JSON log line (other lines as they are)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            found.append(str(json.loads(line)["msg"]))
        except (ValueError, KeyError, TypeError):
            found.append(line)
    return found


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, starts: str, within: float = 30.0) -> list[str]:
    """Poll the child's log (another process) until a line starting with ``starts`` is there."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        lines = messages(log)
        if any(line.startswith(starts) for line in lines):
            return lines
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no line starting {starts!r}:\n" + "\n".join(messages(log)))


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def summary_of(lines: list[str]) -> list[str]:
    """The lines from "ticketgate is up" to the relay line that closes the summary."""
    first = lines.index("ticketgate is up")
    last = next(i for i in range(first, len(lines)) if lines[i].startswith("relay    "))
    return lines[first : last + 1]


def test_every_installed_channel_describes_its_endpoints() -> None:
    registry = Registry.installed()
    for name in ("api", "form", "email", "wechat", "wecom", "wechat_kf", "telegram", "slack"):
        connector = registry.get(name).connector
        assert callable(getattr(connector, "describe_endpoints", None)), name


def test_the_summary_names_listeners_every_inbox_endpoint_the_bus_and_the_store(
    tmp_path: Path, ports: Ports, amqp_url: str, running: list[subprocess.Popen[bytes]]
) -> None:
    env = example_env(tmp_path, ports, amqp_url)
    log = tmp_path / "gateway.log"
    proc = spawn(env, log)
    running.append(proc)
    summary = "\n".join(summary_of(wait_for_line(proc, log, "relay    ")))

    public = "https://support-gateway.example.com"
    for expected in (
        f"HTTP     http://127.0.0.1:{ports.http} (public URL {public})",
        f"SMTP     smtp://127.0.0.1:{ports.smtp}",
        "inbox    acme-support (tenant acme)",
        f"api       api     {public}/api/v1/messages",
        f"form      form    {public}/forms/acme-support",
        f"form      embed   {public}/forms/acme-support/embed.js",
        f"email     smtp    smtp://127.0.0.1:{ports.smtp} for support@acme.example, help@acme.example",
        "email     imap    imaps://127.0.0.1:9/INBOX as support@acme.example",
        f"wechat    webhook {public}/wechat/acme",
        f"wecom     webhook {public}/wecom/helpdesk",
        f"wechat_kf webhook {public}/wechat_kf/kf",
        f"telegram  webhook {public}/telegram/acme-support",
        f"exchange '{env['TICKETGATE__BROKER__EXCHANGE']}'",
        f"control  '{env['TICKETGATE__CONTROL__QUEUE']}'",
        f"store    sqlite {tmp_path / 'ticketgate.db'}",
        "broker   amqp://guest@127.0.0.1:5672/ connected",
        f"status   {public}/status",
    ):
        assert expected in summary, f"{expected!r} not in the summary:\n{summary}"
    for secret in EXAMPLE_ENV.values():
        if not secret.startswith("amqp://"):
            assert secret not in log.read_text(), "a secret reached the log"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert any(
        line.startswith("stopped: published 0 of 0 waiting events") for line in messages(log)
    ), "\n".join(messages(log)[-10:])


def test_a_port_in_use_is_one_line_and_exit_3(
    tmp_path: Path, ports: Ports, amqp_url: str, running: list[subprocess.Popen[bytes]]
) -> None:
    env = example_env(tmp_path, ports, amqp_url)
    listeners = ((ports.http, "HTTP", "server.host/server.port"), (ports.smtp, "SMTP", "channels.email.smtp"))
    for port, what, key in listeners:
        log = tmp_path / f"{what}.log"
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            proc = spawn(env, log)
            running.append(proc)
            assert proc.wait(60) == EXIT_LISTEN, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text
        last = text.strip().splitlines()[-1]
        assert last == (
            f"ticketgate: cannot listen for {what} on 127.0.0.1:{port} ({key}): address already in use"
        )


def test_a_broker_that_refuses_the_credentials_is_one_line_and_exit_4(
    tmp_path: Path, ports: Ports, amqp_url: str, running: list[subprocess.Popen[bytes]]
) -> None:
    env = example_env(tmp_path, ports, amqp_url)
    env["TICKETGATE_AMQP_URL"] = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    log = tmp_path / "gateway.log"
    proc = spawn(env, log)
    running.append(proc)
    assert proc.wait(60) == EXIT_BROKER, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text
    assert "not-the-password" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith(
        "ticketgate: the broker at amqp://guest@127.0.0.1:5672/ refused the gateway (access refused"
    )
    assert not (tmp_path / "ticketgate.db").exists(), "nothing may start before the broker check"


def test_an_unreachable_broker_is_absorbed_and_said_once_in_the_summary(
    tmp_path: Path, ports: Ports, amqp_url: str, running: list[subprocess.Popen[bytes]]
) -> None:
    """An outage is not a reason to refuse mail: the gateway starts, says so, keeps the event."""
    env = example_env(tmp_path, ports, amqp_url)
    closed = free_port()
    env["TICKETGATE_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{closed}/"
    log = tmp_path / "gateway.log"
    proc = spawn(env, log)
    running.append(proc)
    summary = summary_of(wait_for_line(proc, log, "relay    "))
    assert any(
        line.startswith(f"broker   amqp://guest@127.0.0.1:{closed}/ NOT REACHABLE (Connection refused)")
        for line in summary
    ), summary

    request = urllib.request.Request(
        f"http://127.0.0.1:{ports.http}/api/v1/messages",
        data=json.dumps({"customer": {"email": "ada@example.com"}, "text": "It broke."}).encode(),
        headers={"Authorization": f"Bearer {EXAMPLE_ENV['TICKETGATE_API_KEY_ACME']}",
                 "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 202

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    stopped = [line for line in messages(log) if line.startswith("stopped: ")]
    assert len(stopped) == 1
    assert stopped[0].startswith("stopped: published 0 of 1 waiting events")
    assert stopped[0].endswith("1 stay in the outbox for the next start")

"""Start-up you can read: where everything listens, and one clear line when the gateway cannot start.

At start the daemon prints one summary (HTTP and SMTP addresses, each inbox's endpoints per channel,
the exchange, the control queue, the store) and, when it cannot start, one line and a distinct exit
code instead of a traceback:

- ``EXIT_CONFIG`` (2): the settings are wrong (file, key, reason);
- ``EXIT_LISTEN`` (3): a listener cannot bind (the port is in use, or below 1024 without the right);
- ``EXIT_BROKER`` (4): the broker refused the gateway (credentials, virtual host): retrying cannot
  help. A broker that is merely unreachable is an outage the outbox absorbs (docs/operations.md), so
  the gateway starts, says so in the summary, and publishes once the broker is back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Sequence
from urllib.parse import quote

from core.settings import Settings
from gateway.amqp_wire import Endpoint, PublishConnection, WireError
from gateway.channels import EnabledChannel

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_LISTEN = 3
EXIT_BROKER = 4

# AMQP reply codes that retrying will not change: wrong credentials, a virtual host that does not
# exist or that the user may not open.
_REFUSALS = {403: "access refused", 530: "virtual host not allowed"}
_LISTEN_ERRORS = {errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL}


class StartupError(Exception):
    """The gateway cannot start; ``str()`` is the one line to print, ``code`` the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def listen_url(settings: Settings) -> str:
    """The HTTP server's URL from this machine (a wildcard host is reached on its loopback)."""
    host = settings.server.host
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    return f"http://{_host_port(host, settings.server.port)}"


def http_base_url(settings: Settings) -> str:
    """Where providers and browsers reach the HTTP server: ``server.public_url``, else the listen URL."""
    public = (settings.server.public_url or "").rstrip("/")
    return public or listen_url(settings)


def _smtp_listener(settings: Settings) -> tuple[str, int] | None:
    """The SMTP listener's host and port from the raw email table (the daemon does not import the
    channel; its defaults are the email channel's)."""
    smtp = settings.channels.get("email", {}).get("smtp")
    if not isinstance(smtp, dict):
        return None
    return str(smtp.get("host", "127.0.0.1")), int(smtp.get("port", 2525))


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def broker_address(settings: Settings) -> str:
    """The broker URL without its password."""
    endpoint = Endpoint.parse(settings.broker.url.get_secret_value())
    scheme = "amqps" if endpoint.tls else "amqp"
    vhost = "" if endpoint.vhost == "/" else quote(endpoint.vhost, safe="")
    return f"{scheme}://{quote(endpoint.user, safe='')}@{_host_port(endpoint.host, endpoint.port)}/{vhost}"


def store_address(settings: Settings) -> str:
    """The store, without a password: the SQLite file, or the PostgreSQL server and database."""
    store = settings.store
    if store.backend == "sqlite":
        return f"sqlite {store.path.resolve()} (blobs {store.blob_dir.resolve()})"
    from psycopg.conninfo import conninfo_to_dict

    assert store.dsn is not None  # the settings require it for postgresql
    info = conninfo_to_dict(store.dsn.get_secret_value())
    server = _host_port(str(info.get("host") or "localhost"), int(str(info.get("port") or 5432)))
    database = f"{info.get('user', '')}@{server}/{info.get('dbname', '')}"
    return f"postgresql {database} (blobs {store.blob_dir.resolve()})"


async def probe_broker(settings: Settings) -> str | None:
    """Open one AMQP connection as the relay will: ``None`` when it works, else why it did not.

    Raises :class:`StartupError` (``EXIT_BROKER``) when the broker refuses the credentials or the
    virtual host; every other failure (refused connection, timeout, lost name) is an outage.
    """
    broker = settings.broker
    try:
        async with asyncio.timeout(max(broker.publish_timeout, 1.0)):
            connection = await PublishConnection.open(
                broker.url.get_secret_value(), connection_name="ticketgate start-up check", heartbeat=0
            )
    except WireError as exc:
        if exc.reply_code in _REFUSALS:
            raise StartupError(
                f"the broker at {broker_address(settings)} refused the gateway"
                f" ({_REFUSALS[exc.reply_code]}: {exc.reason}); check broker.url",
                EXIT_BROKER,
            ) from None
        return exc.reason
    except TimeoutError:
        return f"no answer within {max(broker.publish_timeout, 1.0):.0f} s"
    except OSError as exc:
        return exc.strerror or str(exc)
    await connection.close()
    return None


def check_listeners(settings: Settings) -> None:
    """Bind each listener's address once, as the servers will (``SO_REUSEADDR``), and let it go.

    Before anything starts: aiohttp does not unwind a start-up that fails half-way (a store writer
    and child processes already running keep the process from exiting), so a port in use is best
    found here. A port taken in the instant between this check and the real bind still ends in
    :func:`listen_error`'s line.
    """
    for host, port, _what, _key in _listeners(settings):
        if port == 0:
            continue
        try:
            for family, kind, proto, _name, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(address)
        except OSError as exc:
            error = listen_error(settings, exc, port=port)
            if error is not None:
                raise error from None
            raise


def _listeners(settings: Settings) -> list[tuple[str, int, str, str]]:
    """(host, port, what, setting) of the HTTP server and the SMTP listener."""
    listeners = [(settings.server.host, settings.server.port, "HTTP", "server.host/server.port")]
    smtp = _smtp_listener(settings)
    if smtp is not None:
        listeners.append((*smtp, "SMTP", "channels.email.smtp"))
    return listeners


def listen_error(settings: Settings, exc: OSError, *, port: int | None = None) -> StartupError | None:
    """One line for a listener that cannot bind, naming the setting; ``None`` for other errors."""
    if exc.errno not in _LISTEN_ERRORS:
        return None
    text = str(exc)
    reason = os.strerror(exc.errno).lower() if exc.errno else text
    for host, listen_port, what, key in _listeners(settings):
        if listen_port == port or f", {listen_port})" in text:
            return StartupError(
                f"cannot listen for {what} on {_host_port(host, listen_port)} ({key}): {reason}", EXIT_LISTEN
            )
    return StartupError(f"cannot listen: {text}", EXIT_LISTEN)


def summary_lines(
    settings: Settings, channels: Sequence[EnabledChannel], broker_problem: str | None
) -> list[str]:
    """The start-up summary, one line each: listeners, every inbox's endpoints, the bus, the store."""
    # The listen address as configured (0.0.0.0 is every interface), then where providers reach it.
    listening = _host_port(settings.server.host, settings.server.port)
    lines = [f"HTTP     http://{listening} (public URL {http_base_url(settings)})"]
    smtp = _smtp_listener(settings)
    if smtp is not None and any(c.name == "email" for c in channels):
        lines.append(f"SMTP     smtp://{_host_port(*smtp)}")
    by_inbox: dict[str, list[str]] = {}
    undescribed = []
    for channel in channels:
        if channel.endpoints is None:
            undescribed.append(channel.name)
            continue
        for endpoint in channel.endpoints:
            by_inbox.setdefault(endpoint.inbox, []).append(
                f"  {channel.name:<9} {endpoint.kind:<7} {endpoint.address}"
            )
    for inbox_id in sorted(by_inbox):
        inbox = settings.inboxes.get(inbox_id)
        tenant = f" (tenant {inbox.tenant})" if inbox is not None else ""
        lines.append(f"inbox    {inbox_id}{tenant}")
        lines.extend(by_inbox[inbox_id])
    if undescribed:
        lines.append(f"channels without described endpoints: {', '.join(undescribed)}")
    if not channels:
        lines.append("no channel is configured: nothing can arrive")
    state = (
        "connected"
        if broker_problem is None
        else f"NOT REACHABLE ({broker_problem}): accepting into the outbox (bound"
        f" {settings.outbox.max_backlog}) and retrying every {settings.broker.reconnect_interval:g} s"
    )
    lines.append(f"broker   {broker_address(settings)} {state}")
    lines.append(f"exchange {settings.broker.exchange!r}, routing keys {{tenant}}.{{channel}}.{{type}}")
    for queue in settings.broker.queues:
        lines.append(f"queue    {queue.name!r} bound to {', '.join(queue.bindings)}")
    control = settings.control
    lines.append(f"control  {control.queue!r}" if control.enabled else "control  off")
    lines.append(f"store    {store_address(settings)}")
    if settings.admin.token is not None:
        lines.append(f"status   {http_base_url(settings)}/status")
    else:
        lines.append("status   off (no [admin] table: docs/operations.md, Status page)")
    lines.append(f"relay    {settings.outbox.relay}")
    return lines


def log_summary(settings: Settings, channels: Sequence[EnabledChannel], broker_problem: str | None) -> None:
    """Log the summary, one record per line, so both the text and the JSON log stay readable."""
    lines = summary_lines(settings, channels, broker_problem)
    logger.info("ticketgate is up")
    for line in lines:
        logger.info("%s", line)
    if broker_problem is not None:
        logger.warning("broker %s not reachable at start: %s", broker_address(settings), broker_problem)

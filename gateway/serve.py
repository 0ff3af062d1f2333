"""Serving the application: an HTTP listener with bounded connections, and a bounded shutdown.

aiohttp's ``run_app`` accepts every connection it is offered and waits on each as long as the client
likes; a few thousand clients that send half a request and wait use up the process's file
descriptors, and then new API requests hang and the SMTP listener cannot accept. Here:

* at most ``server.max_connections`` HTTP connections are open. At the limit a new connection closes
  the oldest *idle* one (waiting for a request, or for the rest of its headers); when every one is
  busy with a request, the new one is answered ``503`` and closed. ``/healthz`` therefore keeps
  answering while idle connections pile up, and a shed is logged (one line per 10 s at most);
* ``server.idle_timeout`` closes a connection that has not completed a request's headers that long
  after it opened or after its last response (aiohttp's keep-alive timer, which partial headers do
  not reset: slow headers and idle keep-alives alike);
* ``server.request_timeout`` bounds a request from its headers to its answer, so a body trickled in
  byte by byte ends with ``408``; a WebSocket upgrade is the exception (a chat lasts as long as the
  visitor stays), bounded by its channel instead;
* SIGTERM / SIGINT stop the listener, let requests finish (``server.shutdown_timeout``), run the
  cleanup (relay drain, store close), and the whole of it is bounded: past
  ``shutdown_timeout + outbox.drain_timeout + SHUTDOWN_MARGIN`` the process logs what it was waiting
  for and exits 1, whatever the broker or a disk does. Nothing acknowledged depends on the cleanup.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from core.ratelog import RateLimitedLog
from core.settings import Settings
from core.timeouts import SharedTimeout

logger = logging.getLogger(__name__)

# Time for the cleanup beyond the request grace and the relay drain (store close, child processes).
SHUTDOWN_MARGIN = 5.0
FD_HEADROOM = 1024

_BUSY_BODY = b'{"error": "overloaded", "reason": "too many connections, retry in a moment"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % len(_BUSY_BODY)
) + _BUSY_BODY


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class BoundedServer(web.Server):
    """aiohttp's low-level server with a connection limit and a bound on each request."""

    def __init__(
        self, handler: Handler, *, max_connections: int, request_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(self._bounded, **kwargs)
        self._inner = handler
        self._limit = max_connections
        self._request_timeout = request_timeout
        # One timer for every request's bound, not one per request (core.timeouts).
        self._request_bound = SharedTimeout(request_timeout)
        # Connections not inside a request, oldest first: the ones to close when full.
        self._idle: collections.OrderedDict[RequestHandler, None] = collections.OrderedDict()
        self._shed_log = RateLimitedLog(logger)
        self.shed_idle = 0
        self.refused = 0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._idle[handler] = None
        if len(self.connections) <= self._limit:
            return
        victim = next((h for h in self._idle if h is not handler), None)
        if victim is not None:
            self._idle.pop(victim)
            victim.force_close()
            self.shed_idle += 1
            self._shed_log(
                "HTTP at server.max_connections (%d): closed the oldest idle connection (%d so far)",
                self._limit,
                self.shed_idle,
            )
            return
        self._idle.pop(handler, None)
        transport.write(_BUSY)
        handler.force_close()
        self.refused += 1
        self._shed_log(
            "HTTP at server.max_connections (%d), every connection busy: refused with 503 (%d so far)",
            self._limit,
            self.refused,
        )

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._idle.pop(handler, None)
        super().connection_lost(handler, exc)

    async def _bounded(self, request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        self._idle.pop(protocol, None)
        if _websocket_upgrade(request):
            # A socket lives as long as its conversation: its handler bounds the handshake, pings
            # and idleness itself (the web chat's hello_timeout, heartbeat and idle_timeout).
            try:
                return await self._inner(request)
            finally:
                if protocol.transport is not None:
                    self._idle[protocol] = None
        try:
            with self._request_bound():
                return await self._inner(request)
        except TimeoutError:
            logger.info(
                "request %s %s not completed within server.request_timeout (%.0fs): 408",
                request.method,
                request.path,
                self._request_timeout,
            )
            response = web.json_response(
                {"error": "request_timeout", "reason": "the request was not completed in time"},
                status=408,
            )
            response.force_close()
            return response
        finally:
            if protocol.transport is not None:
                self._idle[protocol] = None  # back at the end: idle since now


def _websocket_upgrade(request: web.BaseRequest) -> bool:
    """A WebSocket handshake: a GET asking for the upgrade, with no body a client could trickle
    (a POST that merely says ``Upgrade: websocket`` stays under ``server.request_timeout``)."""
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and not request.content_length
        and "Transfer-Encoding" not in request.headers
    )


class BoundedRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose server is a :class:`BoundedServer`."""

    def __init__(self, app: web.Application, settings: Settings) -> None:
        server = settings.server
        super().__init__(
            app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=server.idle_timeout,
            # Reading what is left of a refused body (so the client sees our answer) is bounded too.
            lingering_time=min(2.0, server.idle_timeout),
        )
        self._settings = settings

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # runs the application's start-up
        server = self._settings.server
        return BoundedServer(
            made.request_handler,
            max_connections=server.max_connections,
            request_timeout=server.request_timeout,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=server.idle_timeout,
            lingering_time=min(2.0, server.idle_timeout),
            access_log=None,
        )


def raise_fd_limit(needed: int) -> None:
    """Raise the soft file-descriptor limit towards ``needed`` (up to the hard limit); warn if short.

    Every connection the limits allow costs a descriptor; a limit above what the process may open
    is not a limit: accept() fails first, for every listener at once.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (OSError, ValueError):
        pass
    if soft < needed:
        logger.warning(
            "open-file limit %d is below the %d the connection limits need; lower"
            " server.max_connections (and SMTP's) or raise the limit (ulimit -n, LimitNOFILE=)",
            soft,
            needed,
        )


def shutdown_bound(settings: Settings) -> float:
    """How long SIGTERM may take, at most, before the process exits anyway."""
    return settings.server.shutdown_timeout + settings.outbox.drain_timeout + SHUTDOWN_MARGIN


async def serve(
    app: web.Application, settings: Settings, *, on_listening: Callable[[], None] | None = None
) -> int:
    """Run ``app`` until SIGTERM or SIGINT; 0 after a clean stop, 1 when the shutdown bound was hit.

    ``on_listening`` runs once every listener is bound (the start-up summary)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # HTTP connections, plus room for SMTP sessions, the store, the broker and the child processes.
    raise_fd_limit(settings.server.max_connections + FD_HEADROOM)
    runner = BoundedRunner(app, settings)
    try:
        await runner.setup()
        site = web.TCPSite(
            runner,
            settings.server.host,
            settings.server.port,
            shutdown_timeout=settings.server.shutdown_timeout,
            backlog=settings.server.max_connections,
        )
        await site.start()
        if on_listening is not None:
            on_listening()
        await stop.wait()
        logger.info("stopping: SIGTERM or SIGINT received")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        bound = shutdown_bound(settings)
        cleanup = asyncio.ensure_future(runner.cleanup())
        done, _ = await asyncio.wait({cleanup}, timeout=bound)
    if cleanup in done:
        cleanup.result()
        return 0
    logger.error("shutdown did not finish within %.1fs; exiting anyway (nothing acknowledged is lost)", bound)
    cleanup.cancel()
    await asyncio.wait({cleanup}, timeout=1.0)
    return 1


def run_until_stopped(loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` to its end, then cancel what is left (as ``run_app`` does) and close the loop."""
    try:
        return loop.run_until_complete(main)
    finally:
        leftover = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.wait(leftover, timeout=1.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

"""connectors.base.keep_connected: the reconnect loop of DingTalk's Stream and Feishu's long
connection, on an injected clock and sleep (no real waiting)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from test_cached_lookup import Clock

from connectors.base import Reconnect, keep_connected

LOG = logging.getLogger("tests.reconnect")


class Refused(Exception):
    """The provider API refusing to open the connection."""


class Metrics:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def event(self, event: str, *, inbox: str = "") -> None:
        self.events.append((event, inbox))

    def refused(self, reason: str, *, inbox: str = "") -> None:
        raise AssertionError("keep_connected refuses nothing")


class Pauses:
    """The injected sleep: records each pause, moves the clock by it, cancels after ``stop_after``."""

    def __init__(self, clock: Clock, stop_after: int) -> None:
        self.clock = clock
        self.stop_after = stop_after
        self.taken: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.taken.append(seconds)
        self.clock.mono += seconds
        if len(self.taken) == self.stop_after:
            raise asyncio.CancelledError


def policy(first: float = 1.0, cap: float = 10.0) -> Reconnect:
    return Reconnect(channel="feishu", what="long connection", metric="ws_reconnect", first_backoff=first,
                     max_backoff=cap, opening_errors=(Refused,))


def connections(clock: Clock, script: list[float | None]) -> tuple[list[int], Callable[[], Awaitable[None]]]:
    """A ``connect`` that, call by call, holds for ``script[i]`` seconds and then closes, or (``None``)
    fails at once with a lost connection."""
    calls: list[int] = []

    async def connect() -> None:
        held = script[len(calls)]
        calls.append(1)
        if held is None:
            raise aiohttp.ClientConnectionError("connection reset")
        clock.mono += held

    return calls, connect


async def run(script: list[float | None], stop_after: int, first: float = 1.0, cap: float = 10.0,
              ) -> tuple[list[float], Metrics, int]:
    clock, metrics = Clock(), Metrics()
    pauses = Pauses(clock, stop_after)
    calls, connect = connections(clock, script)
    with pytest.raises(asyncio.CancelledError):
        await keep_connected(connect, policy(first, cap), inbox="support", clock=clock,
                             metrics=metrics, log=LOG, sleep=pauses)
    return pauses.taken, metrics, len(calls)


async def test_pauses_double_from_the_first_backoff_and_stop_at_the_cap() -> None:
    taken, metrics, calls = await run([None] * 8, stop_after=7, first=1.0, cap=10.0)
    assert taken == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert calls == 7
    # One count per reconnect, under the channel's metric and the inbox.
    assert metrics.events == [("ws_reconnect", "support")] * 7


async def test_a_connection_that_held_longer_than_stable_after_starts_the_backoff_over() -> None:
    taken, metrics, _ = await run([None, None, None, 30.5, None, None], stop_after=6)
    assert taken == [1.0, 2.0, 4.0, 1.0, 2.0, 4.0]
    assert len(metrics.events) == 6


async def test_a_connection_that_held_only_stable_after_does_not_reset_the_backoff() -> None:
    taken, _, _ = await run([None, None, 30.0, None], stop_after=4)
    assert taken == [1.0, 2.0, 4.0, 8.0]


async def test_a_connection_the_provider_closes_cleanly_is_reopened_and_counted_too() -> None:
    taken, metrics, calls = await run([0.0, 0.0, 0.0], stop_after=3)
    assert taken == [1.0, 2.0, 4.0]
    assert calls == 3
    assert metrics.events == [("ws_reconnect", "support")] * 3


async def test_errors_are_logged_on_the_channels_logger_and_a_network_error_by_its_type_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOG.name)
    failures: list[Exception] = [Refused("app secret invalid"),
                                 aiohttp.ClientConnectionError("wss://open.example/ws?ticket=one-time-ticket")]

    async def connect() -> None:
        raise failures.pop(0)

    clock = Clock()
    with pytest.raises(asyncio.CancelledError):
        await keep_connected(connect, policy(), inbox="support", clock=clock, metrics=Metrics(), log=LOG,
                             sleep=Pauses(clock, stop_after=2))
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        (LOG.name, "feishu support: opening the long connection failed: app secret invalid"),
        (LOG.name, "feishu support: long connection lost: ClientConnectionError"),
    ]
    assert "ticket" not in caplog.text


async def test_an_unexpected_error_goes_to_the_supervisor_uncounted() -> None:
    clock, metrics = Clock(), Metrics()
    pauses = Pauses(clock, stop_after=1)

    async def connect() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await keep_connected(connect, policy(), inbox="support", clock=clock, metrics=metrics, log=LOG,
                             sleep=pauses)
    assert metrics.events == []
    assert pauses.taken == []


async def test_cancelling_while_connected_stops_it_uncounted() -> None:
    metrics, calls, held = Metrics(), list[int](), asyncio.Event()

    async def connect() -> None:
        calls.append(1)
        held.set()
        await asyncio.Event().wait()  # a connection that stays up until the gateway stops

    task = asyncio.ensure_future(keep_connected(connect, policy(), inbox="support", clock=Clock(),
                                                metrics=metrics, log=LOG, sleep=Pauses(Clock(), 99)))
    await held.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [1]
    assert metrics.events == []  # stopping is not a reconnect


async def test_cancelling_during_the_pause_stops_it_before_another_connection() -> None:
    metrics, calls, pausing = Metrics(), list[int](), asyncio.Event()

    async def connect() -> None:
        calls.append(1)
        raise aiohttp.ClientConnectionError

    async def sleep(seconds: float) -> None:
        pausing.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(keep_connected(connect, policy(), inbox="support", clock=Clock(),
                                                metrics=metrics, log=LOG, sleep=sleep))
    await pausing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [1]
    assert metrics.events == [("ws_reconnect", "support")]

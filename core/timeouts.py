"""Timeouts for the hot path: the many long deadlines of one duration share one timer.

``asyncio.timeout`` arms a timer of its own for every use (a timer handle, a cancel, a task
look-up and bookkeeping on exit), about 7 us of event-loop time; an API request passed through two
(the server's request bound and the ingest bound), of many seconds each and almost never reached.
A :class:`SharedTimeout` keeps the scopes waiting under its one duration in the order they began,
which is the order of their deadlines, and checks the oldest from one timer that runs only while
some scope waits. A deadline is never cut short, and is reached at most ``resolution`` late.

Inside a scope, everything is as with ``asyncio.timeout``: the task is cancelled at the deadline
and the scope raises :class:`TimeoutError` in its place; a cancellation from elsewhere propagates.
Entering and leaving never wait, so a scope is also a plain ``with`` block (inside a task): the hot
paths use that, which saves the two coroutines ``async with`` makes per scope.
"""

from __future__ import annotations

import asyncio
import weakref
from types import TracebackType


class SharedTimeout:
    """``async with timeout():`` bounds the block by ``seconds``, as ``asyncio.timeout(seconds)``."""

    def __init__(self, seconds: float, *, resolution: float | None = None) -> None:
        if seconds <= 0:
            raise ValueError("a shared timeout needs seconds > 0")
        self.seconds = seconds
        # How late a deadline may be seen: a twentieth of the duration, at most a second.
        self.resolution = min(1.0, seconds / 20) if resolution is None else resolution
        self._waiting: dict[_Scope, float] = {}  # scope -> deadline, oldest first
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> _Scope:
        return _Scope(self)

    def _enter(self, scope: _Scope, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            if self._waiting:
                raise RuntimeError("a SharedTimeout serves one event loop")
            if self._timer is not None:
                self._timer.cancel()  # the previous loop's, left armed by _leave
            self._loop, self._timer = loop, None
        deadline = loop.time() + self.seconds
        self._waiting[scope] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._sweep)

    def _leave(self, scope: _Scope) -> None:
        # The timer is left armed when the last scope leaves: it fires at most once more, finds
        # nothing (or a later scope) and stops or moves on. Cancelling it and arming a new one for
        # the next request cost two timer operations per request whenever requests came one by one.
        self._waiting.pop(scope, None)

    def _sweep(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        waiting = self._waiting
        while waiting:
            scope, deadline = next(iter(waiting.items()))
            if deadline > now:
                # The next check no sooner than ``resolution`` from now: one timer per resolution.
                self._timer = loop.call_at(max(deadline, now + self.resolution), self._sweep)
                return
            del waiting[scope]
            scope.expire()


class _Scope:
    __slots__ = ("_cancelling", "_loop", "_owner", "_task", "expired")

    def __init__(self, owner: SharedTimeout, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._owner = owner
        # The running loop when the caller has just looked it up (shared_timeout): on Linux every
        # look-up is a getpid() system call, ~1 us here.
        self._loop = loop
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self.expired = False

    def __enter__(self) -> _Scope:
        loop = self._loop or asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a timeout is used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._owner._enter(self, loop)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._owner._leave(self)
        # As asyncio.timeout: when ours was the only new cancellation, it becomes the timeout.
        if (
            self.expired
            and self._task is not None
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    async def __aenter__(self) -> _Scope:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def expire(self) -> None:
        self.expired = True
        if self._task is not None:
            self._task.cancel()


_PER_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, SharedTimeout]] = (
    weakref.WeakKeyDictionary()
)
# The last loop looked up and its timeouts: a WeakKeyDictionary look-up makes a weak reference
# each time, and every request asks for the same loop.
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], dict[float, SharedTimeout]] | None = None


def shared_timeout(seconds: float) -> _Scope:
    """A scope of this loop's :class:`SharedTimeout` for ``seconds`` (one per loop and duration)."""
    global _last
    loop = asyncio.get_running_loop()
    last = _last
    if last is not None and last[0]() is loop:
        by_duration = last[1]
    else:
        known = _PER_LOOP.get(loop)
        by_duration = _PER_LOOP[loop] = {} if known is None else known
        _last = (weakref.ref(loop), by_duration)
    timeout = by_duration.get(seconds)
    if timeout is None:
        timeout = by_duration[seconds] = SharedTimeout(seconds)
    return _Scope(timeout, loop)

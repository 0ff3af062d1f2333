"""A log line that a flood cannot turn into a flood of log lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Logs at most one line per ``interval`` seconds; the next line says how many were held back.

    For refusals an attacker controls (connections shed at a limit): each one is worth knowing about,
    but ten thousand identical lines a second would hide everything else and cost the loop.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 10.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._level = level
        self._clock = clock
        self._last = float("-inf")
        self._held = 0
        self.total = 0

    def __call__(self, msg: str, *args: object) -> None:
        self.total += 1
        now = self._clock()
        if now - self._last < self._interval:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        if held:
            self._logger.log(
                self._level, msg + " (and %d more like it in the last %.0fs)", *args, held, self._interval
            )
        else:
            self._logger.log(self._level, msg, *args)

"""One configured Weibo account and Weibo's push signature."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from connectors.base import any_secret_matches

_DIGITS = re.compile(r"^\d{1,16}$")


def signature(app_secret: str, timestamp: str, nonce: str) -> str:
    """Weibo's push signature: hex SHA-1 of the app secret, timestamp and nonce, sorted and joined
    (https://open.weibo.com/wiki/Messages_api_start, "signature参数的加密规则")."""
    joined = "".join(sorted((app_secret, timestamp, nonce)))
    return hashlib.sha1(joined.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    name: str
    inbox: str
    tenant: str
    secrets: tuple[str, ...] = field(repr=False)
    access_token: str | None = field(default=None, repr=False)
    replay_window: float = 300.0

    def verifies(self, offered: str, timestamp: str, nonce: str) -> bool:
        """Whether ``offered`` signs ``timestamp`` and ``nonce`` with one of the secrets; compares
        with every one, so the time taken does not tell which matched."""
        given = offered.strip().lower().encode("ascii", "replace")
        return any_secret_matches(
            self.secrets, lambda secret: signature(secret, timestamp, nonce).encode(), given
        )

    def fresh(self, timestamp: str, now: float) -> bool:
        """Whether the signed timestamp (seconds, or milliseconds as in Weibo's own example) lies
        within the replay window."""
        if not _DIGITS.match(timestamp):
            return False
        value = int(timestamp)
        seconds = value / 1000 if value > 10**11 else float(value)
        return abs(now - seconds) <= self.replay_window

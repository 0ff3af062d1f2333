"""One configured DingTalk robot (an inbox's)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field

from connectors.base import any_secret_matches


def sign(timestamp: str, secret: str) -> str:
    """DingTalk's ``sign`` header: base64(HMAC-SHA256(secret, timestamp + "\\n" + secret))."""
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


@dataclass(frozen=True, slots=True, kw_only=True)
class Bot:
    inbox: str
    tenant: str
    mode: str
    app_key: str
    robot_code: str
    fetch_media: bool
    directory_emails: bool
    app_secret: str = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)

    def verifies(self, timestamp: str, offered: str) -> bool:
        """Whether ``offered`` signs ``timestamp`` with one of the secrets; compares with every one."""
        given = offered.strip().encode("ascii", "replace")
        return any_secret_matches(self.secrets, lambda secret: sign(timestamp, secret).encode(), given)

"""One configured Douyin app and Douyin's webhook signature."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from connectors.base import any_secret_matches
from core.http import header_bytes


def signature(secret: str, body: bytes) -> str:
    """What Douyin sends in ``X-Douyin-Signature``: hex SHA-1 of the secret, then the body."""
    return hashlib.sha1(secret.encode() + body, usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class App:
    """One configured Douyin app."""

    name: str
    inbox: str
    tenant: str
    client_key: str
    secrets: tuple[str, ...] = field(repr=False)
    access_token: str | None = field(default=None, repr=False)
    account_open_id: str | None = None

    def verifies(self, body: bytes, offered: str) -> bool:
        """Whether ``offered`` signs ``body`` with one of the secrets; compares with every one."""
        given = header_bytes(offered.strip().lower())
        return any_secret_matches(self.secrets, lambda secret: signature(secret, body).encode(), given)

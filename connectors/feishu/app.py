"""One configured Feishu / Lark app (an inbox's bot)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class App:
    """One configured Feishu / Lark app."""

    inbox: str
    tenant: str
    mode: str
    host: str
    api_base: str
    app_id: str
    bot_open_id: str
    fetch_media: bool
    directory_emails: bool
    reply_in_thread: bool
    app_secret: str = field(repr=False)
    tokens: tuple[str, ...] = field(repr=False)
    keys: tuple[str, ...] = field(repr=False)

    def token_matches(self, offered: object) -> bool:
        given = offered.encode() if isinstance(offered, str) else b""
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(token.encode(), given)
        return matched

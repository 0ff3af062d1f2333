"""One configured Feishu / Lark app (an inbox's bot)."""

from __future__ import annotations

from dataclasses import dataclass, field

from connectors.base import any_secret_matches


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
        return any_secret_matches(self.tokens, str.encode, given)

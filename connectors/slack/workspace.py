"""One configured Slack app installation, as the connector, the intake and the sender see it."""

from __future__ import annotations

from dataclasses import dataclass, field

from normalizers.slack import Policy


@dataclass(frozen=True, slots=True, kw_only=True)
class Workspace:
    """One configured app installation (an inbox)."""

    inbox: str
    tenant: str
    mode: str
    policy: Policy
    fetch_files: bool
    profile_emails: bool
    dm_replies_in_thread: bool
    bot_token: str = field(repr=False)
    app_token: str | None = field(default=None, repr=False)
    signing_secrets: tuple[str, ...] = field(default=(), repr=False)

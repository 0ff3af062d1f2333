"""The Telegram channel: Bot API webhooks (or long-polling), one bot per inbox."""

from connectors.telegram.connector import TelegramConnector
from connectors.telegram.settings import TelegramSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.telegram import normalize_telegram

DESCRIPTOR = ChannelDescriptor(
    name="telegram",
    connector=TelegramConnector,
    normalizer=normalize_telegram,
    settings=TelegramSettings,
    identity_kinds=frozenset({IdentityKind.TELEGRAM, IdentityKind.PHONE}),
    # Telegram waits about a minute; answering within 10 s keeps its queue for the bot moving.
    deadline=10.0,
)

__all__ = ["DESCRIPTOR", "TelegramConnector", "TelegramSettings"]

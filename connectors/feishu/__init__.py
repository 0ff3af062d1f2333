"""The Feishu / Lark channel: event subscriptions (signed, encrypted), one app per inbox, and replies."""

from connectors.feishu.connector import FeishuConnector
from connectors.feishu.settings import FeishuSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.feishu import normalize_feishu

DESCRIPTOR = ChannelDescriptor(
    name="feishu",
    connector=FeishuConnector,
    normalizer=normalize_feishu,
    settings=FeishuSettings,
    identity_kinds=frozenset({IdentityKind.FEISHU_OPEN_ID, IdentityKind.FEISHU_UNION_ID,
                              IdentityKind.FEISHU_USER_ID, IdentityKind.EMAIL}),
    # Feishu retries a callback without a 200 within 3 seconds.
    deadline=3.0,
)

__all__ = ["DESCRIPTOR", "FeishuConnector", "FeishuSettings"]

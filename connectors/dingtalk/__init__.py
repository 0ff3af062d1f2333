"""The DingTalk channel: robot messages over Stream mode or the signed HTTP callback, and replies."""

from connectors.dingtalk.connector import DingTalkConnector
from connectors.dingtalk.settings import DingTalkSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.dingtalk import normalize_dingtalk

DESCRIPTOR = ChannelDescriptor(
    name="dingtalk",
    connector=DingTalkConnector,
    normalizer=normalize_dingtalk,
    settings=DingTalkSettings,
    identity_kinds=frozenset(
        {IdentityKind.DINGTALK_STAFF_ID, IdentityKind.DINGTALK_SENDER_ID, IdentityKind.EMAIL}
    ),
    # The robot HTTP callback gives up after a few seconds; Stream acknowledges after the commit.
    deadline=3.0,
)

__all__ = ["DESCRIPTOR", "DingTalkConnector", "DingTalkSettings"]

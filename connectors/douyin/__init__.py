"""Douyin Open Platform (抖音开放平台) webhooks: private messages and comments to a brand account,
replies through the private-message and comment-reply APIs."""

from connectors.douyin.connector import DouyinConnector
from connectors.douyin.settings import DOUYIN_DEADLINE, DouyinSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.douyin import normalize_douyin

DESCRIPTOR = ChannelDescriptor(
    name="douyin",
    connector=DouyinConnector,
    normalizer=normalize_douyin,
    settings=DouyinSettings,
    identity_kinds=frozenset({IdentityKind.DOUYIN_OPEN_ID}),
    deadline=DOUYIN_DEADLINE,
)

__all__ = ["DESCRIPTOR", "DouyinConnector", "DouyinSettings"]

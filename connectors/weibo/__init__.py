"""Weibo fan service (微博粉丝服务平台): private messages, mentions and events of a verified
account, replies through the fan-service reply API."""

from connectors.weibo.connector import WeiboConnector
from connectors.weibo.settings import WeiboSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.weibo import normalize_weibo

DESCRIPTOR = ChannelDescriptor(
    name="weibo",
    connector=WeiboConnector,
    normalizer=normalize_weibo,
    settings=WeiboSettings,
    identity_kinds=frozenset({IdentityKind.WEIBO}),
    # Weibo documents no deadline; its push service mirrors WeChat's (5 s), so the same is kept.
    deadline=5.0,
)

__all__ = ["DESCRIPTOR", "WeiboConnector", "WeiboSettings"]

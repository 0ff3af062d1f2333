"""WeChat Official Account, WeCom and WeChat Customer Service connectors (verification, decryption,
sub-apps, media fetching, ``sync_msg``)."""

from connectors.wechat.app import WeChatConnector, WeComConnector
from connectors.wechat.kf import WeChatKfConnector

__all__ = ["WeChatConnector", "WeChatKfConnector", "WeComConnector"]

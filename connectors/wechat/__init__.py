"""WeChat Official Account and WeCom callback connectors (verification, decryption, sub-apps)."""

from connectors.wechat.app import WeChatConnector, WeComConnector

__all__ = ["WeChatConnector", "WeComConnector"]

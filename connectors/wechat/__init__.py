"""WeChat Official Account, WeCom, WeChat Customer Service (微信客服) and Mini Program customer service
(小程序客服消息): four channels that share verification, decryption, the API client and media fetching."""

from connectors.wechat.app import WeChatConnector, WeComConnector
from connectors.wechat.kf import WeChatKfConnector
from connectors.wechat.miniprogram import MiniProgramConnector
from connectors.wechat.settings import MiniProgramSettings, WeChatKfSettings, WeChatSettings, WeComSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.wechat import normalize_wechat, normalize_wecom
from normalizers.wechat_kf import normalize_kf
from normalizers.wechat_miniprogram import normalize_miniprogram

# WeChat gives up on a callback after 5 s and retries it three times.
_WECHAT_DEADLINE = 5.0

WECHAT = ChannelDescriptor(
    name="wechat",
    connector=WeChatConnector,
    normalizer=normalize_wechat,
    settings=WeChatSettings,
    identity_kinds=frozenset({IdentityKind.WECHAT_OPENID, IdentityKind.WECHAT_UNIONID}),
    deadline=_WECHAT_DEADLINE,
)
WECOM = ChannelDescriptor(
    name="wecom",
    connector=WeComConnector,
    normalizer=normalize_wecom,
    settings=WeComSettings,
    identity_kinds=frozenset({IdentityKind.WECOM_USERID, IdentityKind.WECOM_EXTERNAL_USERID}),
    deadline=_WECHAT_DEADLINE,
)
WECHAT_KF = ChannelDescriptor(
    name="wechat_kf",
    connector=WeChatKfConnector,
    normalizer=normalize_kf,
    settings=WeChatKfSettings,
    identity_kinds=frozenset({IdentityKind.WECOM_EXTERNAL_USERID, IdentityKind.WECOM_USERID}),
    deadline=_WECHAT_DEADLINE,
)

MINIPROGRAM = ChannelDescriptor(
    name="miniprogram",
    connector=MiniProgramConnector,
    normalizer=normalize_miniprogram,
    settings=MiniProgramSettings,
    identity_kinds=frozenset({IdentityKind.WECHAT_OPENID, IdentityKind.WECHAT_UNIONID}),
    deadline=_WECHAT_DEADLINE,
)

__all__ = [
    "MINIPROGRAM", "WECHAT", "WECHAT_KF", "WECOM",
    "MiniProgramConnector", "WeChatConnector", "WeChatKfConnector", "WeComConnector",
]

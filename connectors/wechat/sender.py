"""The way back on WeChat: reply senders of the Official Account, WeCom app and 微信客服 channels.

* Official Account: the customer-service message API (``POST /cgi-bin/message/custom/send``) to the
  follower's openid. WeChat takes these only within 48 hours of the follower's last message (the
  gateway enforces the window from ``SenderSpec.window``; 45015 from WeChat is ``window_closed``
  as well) and at most 20 per follower message (45047). Text, images and voice (uploaded as
  temporary media first), and a news card (``options.news``; its picture from the first image
  attachment, uploaded with ``uploadimg``). No files: a reply carrying one is ``unsupported``.
* WeCom app: ``POST /cgi-bin/message/send`` with the app's ``agentid`` to the member's userid;
  text, image, voice, video and file. No window. External contacts cannot be written to this way.
  WeCom's duplicate check (30 minutes) drops a resend of the same content.
* 微信客服: ``POST /cgi-bin/kf/send_msg`` with ``open_kfid`` and the customer's ``external_userid``
  (both kept by the normalizer in the message's ``extra``) and ``msgid`` derived from the reply id,
  so WeChat keeps one message per id however often a send is repeated. 48 hours and 5 messages
  per customer message (95001 is ``window_closed``).

A reply becomes one or more provider messages ("parts"): its text (split at 2048 bytes, WeChat's
bound for one text message), then one message per attachment. Every part is checked before the
first call (type and size), so a reply that cannot go out fails without sending half of it. When a
reply has several parts, the parts already accepted are recorded in the channel's state (one
record per thread, overwritten by the thread's next reply): a retry after a failure sends the rest
only. Every send is one attempt (``retries=0``): the gateway retries with its own backoff.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson

from connectors.wechat.api import ApiError, ApiUnavailable, TooLargeMedia, WeChatApi
from core.channel import (
    Blobs,
    ChannelState,
    OutboundAttachment,
    OutboundReply,
    ReplyFailure,
    SendError,
    Sent,
)
from core.model import IdentityKind
from normalizers.html import to_text

logger = logging.getLogger(__name__)

WINDOW_48H = 48 * 3600.0
WECOM_DUPLICATE_CHECK = 1800  # seconds (WeCom allows up to 4 hours)
MAX_TEXT_BYTES = 2048
MiB = 1024 * 1024
PartKind = Literal["text", "image", "voice", "video", "file", "news"]
# WeCom and 微信客服: JPG/PNG images, AMR voice, MP4 video; anything else goes as a file.
_WECOM_MEDIA: Mapping[str, PartKind] = {
    "image/jpeg": "image", "image/png": "image", "audio/amr": "voice", "video/mp4": "video",
}
_KF_MSGID = re.compile(r"^[0-9A-Za-z_-]{1,32}$")

# Refused credentials are retried (later, AUTH_RETRY at the earliest): an operator who fixes the
# secret, the IP allow-list or the permission sees the reply go out.
AUTH_RETRY = 300.0
# errcode -> (reason, permanent, retry_after). The codes the three APIs share (the global return
# codes of the Official Account platform and of WeCom agree on these).
_COMMON: dict[int, tuple[ReplyFailure, bool, float | None]] = {
    -1: ("provider_error", False, 5.0),  # system busy
    40001: ("auth", False, 60.0),  # token refused again after one refresh (or a wrong secret)
    40014: ("auth", False, 60.0),
    42001: ("auth", False, 60.0),
    40013: ("auth", False, AUTH_RETRY),  # invalid AppID / CorpID
    40125: ("auth", False, AUTH_RETRY),  # invalid AppSecret
    40164: ("auth", False, AUTH_RETRY),  # caller's IP not on the account's allow-list
    60020: ("auth", False, AUTH_RETRY),  # WeCom: caller's IP not on the app's trusted IPs
    48001: ("auth", False, AUTH_RETRY),  # API not authorized for this account (e.g. not verified)
    48002: ("auth", False, AUTH_RETRY),  # WeCom: API forbidden for this app
    301002: ("auth", False, AUTH_RETRY),  # WeCom: no right to this app
    40056: ("auth", False, AUTH_RETRY),  # WeCom: invalid agentid
    40003: ("recipient_unreachable", True, None),  # invalid openid / userid
    40096: ("recipient_unreachable", True, None),  # invalid external_userid
    81013: ("recipient_unreachable", True, None),  # WeCom: user, party and tag all invalid
    82001: ("recipient_unreachable", True, None),  # WeCom: no recipient
    43004: ("blocked", True, None),  # the follower unfollowed
    43019: ("blocked", True, None),  # the follower is on the account's blacklist
    40004: ("unsupported", True, None),  # invalid media type
    40005: ("unsupported", True, None),  # invalid file type
    40008: ("unsupported", True, None),  # invalid message type
    40006: ("too_large", True, None),  # invalid file size
    40009: ("too_large", True, None),  # image size
    40010: ("too_large", True, None),  # voice size
    40011: ("too_large", True, None),  # video size
    45001: ("too_large", True, None),  # media size out of limit
    45002: ("too_large", True, None),  # content size out of limit
    44002: ("rejected", True, None),  # empty post data
    44004: ("rejected", True, None),  # empty text content
    47001: ("rejected", True, None),  # data format error
    87014: ("rejected", True, None),  # content refused by WeChat's content check
    40007: ("provider_error", False, 5.0),  # invalid media_id: the retry uploads again
    45009: ("rate_limited", False, 3600.0),  # daily API quota reached
    45011: ("rate_limited", False, 60.0),  # API minute quota reached
    45033: ("rate_limited", False, 5.0),  # WeCom: too many concurrent calls
}
_OFFICIAL_ACCOUNT: dict[int, tuple[ReplyFailure, bool, float | None]] = {
    45015: ("window_closed", True, None),  # past 48 h since the follower's last message (or unfollowed)
    45047: ("window_closed", True, None),  # 20 messages sent since the follower's last message
}
_KF: dict[int, tuple[ReplyFailure, bool, float | None]] = {
    95001: ("window_closed", True, None),  # 5 messages sent since the customer's last message
    95018: ("rejected", True, None),  # session state forbids API sends (a servicer holds it)
}


def send_error(exc: Exception, table: Mapping[int, tuple[ReplyFailure, bool, float | None]]) -> SendError:
    """The :class:`SendError` for what the API answered (its code and words in ``detail``)."""
    if isinstance(exc, TooLargeMedia):
        return SendError("too_large", exc.errmsg, permanent=True)
    if isinstance(exc, ApiError):
        reason, permanent, retry_after = table.get(exc.errcode) or _COMMON.get(
            exc.errcode, ("provider_error", False, None)
        )
        return SendError(reason, f"errcode {exc.errcode}: {exc.errmsg}", permanent=permanent,
                         retry_after=retry_after)
    if isinstance(exc, ApiUnavailable):
        if exc.errcode is not None:  # busy or over a quota: not taken
            reason, _, retry_after = table.get(exc.errcode) or _COMMON.get(
                exc.errcode, ("provider_error", False, None)
            )
            return SendError(reason, exc.reason, permanent=False, retry_after=retry_after or exc.retry_after)
        # No answer (a timeout may hide an accepted message: the retry may send it twice).
        reason = "timeout" if "Timeout" in exc.reason else "provider_error"
        return SendError(reason, exc.reason, permanent=False, retry_after=exc.retry_after)
    raise exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """One configured account that can send: its name, inbox and API identity."""

    name: str
    inbox: str
    app_id: str  # AppID or CorpID
    agent_id: int | None = None  # WeCom


@dataclass(frozen=True, slots=True, kw_only=True)
class Part:
    """One provider message of a reply."""

    kind: PartKind
    text: str | None = None
    attachment: OutboundAttachment | None = None
    news: Mapping[str, Any] | None = None


class ApiPool:
    """The accounts' API clients, made on first use inside the running loop and shared by the media
    fetcher, the unionid lookups, the syncer and the sender (so one token per account)."""

    def __init__(self, build: Callable[[], dict[str, WeChatApi]]) -> None:
        self._build = build
        self._apis: dict[str, WeChatApi] | None = None

    def get(self) -> dict[str, WeChatApi]:
        if self._apis is None:
            self._apis = self._build()
        return self._apis


def split_text(text: str, limit: int = MAX_TEXT_BYTES) -> list[str]:
    """``text`` in pieces of at most ``limit`` UTF-8 bytes, cut at a line end or a space where one
    is near, never inside a character."""
    pieces: list[str] = []
    rest = text
    while len(rest.encode()) > limit:
        cut = len(rest.encode()[:limit].decode("utf-8", "ignore"))
        window = rest[:cut]
        soft = max(window.rfind("\n"), window.rfind(" "))
        if soft > cut // 2:
            cut = soft + 1
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip("\n")
    if rest.strip():
        pieces.append(rest.rstrip())
    return pieces


def kf_msgid(reply_id: str, part: int = 0) -> str:
    """The 微信客服 ``msgid`` of a reply's part: at most 32 of ``[0-9A-Za-z_-]``, the same on every
    attempt. A reply id that fits is used as it is (part 0); otherwise a digest of it."""
    if part == 0 and _KF_MSGID.match(reply_id):
        return reply_id
    basis = reply_id if part == 0 else f"{reply_id}:{part}"
    return hashlib.sha256(basis.encode()).hexdigest()[:32]


class WeChatSender(abc.ABC):
    """Sends a reply through one account's API (subclasses: the three channels)."""

    channel: ClassVar[str]
    errors: ClassVar[Mapping[int, tuple[ReplyFailure, bool, float | None]]] = {}
    # content type -> part kind; anything else is a file where files are allowed
    media_kinds: ClassVar[Mapping[str, PartKind]] = {}
    files: ClassVar[bool] = True
    limits: ClassVar[Mapping[str, int]] = {"image": 10 * MiB, "voice": 2 * MiB, "video": 10 * MiB,
                                           "file": 20 * MiB}

    def __init__(
        self, accounts: Mapping[str, Account], pool: ApiPool, *, blobs: Blobs, state: ChannelState
    ) -> None:
        self.accounts = dict(accounts)
        self._pool = pool
        self._blobs = blobs
        self._state = state

    # -- what a channel says --------------------------------------------------------------------

    @abc.abstractmethod
    def recipient(self, reply: OutboundReply, account: Account) -> str:
        raise NotImplementedError

    @abc.abstractmethod
    async def deliver(
        self, api: WeChatApi, account: Account, to: str, part: Part, media: str | None, reply: OutboundReply,
        index: int,
    ) -> str | None:
        """Send one part; the provider's message id, if it gives one."""
        raise NotImplementedError

    # -- the send -------------------------------------------------------------------------------

    async def send(self, reply: OutboundReply) -> Sent:
        account = self.account(reply)
        api = self._pool.get().get(account.name)
        if api is None:
            raise SendError("auth", f"{self.channel} account {account.name!r} has no API secret configured",
                            permanent=True)
        to = self.recipient(reply, account)
        parts = self.parts(reply)
        key = f"reply:{reply.thread_id}"
        done, ids = await self._progress(key, reply) if len(parts) > 1 else (0, [])
        for index, part in enumerate(parts):
            if index < done:
                continue
            try:
                media = await self.upload(api, part)
                ids.append(await self.deliver(api, account, to, part, media, reply, index) or "")
            except (ApiError, ApiUnavailable) as exc:
                error = send_error(exc, self.errors)
                logger.warning("%s/%s: reply %s part %d/%d not sent: %s", self.channel, account.name,
                               reply.reply_id, index + 1, len(parts), error)
                raise error from None
            if len(parts) > 1:
                record = {"reply": reply.reply_id, "done": index + 1, "ids": ids}
                await self._state.put(key, orjson.dumps(record))
        first = next((i for i in ids if i), reply.reply_id)
        detail: dict[str, Any] = {"account": account.name, "parts": len(parts)}
        if len(ids) > 1:
            detail["message_ids"] = ids
        return Sent(provider_message_id=first, detail=detail)

    def account(self, reply: OutboundReply) -> Account:
        named = reply.answering.get("account")
        if isinstance(named, str) and named in self.accounts and self.accounts[named].inbox == reply.inbox:
            return self.accounts[named]
        for account in self.accounts.values():
            if account.inbox == reply.inbox:
                return account
        raise SendError(
            "unsupported", f"no {self.channel} account with an API secret for inbox {reply.inbox!r}",
            permanent=True,
        )

    def parts(self, reply: OutboundReply) -> list[Part]:
        """The provider messages of ``reply``, checked before anything is sent."""
        text = reply.text or (to_text(reply.html) if reply.html else None)
        parts = [Part(kind="text", text=piece) for piece in split_text(text or "")]
        parts += self.attachment_parts(reply.attachments)
        if not parts:
            raise SendError("rejected", "the reply has neither text nor attachments", permanent=True)
        return parts

    def attachment_parts(self, attachments: Sequence[OutboundAttachment]) -> list[Part]:
        """One message per attachment, by its type; one this channel cannot send, or past its cap,
        fails the reply before anything is sent."""
        parts = []
        for attachment in attachments:
            kind = self.media_kinds.get(attachment.content_type.split(";")[0].strip().lower())
            if kind is None:
                if not self.files:
                    raise SendError("unsupported", f"{self.channel} cannot send {attachment.content_type} "
                                    f"({attachment.name})", permanent=True)
                kind = "file"
            limit = self.limits[kind]
            if attachment.size > limit:
                raise SendError(
                    "too_large",
                    f"{attachment.name}: {attachment.size} bytes, {self.channel} takes at most {limit} "
                    f"for a {kind}",
                    permanent=True,
                )
            parts.append(Part(kind=kind, attachment=attachment))
        return parts

    async def upload(self, api: WeChatApi, part: Part) -> str | None:
        """Upload the part's attachment as temporary media; its media_id."""
        if part.attachment is None or part.kind == "news":
            return None
        data = await self.read(part.attachment)
        answer = await api.upload_media(part.kind, data, filename=part.attachment.name,
                                        content_type=part.attachment.content_type, retries=0)
        media_id = answer.get("media_id")
        if not isinstance(media_id, str) or not media_id:
            raise ApiError(-2, "upload answered without media_id")
        return media_id

    async def read(self, attachment: OutboundAttachment) -> bytes:
        data = await self._blobs.read(attachment.sha256)
        if data is None:
            raise SendError("rejected", f"attachment {attachment.name} is no longer in the blob store",
                            permanent=True)
        return data

    async def _progress(self, key: str, reply: OutboundReply) -> tuple[int, list[str]]:
        raw = await self._state.get(key)
        record = orjson.loads(raw) if raw else {}
        if isinstance(record, dict) and record.get("reply") == reply.reply_id:
            ids = record.get("ids")
            return int(record.get("done") or 0), list(ids) if isinstance(ids, list) else []
        return 0, []


def _identity_value(reply: OutboundReply, kind: str, prefix: str) -> str | None:
    recipient = reply.recipient
    if recipient.kind == kind and recipient.value.startswith(prefix + ":"):
        return recipient.value[len(prefix) + 1:] or None
    return None


def _payload(part: Part, media: str | None) -> dict[str, Any]:
    if part.kind == "text":
        return {"msgtype": "text", "text": {"content": part.text}}
    return {"msgtype": part.kind, part.kind: {"media_id": media}}


class OfficialAccountSender(WeChatSender):
    """Customer-service messages of an Official Account."""

    channel = "wechat"
    errors = _OFFICIAL_ACCOUNT
    media_kinds: ClassVar[Mapping[str, PartKind]] = {
        "image/jpeg": "image", "image/png": "image", "image/gif": "image", "image/bmp": "image",
        "audio/amr": "voice", "audio/mpeg": "voice", "audio/mp3": "voice",
    }
    files = False

    def recipient(self, reply: OutboundReply, account: Account) -> str:
        openid = _identity_value(reply, IdentityKind.WECHAT_OPENID, account.app_id)
        openid = openid or reply.answering.get("from_user")
        if not isinstance(openid, str) or not openid:
            raise SendError("recipient_unreachable", f"no openid of account {account.name} for this customer",
                            permanent=True)
        return openid

    def parts(self, reply: OutboundReply) -> list[Part]:
        news = reply.options.get("news")
        if not isinstance(news, Mapping):
            return super().parts(reply)
        # A news card: title, description and link; its picture is the first image attachment.
        url = news.get("url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise SendError("rejected", "options.news needs a url", permanent=True)
        card = {
            "title": str(news.get("title") or reply.subject or "")[:64],
            "description": str(news.get("description") or reply.text or "")[:512],
            "url": url,
            "picurl": news.get("picurl") if isinstance(news.get("picurl"), str) else None,
        }
        rest = list(reply.attachments)
        picture = None
        if not card["picurl"]:
            picture = next((a for a in rest if self.media_kinds.get(a.content_type) == "image"), None)
            if picture is not None:
                rest.remove(picture)
        # The card, then any other attachment as its own message.
        return [Part(kind="news", news=card, attachment=picture), *self.attachment_parts(rest)]

    async def deliver(
        self, api: WeChatApi, account: Account, to: str, part: Part, media: str | None, reply: OutboundReply,
        index: int,
    ) -> str | None:
        if part.kind == "news":
            card = dict(part.news or {})
            if part.attachment is not None:
                answer = await api.upload_media(
                    "image", await self.read(part.attachment), filename=part.attachment.name,
                    content_type=part.attachment.content_type, path="/cgi-bin/media/uploadimg", retries=0,
                )
                card["picurl"] = answer.get("url")
            article = {k: v for k, v in card.items() if v}
            body: dict[str, Any] = {"msgtype": "news", "news": {"articles": [article]}}
        else:
            body = _payload(part, media)
        await api.post_json("/cgi-bin/message/custom/send", {"touser": to, **body}, retries=0)
        return None  # the customer-service API gives no message id: the reply id stands for it


class WeComSender(WeChatSender):
    """Application messages of a WeCom self-built app, to a member of the corp."""

    channel = "wecom"
    media_kinds: ClassVar[Mapping[str, PartKind]] = _WECOM_MEDIA

    def recipient(self, reply: OutboundReply, account: Account) -> str:
        if reply.recipient.kind == IdentityKind.WECOM_EXTERNAL_USERID:
            raise SendError("unsupported", "a WeCom app writes to members of the corp only, not to external "
                            "contacts", permanent=True)
        userid = _identity_value(reply, IdentityKind.WECOM_USERID, account.app_id)
        userid = userid or reply.answering.get("from_user")
        if not isinstance(userid, str) or not userid or userid == "sys":
            raise SendError("recipient_unreachable", "no WeCom userid for this customer", permanent=True)
        return userid

    async def deliver(
        self, api: WeChatApi, account: Account, to: str, part: Part, media: str | None, reply: OutboundReply,
        index: int,
    ) -> str | None:
        # WeCom drops the same content to the same member within the interval: a resend after a
        # crash between WeCom's acceptance and our commit (at most a lease later) is absorbed.
        body = {
            "touser": to,
            "agentid": account.agent_id,
            "safe": 0,
            "enable_duplicate_check": 1,
            "duplicate_check_interval": WECOM_DUPLICATE_CHECK,
            **_payload(part, media),
        }
        answer = await api.post_json("/cgi-bin/message/send", body, retries=0)
        if to in str(answer.get("invaliduser") or "").split("|"):
            raise SendError("recipient_unreachable", f"invaliduser: {to}", permanent=True)
        msgid = answer.get("msgid")
        return msgid if isinstance(msgid, str) else None


class KfSender(WeChatSender):
    """微信客服 messages to the customer of a customer service account (``open_kfid``)."""

    channel = "wechat_kf"
    errors = _KF
    media_kinds: ClassVar[Mapping[str, PartKind]] = _WECOM_MEDIA

    def recipient(self, reply: OutboundReply, account: Account) -> str:
        external = reply.answering.get("external_userid")
        if not isinstance(external, str) or not external:
            external = _identity_value(reply, IdentityKind.WECOM_EXTERNAL_USERID, account.app_id)
        if not external:
            raise SendError("recipient_unreachable", "no external_userid for this customer", permanent=True)
        return external

    async def deliver(
        self, api: WeChatApi, account: Account, to: str, part: Part, media: str | None, reply: OutboundReply,
        index: int,
    ) -> str | None:
        open_kfid = reply.answering.get("open_kfid")
        if not isinstance(open_kfid, str) or not open_kfid:
            raise SendError("recipient_unreachable", "the customer's last message names no open_kfid",
                            permanent=True)
        msgid = kf_msgid(reply.reply_id, index)
        body = {"touser": to, "open_kfid": open_kfid, "msgid": msgid, **_payload(part, media)}
        answer = await api.post_json("/cgi-bin/kf/send_msg", body, retries=0)
        given = answer.get("msgid")
        return given if isinstance(given, str) and given else msgid



class MiniProgramSender(OfficialAccountSender):
    """Customer-service messages of a Mini Program (小程序客服消息), through the same
    ``/cgi-bin/message/custom/send`` as an Official Account (https://developers.weixin.qq.com/
    miniprogram/dev/OpenApiDoc/kf-mgnt/kf-message/sendCustomMessage.html): text, images (uploaded as
    temporary media), a link card (``options.link``: title, description, url, thumb_url) or a
    Mini Program card (``options.miniprogrampage``: title, pagepath, thumb_media_id). Within 48 hours
    of the user's last message (45015; 45047 when too many were sent). No voice, video or files."""

    channel = "miniprogram"
    media_kinds: ClassVar[Mapping[str, PartKind]] = {
        "image/jpeg": "image", "image/png": "image", "image/gif": "image",
    }
    limits: ClassVar[Mapping[str, int]] = {"image": 2 * MiB, "voice": 0, "video": 0, "file": 0}

    def parts(self, reply: OutboundReply) -> list[Part]:
        for kind in ("link", "miniprogrampage"):
            card = reply.options.get(kind)
            if isinstance(card, Mapping):
                # The card first, then the text and images, if any, as their own messages.
                rest = WeChatSender.parts(self, reply) if reply.text or reply.attachments else []
                return [Part(kind="news", news={"msgtype": kind, **card}), *rest]
        return WeChatSender.parts(self, reply)

    async def deliver(
        self, api: WeChatApi, account: Account, to: str, part: Part, media: str | None, reply: OutboundReply,
        index: int,
    ) -> str | None:
        if part.kind == "news":
            card = dict(part.news or {})
            kind = str(card.pop("msgtype"))
            body: dict[str, Any] = {"msgtype": kind, kind: {k: v for k, v in card.items() if v}}
        else:
            body = _payload(part, media)
        await api.post_json("/cgi-bin/message/custom/send", {"touser": to, **body}, retries=0)
        return None

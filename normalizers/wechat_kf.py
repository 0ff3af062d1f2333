"""WeChat Customer Service (微信客服): one ``sync_msg`` page -> canonical messages (pure).

The connector hands a whole page as one envelope (``body`` = the page's JSON, exactly as pulled;
``meta``: ``corp_id``, ``account``, ``open_kfid``), so a page is committed in one transaction, in the
order WeChat gives it. Every item becomes one message, whatever its type: known types get typed
fields in ``extra``, unknown ones keep the item itself. Idempotency is the item's ``msgid``;
the customer is ``WECOM_EXTERNAL_USERID`` ``"{corp_id}:{external_userid}"``.

``origin`` tells who sent it: 3 the customer (``kind="message"``), 4 a system event
(``kind="event"``), 5 a servicer writing from the WeCom client (``kind="agent_message"``, so a desk
can show the reply without taking it for the customer's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

import orjson

from core.errors import NormalizationError
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope

MEDIA_TYPES = {"image": "image", "voice": "voice", "video": "video", "file": "file"}
_KINDS = {3: "message", 4: "event", 5: "agent_message"}


class KfItem(TypedDict, total=False):
    msgid: str
    open_kfid: str
    external_userid: str
    send_time: int
    origin: int
    servicer_userid: str
    msgtype: str


def normalize_kf(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """Normalize one verified ``sync_msg`` page (channel ``wechat_kf``)."""
    try:
        page = orjson.loads(envelope.body)
    except orjson.JSONDecodeError as exc:
        raise NormalizationError(f"sync_msg page is not JSON: {exc}") from None
    items = page.get("msg_list") if isinstance(page, dict) else None
    if not isinstance(items, list):
        raise NormalizationError("sync_msg page has no msg_list")
    corp_id = str(envelope.meta.get("corp_id") or "")
    return [item_message(envelope, cast(KfItem, item), corp_id) for item in items if isinstance(item, dict)]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _sent_at(value: Any) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**11:
        return datetime.fromtimestamp(value, UTC)
    return None


def item_message(envelope: RawEnvelope, item: KfItem, corp_id: str) -> CanonicalMessage:
    msgtype = str(item.get("msgtype") or "unknown")
    payload = item.get(msgtype)
    body: Mapping[str, Any] = payload if isinstance(payload, dict) else {}
    origin = item.get("origin")
    extra: dict[str, Any] = {
        "msg_type": msgtype,
        "origin": origin,
        "open_kfid": _str(item.get("open_kfid")) or envelope.meta.get("open_kfid"),
        "servicer_userid": _str(item.get("servicer_userid")),
        "account": envelope.meta.get("account"),
    }
    kind = _KINDS.get(origin, "message") if isinstance(origin, int) else "message"
    media: list[MediaRef] = []
    text: str | None = None
    external = _str(item.get("external_userid"))

    if msgtype == "text":
        text = _str(body.get("content"))
        extra["menu_id"] = _str(body.get("menu_id"))
    elif msgtype in MEDIA_TYPES:
        media_id = _str(body.get("media_id"))
        if media_id:
            media.append(
                MediaRef(
                    kind=MEDIA_TYPES[msgtype],
                    ref=media_id,
                    content_type="audio/amr" if msgtype == "voice" else None,
                )
            )
    elif msgtype == "location":
        extra.update(
            latitude=body.get("latitude"),
            longitude=body.get("longitude"),
            name=_str(body.get("name")),
            address=_str(body.get("address")),
        )
        text = "\n".join(p for p in (_str(body.get("name")), _str(body.get("address"))) if p) or None
    elif msgtype == "link":
        title, desc, url = _str(body.get("title")), _str(body.get("desc")), _str(body.get("url"))
        extra.update(title=title, description=desc, url=url, pic_url=_str(body.get("pic_url")))
        text = "\n".join(p for p in (title, desc, url) if p) or None
    elif msgtype == "business_card":
        extra["card_userid"] = _str(body.get("userid"))
    elif msgtype == "miniprogram":
        extra.update(
            title=_str(body.get("title")),
            appid=_str(body.get("appid")),
            pagepath=_str(body.get("pagepath")),
            thumb_media_id=_str(body.get("thumb_media_id")),
        )
        text = _str(body.get("title"))
    elif msgtype == "event":
        kind = "event"
        event_type = _str(body.get("event_type")) or "unknown"
        extra["event"] = event_type
        extra["event_fields"] = dict(body)
        external = external or _str(body.get("external_userid"))
        if event_type == "enter_session":
            extra.update(
                scene=_str(body.get("scene")),
                scene_param=_str(body.get("scene_param")),
                welcome_code=_str(body.get("welcome_code")),
            )
        elif event_type == "msg_send_fail":
            extra.update(fail_msgid=_str(body.get("fail_msgid")), fail_type=body.get("fail_type"))
        elif event_type in ("user_recall_msg", "servicer_recall_msg"):
            extra["recall_msgid"] = _str(body.get("recall_msgid"))
        elif event_type == "session_status_change":
            extra.update(
                change_type=body.get("change_type"),
                old_servicer_userid=_str(body.get("old_servicer_userid")),
                new_servicer_userid=_str(body.get("new_servicer_userid")),
            )
    else:
        extra["item"] = dict(item)  # unknown type: kept whole

    # The way back (kf/send_msg) needs the customer's external_userid beside open_kfid.
    extra["external_userid"] = external
    msgid = _str(item.get("msgid"))
    identities: tuple[Identity, ...] = ()
    if external:
        identities = (
            Identity(
                kind=IdentityKind.WECOM_EXTERNAL_USERID,
                value=f"{corp_id}:{external}",
                verified=envelope.signature_verified,
            ),
        )
    else:
        # No customer (e.g. servicer_status_change): the servicer it concerns stands in.
        servicer = _str(item.get("servicer_userid")) or _str(body.get("servicer_userid")) or "sys"
        identities = (
            Identity(
                kind=IdentityKind.WECOM_USERID,
                value=f"{corp_id}:{servicer}",
                verified=envelope.signature_verified,
            ),
        )
    return CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=msgid,
        received_at=envelope.received_at,
        sent_at=_sent_at(item.get("send_time")),
        kind=kind,
        identities=identities,
        text=text,
        media=tuple(media),
        extra=extra,
        # Without a msgid (never documented, but possible) the item's own bytes identify it.
        dedupe_key=None if msgid else "item:" + orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode(),
    )

"""WeChat Official Account and WeCom callbacks: decrypted XML -> canonical messages (pure).

The connector puts the decrypted plaintext XML in ``envelope.meta["plaintext"]`` (the raw body as
received stays in ``envelope.body``), and the account's ``app_id`` (Official Account) or ``corp_id``
(WeCom). Every message and event type is kept: known ones get typed fields in ``extra``, unknown
ones keep the raw XML; nothing is rejected for its type.

Idempotency follows WeChat's documentation: ``MsgId`` for messages, ``FromUserName + CreateTime``
(+ ``Event`` + ``EventKey``) for events, which carry no id.
"""

from __future__ import annotations

# Types and ParseError only; parsing itself goes through defusedxml.
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from core.errors import InvalidInput, NormalizationError, TooLarge
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope

DEFAULT_MAX_XML_BYTES = 256 * 1024
MAX_DEPTH = 8  # WeChat nests at most three levels (SendPicsInfo/PicList/item)

MESSAGE_TYPES = frozenset({"text", "image", "voice", "video", "shortvideo", "location", "link", "file"})
# A Mini Program's customer-service chat also carries cards (小程序卡片); an Official Account never
# documents them, so there they stay unknown (kept with the raw XML).
MINIPROGRAM_MESSAGE_TYPES = MESSAGE_TYPES | {"miniprogrampage"}
KNOWN_EVENTS = frozenset(
    {
        "subscribe", "unsubscribe", "scan", "click", "view", "location",
        "kf_create_session", "kf_close_session", "kf_switch_session",
        # Mini Program customer service: the user opened the chat (SessionFrom: the button's session-from).
        "user_enter_tempsession",
    }
)
_VOICE_TYPES = {"amr": "audio/amr", "speex": "audio/speex", "mp3": "audio/mpeg", "silk": "audio/silk"}

XmlValue = str | dict[str, Any] | list[Any]


def parse_callback_xml(data: str | bytes, *, max_bytes: int = DEFAULT_MAX_XML_BYTES) -> dict[str, Any]:
    """Parse a callback document into nested dicts, refusing DTDs, entities and external references.

    Leaves become strings, elements with children become dicts, repeated tags become lists.
    Raises :class:`TooLarge` past ``max_bytes`` (checked before parsing) and :class:`InvalidInput`
    for anything that is not a plain ``<xml>`` document.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise TooLarge(f"XML of {len(raw)} bytes exceeds {max_bytes}")
    try:
        root = fromstring(raw, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise InvalidInput(f"forbidden XML construct: {type(exc).__name__}") from None
    except ET.ParseError as exc:
        raise InvalidInput(f"malformed XML: {exc}") from None
    if root.tag != "xml":
        raise InvalidInput(f"root element is {root.tag!r}, not 'xml'")
    value = _element(root, 0)
    return value if isinstance(value, dict) else {}


def _element(node: ET.Element, depth: int) -> XmlValue:
    if depth > MAX_DEPTH:
        raise InvalidInput("XML nested too deeply")
    children = list(node)
    if not children:
        return node.text or ""
    result: dict[str, Any] = {}
    for child in children:
        value = _element(child, depth + 1)
        if child.tag in result:
            existing = result[child.tag]
            if isinstance(existing, list):
                existing.append(value)
            else:
                result[child.tag] = [existing, value]
        else:
            result[child.tag] = value
    return result


def _text(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    return value.strip() if isinstance(value, str) else None


def _float(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _sent_at(create_time: str | None) -> datetime | None:
    if create_time is None or not create_time.isdigit():
        return None
    try:
        return datetime.fromtimestamp(int(create_time), UTC)
    except (OverflowError, OSError, ValueError):
        return None


def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """Normalize one verified, decrypted callback (channel ``wechat`` or ``wecom``)."""
    plaintext = envelope.meta.get("plaintext")
    if not isinstance(plaintext, str | bytes):
        raise NormalizationError("envelope has no decrypted plaintext in meta['plaintext']")
    max_bytes = envelope.meta.get("max_xml_bytes", DEFAULT_MAX_XML_BYTES)
    fields = parse_callback_xml(plaintext, max_bytes=int(max_bytes))
    raw_xml = plaintext if isinstance(plaintext, str) else plaintext.decode("utf-8", "replace")
    return [message_from_fields(envelope, fields, raw_xml)]


def message_from_fields(envelope: RawEnvelope, fields: Mapping[str, Any], raw_xml: str) -> CanonicalMessage:
    """Build the canonical message from parsed callback fields."""
    wecom = envelope.channel == "wecom"
    msg_type = (_text(fields, "MsgType") or "").lower()
    sender = _text(fields, "FromUserName")
    create_time = _text(fields, "CreateTime")
    if not msg_type or not sender:
        raise NormalizationError("callback has no MsgType or FromUserName")

    extra: dict[str, Any] = {
        "msg_type": msg_type,
        "from_user": sender,
        "to_user": _text(fields, "ToUserName"),
        "create_time": create_time,
        "account": envelope.meta.get("account"),
        "mode": envelope.meta.get("mode"),
        "fields": dict(fields),
    }
    if wecom:
        extra["agent_id"] = _text(fields, "AgentID")

    identities = _identities(envelope, fields, sender, wecom)
    text: str | None = None
    media: list[MediaRef] = []
    kind = "message"
    external_id = _text(fields, "MsgId") or _text(fields, "MsgID")
    dedupe_key: str | None = None

    if msg_type == "event":
        kind = "event"
        event = _text(fields, "Event") or ""
        event_key = _text(fields, "EventKey")
        extra["event"] = event.lower()
        extra["event_key"] = event_key
        _event_fields(extra, fields, event.lower(), event_key)
        if event.lower() not in KNOWN_EVENTS:
            extra["xml"] = raw_xml
        # Events carry no id: WeChat documents FromUserName + CreateTime as the dedupe key.
        dedupe_key = f"event:{sender}:{create_time}:{event}:{event_key or ''}"
        # WeCom system events all come from "sys": the contact they concern tells them apart.
        subject = [_text(fields, name) or "" for name in ("ChangeType", "UserID", "ExternalUserID")]
        if any(subject):
            dedupe_key += ":" + ":".join(subject)
        external_id = None
    else:
        known = MINIPROGRAM_MESSAGE_TYPES if envelope.channel == "miniprogram" else MESSAGE_TYPES
        text = _message_fields(extra, fields, msg_type if msg_type in known else "", media)
        if msg_type not in known:
            extra["xml"] = raw_xml
        if external_id is None:
            dedupe_key = f"message:{sender}:{create_time}:{msg_type}"

    return CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=external_id,
        received_at=envelope.received_at,
        sent_at=_sent_at(create_time),
        kind=kind,
        identities=identities,
        text=text,
        media=tuple(media),
        extra=extra,
        dedupe_key=dedupe_key,
    )


def _identities(
    envelope: RawEnvelope, fields: Mapping[str, Any], sender: str, wecom: bool
) -> tuple[Identity, ...]:
    verified = envelope.signature_verified
    if wecom:
        corp_id = str(envelope.meta.get("corp_id") or "")
        external = _text(fields, "ExternalUserID")
        if external:
            # External-contact events come from "sys"; the customer is the external contact.
            return (Identity(kind=IdentityKind.WECOM_EXTERNAL_USERID, value=f"{corp_id}:{external}",
                             verified=verified),)
        return (Identity(kind=IdentityKind.WECOM_USERID, value=f"{corp_id}:{sender}", verified=verified),)
    app_id = str(envelope.meta.get("app_id") or "")
    result = [Identity(kind=IdentityKind.WECHAT_OPENID, value=f"{app_id}:{sender}", verified=verified)]
    union_id = _text(fields, "UnionId") or _text(fields, "UnionID")
    if union_id:
        result.append(Identity(kind=IdentityKind.WECHAT_UNIONID, value=union_id, verified=verified))
    return tuple(result)


def _message_fields(
    extra: dict[str, Any], fields: Mapping[str, Any], msg_type: str, media: list[MediaRef]
) -> str | None:
    """Fill ``extra`` and ``media`` for a message; return its text."""
    media_id = _text(fields, "MediaId")
    if msg_type == "text":
        content = fields.get("Content")
        # The customer's text exactly as sent (no stripping).
        return content if isinstance(content, str) else None
    if msg_type == "image":
        extra["pic_url"] = _text(fields, "PicUrl")
        if media_id:
            media.append(MediaRef(kind="image", ref=media_id))
        return None
    if msg_type == "voice":
        fmt = (_text(fields, "Format") or "").lower()
        extra["format"] = fmt or None
        if media_id:
            media.append(MediaRef(kind="voice", ref=media_id, content_type=_VOICE_TYPES.get(fmt)))
        recognition = _text(fields, "Recognition")
        extra["recognition"] = recognition
        return recognition or None
    if msg_type in ("video", "shortvideo"):
        extra["thumb_media_id"] = _text(fields, "ThumbMediaId")
        if media_id:
            media.append(MediaRef(kind="video", ref=media_id))
        return None
    if msg_type == "location":
        extra.update(
            latitude=_float(_text(fields, "Location_X")),
            longitude=_float(_text(fields, "Location_Y")),
            scale=_float(_text(fields, "Scale")),
            label=_text(fields, "Label"),
        )
        return extra["label"] or None
    if msg_type == "link":
        title, description, url = _text(fields, "Title"), _text(fields, "Description"), _text(fields, "Url")
        extra.update(title=title, description=description, url=url)
        return "\n".join(part for part in (title, description, url) if part) or None
    if msg_type == "file":
        title = _text(fields, "Title")
        extra.update(
            title=title,
            description=_text(fields, "Description"),
            file_key=_text(fields, "FileKey"),
            file_md5=_text(fields, "FileMd5"),
            file_size=_text(fields, "FileTotalLen"),
        )
        ref = media_id or _text(fields, "FileKey")
        if ref:
            media.append(MediaRef(kind="file", ref=ref, name=title))
        return None
    if msg_type == "miniprogrampage":
        # A Mini Program card the user sent from a page (小程序卡片): its title, page and thumbnail.
        title = _text(fields, "Title")
        extra.update(
            title=title,
            card_app_id=_text(fields, "AppId"),
            page_path=_text(fields, "PagePath"),
            thumb_url=_text(fields, "ThumbUrl"),
            thumb_media_id=_text(fields, "ThumbMediaId"),
        )
        if extra["thumb_media_id"]:
            # The card's cover, a temporary media file like an image message's.
            media.append(MediaRef(kind="image", ref=extra["thumb_media_id"], name="thumbnail"))
        return "\n".join(p for p in (title, extra["page_path"]) if p) or None
    # Unknown message type: keep whatever text it has.
    content = fields.get("Content")
    return content if isinstance(content, str) and content else None


def _event_fields(
    extra: dict[str, Any], fields: Mapping[str, Any], event: str, event_key: str | None
) -> None:
    if event == "subscribe" and event_key and event_key.startswith("qrscene_"):
        # Subscribed by scanning a parametric QR code: the scene follows the prefix.
        extra["scene_id"] = event_key[len("qrscene_"):]
        extra["ticket"] = _text(fields, "Ticket")
    elif event == "scan":
        extra["scene_id"] = event_key
        extra["ticket"] = _text(fields, "Ticket")
    elif event == "location":
        extra.update(
            latitude=_float(_text(fields, "Latitude")),
            longitude=_float(_text(fields, "Longitude")),
            precision=_float(_text(fields, "Precision")),
        )
    elif event == "view":
        extra["url"] = event_key
        extra["menu_id"] = _text(fields, "MenuId") or _text(fields, "MenuID")
    elif event in ("kf_create_session", "kf_close_session"):
        extra["kf_account"] = _text(fields, "KfAccount")
    elif event == "change_external_contact":
        extra["change_type"] = _text(fields, "ChangeType")
        extra["staff_userid"] = _text(fields, "UserID")
        extra["external_userid"] = _text(fields, "ExternalUserID")
    elif event == "user_enter_tempsession":
        extra["session_from"] = _text(fields, "SessionFrom")
    elif event == "kf_switch_session":
        extra["from_kf_account"] = _text(fields, "FromKfAccount")
        extra["to_kf_account"] = _text(fields, "ToKfAccount")


# The names gateway.registry.NORMALIZERS uses to replay quarantined messages.
normalize_wechat = normalize
normalize_wecom = normalize

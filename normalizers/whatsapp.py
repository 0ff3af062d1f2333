"""WhatsApp Cloud API webhooks -> canonical messages (pure).

One envelope holds a Meta webhook body (``"object": "whatsapp_business_account"``) exactly as
signed, or the part of one that a single inbox receives (the connector splits a body whose changes
go to several phone numbers). Every ``entry`` and every ``changes`` item is read; each item of
``value.messages`` becomes one message. ``statuses`` are reports on our own replies: the connector
turns them into ``reply.delivered`` / ``reply.read`` / ``reply.failed``, so they yield nothing here,
as do the account, template and call fields.

Idempotency: the ``wamid`` is the external id (WhatsApp retries a webhook for up to 7 days, and the
gateway keeps keys 8). An ``edit`` keeps the original's wamid as its external id and is keyed by its
own wamid (``edit:{wamid}``), so each edit is one ``message.edited`` event naming the original.

Identity: the sender's ``wa_id`` (``whatsapp``) and the E.164 phone it is (``phone``), both verified
because Meta signed the body: WhatsApp proves the customer holds that number. A contact card the
customer shares is content, never an identity.

Kinds: text, image, video, audio and voice, document, sticker (provider-held media, fetched by id
after the commit), location, contacts, interactive button / list / flow replies, template quick-reply
buttons, orders, replies (``context``), referrals (click-to-WhatsApp ads) are messages; reactions,
revokes (deleted messages), system notices and unsupported types are ``event`` messages whose
``extra.event`` says which. Echoes of the business's own messages (``smb_message_echoes``, sent from
the WhatsApp Business app) are ignored, or kept as ``agent_message`` when configured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, TypedDict, cast

import orjson
import phonenumbers

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope

CHANNEL = "whatsapp"
OBJECT = "whatsapp_business_account"
Echoes = Literal["ignore", "record"]

# type -> (our media kind, default content type)
MEDIA_TYPES: dict[str, tuple[str, str | None]] = {
    "image": ("image", "image/jpeg"),
    "video": ("video", "video/mp4"),
    "audio": ("audio", "audio/ogg"),
    "document": ("file", None),
    "sticker": ("sticker", "image/webp"),
}


class Metadata(TypedDict, total=False):
    display_phone_number: str
    phone_number_id: str


class Profile(TypedDict, total=False):
    name: str
    username: str


class Contact(TypedDict, total=False):
    profile: Profile
    wa_id: str
    user_id: str


class Context(TypedDict, total=False):
    id: str
    forwarded: bool
    frequently_forwarded: bool
    referred_product: dict[str, Any]


class Media(TypedDict, total=False):
    id: str
    mime_type: str
    sha256: str
    caption: str
    filename: str
    voice: bool
    animated: bool
    url: str


class Message(TypedDict, total=False):
    id: str
    timestamp: str
    type: str
    context: Context
    text: dict[str, Any]
    image: Media
    video: Media
    audio: Media
    document: Media
    sticker: Media
    location: dict[str, Any]
    contacts: list[dict[str, Any]]
    interactive: dict[str, Any]
    button: dict[str, Any]
    reaction: dict[str, Any]
    order: dict[str, Any]
    referral: dict[str, Any]
    system: dict[str, Any]
    identity: dict[str, Any]
    errors: list[dict[str, Any]]
    unsupported: dict[str, Any]
    edit: dict[str, Any]
    revoke: dict[str, Any]
    to: str
    from_user_id: str


class Value(TypedDict, total=False):
    messaging_product: str
    metadata: Metadata
    contacts: list[Contact]
    messages: list[Message]
    message_echoes: list[Message]
    statuses: list[dict[str, Any]]
    errors: list[dict[str, Any]]


class Change(TypedDict, total=False):
    field: str
    value: Value


class Entry(TypedDict, total=False):
    id: str
    changes: list[Change]


class Body(TypedDict, total=False):
    object: str
    entry: list[Entry]


def parse_body(body: bytes) -> Body:
    """The webhook object; ``InvalidInput`` (400) when the body is not a JSON object."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body is not a JSON object")
    return cast(Body, data)


def changes(body: Body) -> Iterator[tuple[Entry, Change]]:
    """Every (entry, change) of the body; a malformed shape is quarantined, never skipped."""
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise NormalizationError("the webhook has no entry list")
    for entry in entries:
        if not isinstance(entry, dict):
            raise NormalizationError("an entry is not an object")
        items = entry.get("changes", [])
        if not isinstance(items, list):
            raise NormalizationError("an entry's changes is not a list")
        for change in items:
            if not isinstance(change, dict) or not isinstance(change.get("value", {}), dict):
                raise NormalizationError("a change is not an object with an object value")
            yield entry, change


def normalize(envelope: RawEnvelope, *, echoes: Echoes = "ignore") -> Sequence[CanonicalMessage]:
    """Every customer message of a verified WhatsApp webhook body (statuses and the rest yield nothing)."""
    body = parse_body(envelope.body)
    if body.get("object") != OBJECT:
        raise NormalizationError(f"not a WhatsApp webhook (object {body.get('object')!r})")
    out: list[CanonicalMessage] = []
    for entry, change in changes(body):
        value = change.get("value") or {}
        metadata = value.get("metadata") or {}
        names = _profiles(value.get("contacts"))
        # WhatsApp puts the errors of a message it could not fully deliver beside the messages.
        errors = value.get("errors")
        for message in _list(value.get("messages"), "messages"):
            if errors and isinstance(message, dict) and "errors" not in message:
                message = cast(Message, {**message, "errors": errors})
            canonical = _message(envelope, entry, metadata, names, message)
            if canonical is not None:
                out.append(canonical)
        if echoes == "record":
            for echo in _list(value.get("message_echoes"), "message_echoes"):
                recorded = _echo(envelope, entry, metadata, echo)
                if recorded is not None:
                    out.append(recorded)
    return out


def configure(echoes: Echoes) -> Callable[[RawEnvelope], Sequence[CanonicalMessage]]:
    """The normalizer under the channel's ``echoes`` setting."""
    return partial(normalize, echoes=echoes)


def _message(
    envelope: RawEnvelope, entry: Entry, metadata: Metadata, names: Mapping[str, Profile], message: Message
) -> CanonicalMessage | None:
    wamid, kind = message.get("id"), message.get("type")
    sender = cast(dict[str, Any], message).get("from")
    if not isinstance(wamid, str) or not wamid:
        raise NormalizationError("a WhatsApp message has no id")
    if kind == "request_welcome":
        return None  # the customer opened the chat for the first time: nothing said yet
    user_id = message.get("from_user_id")
    if not (isinstance(sender, str) and sender) and not (isinstance(user_id, str) and user_id):
        raise NormalizationError(f"WhatsApp message {wamid} names no sender")
    verified = envelope.signature_verified
    identities = _identities(sender, user_id, verified)
    profile = names.get(sender) if isinstance(sender, str) else None
    extra: dict[str, Any] = {
        "phone_number_id": metadata.get("phone_number_id"),
        "display_phone_number": metadata.get("display_phone_number"),
        "waba_id": entry.get("id"),
        "wa_id": sender,
        "type": kind,
    }
    if isinstance(user_id, str):
        extra["user_id"] = user_id
    if profile is not None and profile.get("username"):
        extra["username"] = profile["username"]
    base = CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=wamid,
        received_at=envelope.received_at,
        sent_at=_timestamp(message.get("timestamp")),
        identities=identities,
        display_name=(profile or {}).get("name") or None,
        extra=extra,
    )
    context = message.get("context")
    if isinstance(context, dict):
        kept = ("from", "id", "forwarded", "frequently_forwarded", "referred_product")
        extra["context"] = {k: v for k, v in cast(dict[str, Any], context).items() if k in kept}
        replied = context.get("id")
        if isinstance(replied, str) and replied:
            base = replace(base, in_reply_to=replied)
    if isinstance(message.get("referral"), dict):
        extra["referral"] = message["referral"]
    if message.get("errors"):
        extra["errors"] = message["errors"]
    if kind == "edit":
        return _edit(envelope, entry, metadata, names, message, base)
    return _content(base, message, str(kind), extra)


def _content(base: CanonicalMessage, message: Message, kind: str, extra: dict[str, Any]) -> CanonicalMessage:
    """The message's content by type; an unknown type is an explicit ``unsupported`` event."""
    raw = cast(dict[str, Any], message)
    if kind == "text":
        body = (message.get("text") or {}).get("body")
        return replace(base, text=body if isinstance(body, str) else None)
    if kind in MEDIA_TYPES:
        return _media(base, kind, raw.get(kind), extra)
    if kind == "location":
        location = message.get("location") or {}
        extra["location"] = location
        parts = [location.get("name"), location.get("address")]
        return replace(base, text="\n".join(p for p in parts if isinstance(p, str) and p) or None)
    if kind == "contacts":
        cards = message.get("contacts") or []
        extra["contacts"] = cards
        return replace(base, text=_cards_text(cards))
    if kind == "interactive":
        return _interactive(base, message.get("interactive"), extra)
    if kind == "button":
        button = message.get("button") or {}
        extra["button"] = button
        return replace(base, text=button.get("text") or None)
    if kind == "order":
        order = message.get("order") or {}
        extra["order"] = order
        return replace(base, text=order.get("text") or None)
    if kind == "reaction":
        return _reaction(base, message.get("reaction") or {}, extra)
    if kind == "revoke":
        return _revoke(base, message.get("revoke") or {}, extra)
    if kind == "system":
        return _system(base, message, extra)
    # "unsupported", "unknown" and types newer than this code: kept, marked, never dropped.
    extra["event"] = "unsupported"
    extra["unsupported"] = {"type": (message.get("unsupported") or {}).get("type") or kind}
    return replace(base, kind="event")


def _media(base: CanonicalMessage, kind: str, media: object, extra: dict[str, Any]) -> CanonicalMessage:
    our_kind, default_type = MEDIA_TYPES[kind]
    if not isinstance(media, dict) or not isinstance(media.get("id"), str) or not media["id"]:
        # A media message without a media id (Meta's "interactive with error" shape): keep the marker.
        extra["media_missing"] = True
        return base
    info = cast(Media, media)
    if kind == "audio" and info.get("voice"):
        our_kind = "voice"
    extra["media"] = {
        k: info[k] for k in ("id", "mime_type", "sha256", "voice", "animated", "url") if k in info
    }
    ref = MediaRef(
        kind=our_kind,
        ref=info["id"],
        name=info.get("filename") or None,
        content_type=info.get("mime_type") or default_type,
    )
    caption = info.get("caption")
    return replace(base, media=(ref,), text=caption if isinstance(caption, str) and caption else None)


def _interactive(base: CanonicalMessage, interactive: object, extra: dict[str, Any]) -> CanonicalMessage:
    if not isinstance(interactive, dict):
        # WhatsApp could not deliver the interactive content (it says so in ``errors``).
        extra["event"] = "unsupported"
        extra["unsupported"] = {"type": "interactive"}
        return replace(base, kind="event")
    extra["interactive"] = interactive
    kind = interactive.get("type")
    reply = interactive.get(kind) if isinstance(kind, str) else None
    if not isinstance(reply, dict):
        return base
    if kind == "call_permission_reply":  # the customer allowed (or refused) our calls
        extra["event"] = "call_permission_reply"
        extra["call_permission"] = reply
        return replace(base, kind="event")
    if kind == "nfm_reply":  # a WhatsApp Flow's answer
        response = reply.get("response_json")
        if isinstance(response, str):
            try:
                answers = orjson.loads(response)
            except orjson.JSONDecodeError:
                answers = response
            if isinstance(answers, dict) and "flow_token" in answers:
                answers = dict(answers)
                extra["flow_token"] = answers.pop("flow_token")
            extra["flow_response"] = answers
        return replace(base, text=reply.get("body") or reply.get("name") or None)
    parts = [reply.get("title"), reply.get("description")]
    return replace(base, text="\n".join(p for p in parts if isinstance(p, str) and p) or None)


def _reaction(base: CanonicalMessage, reaction: dict[str, Any], extra: dict[str, Any]) -> CanonicalMessage:
    emoji = reaction.get("emoji") or None
    target = reaction.get("message_id")
    extra["event"] = "reaction" if emoji else "reaction_removed"
    extra["reaction"] = {"message_id": target, "emoji": emoji}
    return replace(
        base,
        kind="event",
        text=emoji,
        in_reply_to=target if isinstance(target, str) and target else base.in_reply_to,
    )


def _revoke(base: CanonicalMessage, revoke: dict[str, Any], extra: dict[str, Any]) -> CanonicalMessage:
    original = revoke.get("original_message_id")
    extra["event"] = "message_deleted"
    if isinstance(original, str) and original:
        deleted = replace(base, external_id=original, extra={}).message_id()
        extra["deletes"] = {"external_id": original, "message_id": deleted}
        # A message.deleted event, placed in the deleted message's thread.
        return replace(base, kind="event", in_reply_to=original, delete_of=deleted)
    return replace(base, kind="event")


def _system(base: CanonicalMessage, message: Message, extra: dict[str, Any]) -> CanonicalMessage:
    system = message.get("system") or {}
    extra["event"] = str(system.get("type") or "system")
    extra["system"] = system
    if isinstance(message.get("identity"), dict):
        extra["identity"] = message["identity"]
    identities = base.identities
    new_wa_id = system.get("wa_id") or system.get("new_wa_id")
    if system.get("type") in ("user_changed_number", "customer_changed_number") and isinstance(
        new_wa_id, str
    ):
        # Meta says this person now writes from the new number: the same customer, proven by WhatsApp.
        identities += _identities(new_wa_id, None, base.identities[0].verified if identities else False)
    return replace(base, kind="event", text=system.get("body") or None, identities=identities)


def _edit(
    envelope: RawEnvelope,
    entry: Entry,
    metadata: Metadata,
    names: Mapping[str, Profile],
    message: Message,
    base: CanonicalMessage,
) -> CanonicalMessage:
    edit = message.get("edit") or {}
    original = edit.get("original_message_id")
    inner = edit.get("message")
    if not isinstance(original, str) or not original or not isinstance(inner, dict):
        raise NormalizationError(f"WhatsApp edit {message.get('id')} lacks original_message_id or message")
    extra = dict(base.extra)
    extra["type"] = inner.get("type")
    extra["edit"] = {"wamid": message.get("id"), "original_message_id": original}
    inner_context = inner.get("context")
    if isinstance(inner_context, dict):
        extra.setdefault("context", inner_context)
    edited = _content(replace(base, extra=extra), cast(Message, inner), str(inner.get("type")), extra)
    original_id = replace(base, external_id=original, extra={}).message_id()
    return replace(
        edited,
        external_id=original,
        edit_of=original_id,
        dedupe_key=f"edit:{message.get('id')}",
        in_reply_to=None,
    )


def _echo(envelope: RawEnvelope, entry: Entry, metadata: Metadata, echo: Message) -> CanonicalMessage | None:
    """A message the business sent from the WhatsApp Business app, kept as an agent's message."""
    wamid, recipient = echo.get("id"), echo.get("to")
    if not isinstance(wamid, str) or not wamid:
        raise NormalizationError("a WhatsApp echo has no id")
    if not isinstance(recipient, str) or not recipient:
        return None
    extra: dict[str, Any] = {
        "phone_number_id": metadata.get("phone_number_id"),
        "display_phone_number": metadata.get("display_phone_number"),
        "waba_id": entry.get("id"),
        "wa_id": recipient,
        "type": echo.get("type"),
        "echo": True,
    }
    base = CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=wamid,
        received_at=envelope.received_at,
        sent_at=_timestamp(echo.get("timestamp")),
        kind="agent_message",
        identities=_identities(recipient, None, envelope.signature_verified),
        extra=extra,
    )
    kind = str(echo.get("type"))
    if kind == "edit":
        inner = (echo.get("edit") or {}).get("message")
        original = (echo.get("edit") or {}).get("original_message_id")
        if isinstance(inner, dict) and isinstance(original, str):
            edited = _content(base, cast(Message, inner), str(inner.get("type")), extra)
            return replace(
                edited,
                kind="agent_message",
                external_id=original,
                dedupe_key=f"edit:{wamid}",
                edit_of=replace(base, external_id=original, extra={}).message_id(),
            )
    content = _content(base, echo, kind, extra)
    return content if content.kind == "event" else replace(content, kind="agent_message")


def _identities(wa_id: object, user_id: object, verified: bool) -> tuple[Identity, ...]:
    found: list[Identity] = []
    if isinstance(wa_id, str) and wa_id:
        found.append(Identity(kind=IdentityKind.WHATSAPP, value=wa_id, verified=verified))
        phone = e164(wa_id)
        if phone is not None:
            found.append(Identity(kind=IdentityKind.PHONE, value=phone, verified=verified))
    elif isinstance(user_id, str) and user_id:
        # A business-scoped user id (a customer known by username only): no phone number to link.
        found.append(Identity(kind=IdentityKind.WHATSAPP, value=user_id, verified=verified))
    return tuple(found)


def e164(wa_id: str) -> str | None:
    """A wa_id is the customer's number in international form without ``+``."""
    if not wa_id.isdigit():
        return None
    try:
        number = phonenumbers.parse(f"+{wa_id}", None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _profiles(contacts: object) -> dict[str, Profile]:
    names: dict[str, Profile] = {}
    if isinstance(contacts, list):
        for contact in contacts:
            if isinstance(contact, dict) and isinstance(contact.get("wa_id"), str):
                profile = contact.get("profile")
                names[contact["wa_id"]] = cast(Profile, profile if isinstance(profile, dict) else {})
    return names


def _cards_text(cards: object) -> str | None:
    lines: list[str] = []
    if isinstance(cards, list):
        for card in cards:
            if not isinstance(card, dict):
                continue
            name = (
                (card.get("name") or {}).get("formatted_name") if isinstance(card.get("name"), dict) else None
            )
            phones = [
                p.get("phone") for p in card.get("phones") or [] if isinstance(p, dict) and p.get("phone")
            ]
            line = " ".join(str(p) for p in [name, *phones] if p)
            if line:
                lines.append(line)
    return "\n".join(lines) or None


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise NormalizationError(f"{where} is not a list")
    return value


def _timestamp(value: object) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(cast(str, value)), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


# The name quarantine replay and the descriptor use.
normalize_whatsapp = normalize

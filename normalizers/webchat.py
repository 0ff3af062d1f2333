"""Web-chat messages -> one canonical message (pure).

A message reaches the gateway either as a JSON frame on the widget's socket (or ``POST
/chat/<inbox>/messages``): ``{"type": "message", "client_id": "...", "text": "...", "sent_at":
"..."}``, or as a ``multipart/form-data`` upload with the fields ``client_id``, ``text`` (optional),
``sent_at`` (optional) and one or more files. The connector has already checked the visitor's
session token (and the site's identity signature) and says who the visitor is in ``envelope.meta``:
``session``, ``conversation``, and for a signed-in visitor ``user_id`` (and ``email``).

Idempotency: the widget gives every message a random ``client_id`` and sends it again, unchanged,
until the gateway confirms the commit; ``external_id = "{session}:{client_id}"``, so a resend after a
reconnect is a duplicate and makes no second event.

Identities: the session's ``webchat_visitor`` (``{inbox}:{session}``, verified: the gateway minted
the session); for a signed-in visitor the site's user id as ``external`` (``{inbox}:{user_id}``, the
same identity the API channel gives a caller's customer id) and the email the site signed, both
verified. An anonymous session is its own thread (``thread_ref = "session:{session}"``); a signed-in
visitor's chat joins that customer's open thread in the inbox.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from core.errors import InvalidInput, TooLarge
from core.model import Attachment, CanonicalMessage, Identity, IdentityKind, RawEnvelope
from normalizers.form import parse_form

CHANNEL = "webchat"
DEFAULT_MAX_TEXT = 5_000
MAX_NAME = 200
CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def _sent_at(value: object) -> datetime | None:
    """The widget's clock when the visitor pressed send (kept as told; ``None`` when unreadable)."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_frame(body: bytes) -> Mapping[str, Any]:
    """A JSON frame as a mapping; ``InvalidInput`` when it is not one."""
    try:
        frame = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("the message is not JSON") from None
    if not isinstance(frame, dict):
        raise InvalidInput("the message is not a JSON object")
    return frame


def client_id_of(value: object) -> str:
    if not isinstance(value, str) or not CLIENT_ID.match(value):
        raise InvalidInput("client_id must be 8-64 letters, digits, '-' or '_'")
    return value


def _content(envelope: RawEnvelope) -> tuple[str, str | None, object, tuple[Attachment, ...]]:
    """client_id, text, sent_at and files of the envelope's body."""
    media_type = (envelope.content_type or "application/json").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        submission = parse_form(envelope.body, envelope.content_type)
        return (
            client_id_of(submission.get("client_id")),
            submission.get("text") or None,
            submission.get("sent_at") or None,
            submission.attachments,
        )
    if media_type != "application/json":
        raise InvalidInput(f"unsupported content type {media_type!r}", status=415)
    frame = parse_frame(envelope.body)
    if frame.get("type", "message") != "message":
        raise InvalidInput("only message frames are messages")
    text = frame.get("text")
    if text is not None and not isinstance(text, str):
        raise InvalidInput("text must be a string")
    return client_id_of(frame.get("client_id")), text, frame.get("sent_at"), ()


def normalize_webchat(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    meta = envelope.meta
    session = meta.get("session")
    if not isinstance(session, str) or not session:
        raise InvalidInput("the message names no visitor session", status=401)
    client_id, text, sent_at, files = _content(envelope)
    text = text.strip() if text else None
    limit = meta.get("max_text_chars")
    limit = limit if isinstance(limit, int) and limit > 0 else DEFAULT_MAX_TEXT
    if text is not None and len(text) > limit:
        raise TooLarge(f"the message has {len(text)} characters; the limit is {limit}")
    if not text and not files:
        raise InvalidInput("the message has neither text nor a file")
    verified = envelope.signature_verified
    identities = [
        Identity(kind=IdentityKind.WEBCHAT_VISITOR, value=f"{envelope.inbox}:{session}", verified=verified)
    ]
    user_id, email = meta.get("user_id"), meta.get("email")
    signed_in = isinstance(user_id, str) and bool(user_id)
    if signed_in:
        identities.append(
            Identity(kind=IdentityKind.EXTERNAL, value=f"{envelope.inbox}:{user_id}", verified=verified)
        )
        if isinstance(email, str) and email:
            identities.append(Identity(kind=IdentityKind.EMAIL, value=email, verified=verified))
    name = meta.get("name")
    conversation = meta.get("conversation")
    extra: dict[str, Any] = {
        "session": session,
        "conversation": conversation if isinstance(conversation, str) else f"s:{session}",
        "client_id": client_id,
    }
    page = meta.get("page")
    if isinstance(page, str) and page:
        extra["page"] = page[:2000]
    return [
        CanonicalMessage(
            channel=CHANNEL,
            tenant=envelope.tenant,
            inbox=envelope.inbox,
            external_id=f"{session}:{client_id}",
            received_at=envelope.received_at,
            sent_at=_sent_at(sent_at),
            identities=tuple(identities),
            display_name=name.strip()[:MAX_NAME] or None if isinstance(name, str) else None,
            text=text,
            attachments=tuple(files),
            thread_ref=None if signed_in else f"session:{session}",
            extra=extra,
        )
    ]

"""Slack Events API callbacks -> canonical messages (pure).

One envelope holds one callback exactly as Slack sent it: the HTTP body of an Events API request
(``meta.transport = "events_api"``), or the text of one Socket Mode envelope (``"socket"``), whose
``payload`` is the same callback. Slack sends one event per callback; the normalizer returns every
message that event makes (none or one).

What becomes a message (``Policy``, per inbox from the settings):

- ``message`` events (plain, ``file_share``, ``thread_broadcast``, ``me_message``) in a direct
  message to the app (``D…`` channels, and group DMs the app is in) and in the configured channels;
- ``app_mention`` events in any channel (the app was addressed);
- ``message_changed`` as an edit (``CanonicalMessage.edit_of``, event ``message.edited``) and
  ``message_deleted`` as a deletion (``delete_of``, event ``message.deleted``) of such a message.

Everything else (reactions, joins, ``app_home_opened``, ``tokens_revoked`` ...) yields nothing and
is answered as accepted. Messages of bots are never tickets: ``bot_id`` (every message a bot token
posts, the gateway's own replies included), ``subtype = bot_message``, or our own ``app_id``, so
the gateway's replies cannot loop back. (``authorizations`` says whom an event is visible to, not
who the bot is: it is not used for this.)

Idempotency: ``{channel}:{ts}`` is the external id. Slack's ``event_id`` names one delivery of one
event; a mention in a channel the app follows arrives twice (``message`` and ``app_mention``, two
event ids) and must make one ticket, and every retry of an ``event_id`` carries the same channel
and ts. An edit is keyed by its ``edited.ts``, a deletion by the deleted ts.

Identity: ``slack`` ``{team}:{user}`` of the author, verified when the request's signature was
(Socket Mode: the authenticated socket), with the author's own team: in a Slack Connect channel an
external user's team differs from ours (``extra.external = true``). The profile email the connector
looked up (``meta.profiles``) is an ``email`` identity, claimed: Slack vouches for the account, the
gateway did not check the address.

Threads: a message's ``thread_ts`` (or its own ts in a channel, which starts a Slack thread) is the
thread reference ``{channel}:{thread_ts}``; a direct message outside a Slack thread joins the
customer's open thread by the window.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

import orjson

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, Identity, IdentityKind, MediaRef, RawEnvelope

CHANNEL = "slack"
# Subtypes of ``message`` that are a person writing; others (joins, topics, pins ...) are not tickets.
CUSTOMER_SUBTYPES = frozenset({None, "file_share", "thread_broadcast", "me_message"})
EDIT, DELETE = "message_changed", "message_deleted"
# Files Slack cannot hand over: a tombstone of a deleted file, one past the workspace's plan limit.
UNFETCHABLE_FILE_MODES = frozenset({"tombstone", "hidden_by_limit"})


class File(TypedDict, total=False):
    id: str
    name: str
    title: str
    mimetype: str
    filetype: str
    size: int
    mode: str
    file_access: str
    url_private: str
    url_private_download: str


class Edited(TypedDict, total=False):
    user: str
    ts: str


class Message(TypedDict, total=False):
    type: str
    subtype: str
    text: str
    user: str
    team: str
    user_team: str
    source_team: str
    bot_id: str
    ts: str
    thread_ts: str
    parent_user_id: str
    edited: Edited
    files: list[File]
    hidden: bool


class Event(Message, total=False):
    channel: str
    channel_type: str
    event_ts: str
    deleted_ts: str
    message: Message
    previous_message: Message


class Authorization(TypedDict, total=False):
    team_id: str
    enterprise_id: str
    user_id: str
    is_bot: bool


class Callback(TypedDict, total=False):
    type: str
    team_id: str
    enterprise_id: str
    api_app_id: str
    event: Event
    event_id: str
    event_time: int
    authorizations: list[Authorization]
    authed_users: list[str]
    is_ext_shared_channel: bool
    challenge: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Which conversations of one workspace become tickets."""

    channels: frozenset[str] = frozenset()
    all_channels: bool = False  # "*": every channel the app is a member of
    direct_messages: bool = True
    mentions: bool = True

    def follows(self, channel: str) -> bool:
        return self.all_channels or channel in self.channels


ACCEPT_ALL = Policy(all_channels=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Author:
    """Who wrote the message an event is about (``users.info`` is asked about them)."""

    team: str
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """What one callback is: its event's kind, and the author when it would make a message."""

    kind: str  # "message", "edit", "delete", "ignored:<why>"
    author: Author | None = None
    event: Event = field(default_factory=lambda: cast(Event, {}))


def parse(body: bytes, *, socket: bool = False) -> Callback:
    """The callback object; ``InvalidInput`` (400) when the body is not one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("the body is not valid JSON") from None
    if socket:
        data = data.get("payload") if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise InvalidInput("the body is not a JSON object")
    return cast(Callback, data)


def our_team(callback: Callback) -> str | None:
    """The workspace the app is installed in (Slack Connect: the user's team may differ)."""
    for authorization in callback.get("authorizations") or ():
        if isinstance(authorization, dict) and isinstance(authorization.get("team_id"), str):
            return authorization["team_id"]
    team = callback.get("team_id")
    return team if isinstance(team, str) else None


def read(callback: Callback, policy: Policy = ACCEPT_ALL) -> Reading:
    """Classify a callback without building anything (the connector asks this before users.info)."""
    if callback.get("type") != "event_callback":
        return Reading(kind=f"ignored:{callback.get('type') or 'untyped'}")
    event = callback.get("event")
    if not isinstance(event, dict):
        raise NormalizationError("the event_callback has no event object")
    event_type = event.get("type")
    channel = event.get("channel")
    if event_type not in ("message", "app_mention"):
        return Reading(kind=f"ignored:{event_type}", event=event)
    if not isinstance(channel, str) or not channel:
        raise NormalizationError(f"the {event_type} event has no channel")
    subtype = event.get("subtype")
    if subtype is not None and not isinstance(subtype, str):
        raise NormalizationError(f"the {event_type} event's subtype is not a string")
    if event_type == "app_mention":
        if not policy.mentions:
            return Reading(kind="ignored:mentions_off", event=event)
    elif not _followed(channel, event.get("channel_type"), policy):
        return Reading(kind="ignored:channel_not_followed", event=event)
    kind, subject = "message", cast(Message, event)
    if _by_bot(subject, callback):
        return Reading(kind="ignored:bot", event=event)
    if subtype == EDIT:
        kind, subject = "edit", _inner(event, "message")
    elif subtype == DELETE:
        kind, subject = "delete", _inner(event, "previous_message")
    elif subtype not in CUSTOMER_SUBTYPES:
        return Reading(kind=f"ignored:{subtype}", event=event)
    if _by_bot(subject, callback):
        return Reading(kind="ignored:bot", event=event)
    user = subject.get("user")
    if not isinstance(user, str) or not user:
        return Reading(kind="ignored:no_user", event=event)
    if kind == "edit" and not _really_edited(event):
        # Slack also sends message_changed when it unfurls a link or a bot adds an attachment.
        return Reading(kind="ignored:unfurl", event=event)
    team = _author_team(subject, event, callback)
    if team is None:
        raise NormalizationError(f"the {event_type} event names no team for its author")
    return Reading(kind=kind, author=Author(team=team, user=user), event=event)


def normalize_with(
    policy_for: Callable[[str], Policy],
) -> Callable[[RawEnvelope], Sequence[CanonicalMessage]]:
    """A normalizer whose policy comes from the inbox (the connector's ``configure`` builds it from
    the settings)."""

    def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
        callback = parse(envelope.body, socket=envelope.meta.get("transport") == "socket")
        reading = read(callback, policy_for(envelope.inbox))
        if reading.author is None:
            return ()
        return (_canonical(envelope, callback, reading, reading.author),)

    return normalize


def _canonical(
    envelope: RawEnvelope, callback: Callback, reading: Reading, author: Author
) -> CanonicalMessage:
    event = reading.event
    channel = event["channel"]
    subject: Message = cast(Message, event)
    if reading.kind == "edit":
        subject = _inner(event, "message")
    elif reading.kind == "delete":
        subject = _inner(event, "previous_message")
    ts = subject.get("ts") or (event.get("deleted_ts") if reading.kind == "delete" else None)
    if reading.kind == "edit" and not ts:
        # Some edits omit message.ts; the previous message is the same message.
        ts = event.get("previous_message", {}).get("ts")
    if not isinstance(ts, str) or _timestamp(ts) is None:
        raise NormalizationError(f"the {event.get('type')} event has no valid ts")
    team = our_team(callback)
    profile = _profile(envelope.meta, author)
    identities = [Identity(
        kind=IdentityKind.SLACK, value=f"{author.team}:{author.user}", verified=envelope.signature_verified,
    )]
    email = profile.get("email")
    if isinstance(email, str) and "@" in email:
        identities.append(Identity(kind=IdentityKind.EMAIL, value=email, verified=False))
    thread_ts = subject.get("thread_ts")
    direct = _direct(channel, event.get("channel_type"))
    thread_ref = None
    if isinstance(thread_ts, str) and thread_ts:
        thread_ref = f"{channel}:{thread_ts}"
    elif not direct:
        thread_ref = f"{channel}:{ts}"  # a top-level channel message starts its own Slack thread
    in_reply_to = f"{channel}:{thread_ts}" if isinstance(thread_ts, str) and thread_ts != ts else None
    extra: dict[str, Any] = {
        "event_id": callback.get("event_id"),
        "event_type": event.get("type"),
        "subtype": event.get("subtype"),
        "team": author.team,
        "user": author.user,
        "our_team": team,
        "external": team is not None and author.team != team,
        "channel": channel,
        "channel_type": event.get("channel_type") or ("im" if direct else None),
        "ts": ts,
        "thread_ts": thread_ts if isinstance(thread_ts, str) else None,
        "api_app_id": callback.get("api_app_id"),
    }
    if callback.get("enterprise_id"):
        extra["enterprise_id"] = callback.get("enterprise_id")
    reason = envelope.meta.get("retry_reason")
    if envelope.retry or reason:
        extra["retry"] = {"num": envelope.retry, "reason": reason}
    text = subject.get("text")
    plain = to_plain(text) if isinstance(text, str) and text else None
    if plain is not None and plain != text:
        extra["mrkdwn"] = text
    media = _files(subject, extra) if reading.kind != "delete" else ()
    base = CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=f"{channel}:{ts}",
        received_at=envelope.received_at,
        sent_at=_timestamp(ts),
        identities=tuple(identities),
        display_name=_name(profile),
        text=plain,
        media=media,
        in_reply_to=in_reply_to,
        thread_ref=thread_ref,
        extra=extra,
    )
    if reading.kind == "edit":
        edited = subject.get("edited")
        edit_ts = edited.get("ts") if isinstance(edited, dict) else None
        if not isinstance(edit_ts, str) or not edit_ts:
            edit_ts = event.get("ts") or event.get("event_ts")
        extra["edited_ts"] = edit_ts
        return replace(
            base, edit_of=base.message_id(), sent_at=_timestamp(str(edit_ts)) or base.sent_at,
            dedupe_key=f"edit:{channel}:{ts}:{edit_ts}",
        )
    if reading.kind == "delete":
        deleted_at = event.get("event_ts") or event.get("ts")
        extra["deleted_at"] = deleted_at
        return replace(
            base, text=None, media=(), delete_of=base.message_id(),
            sent_at=_timestamp(str(deleted_at)) or base.sent_at, dedupe_key=f"delete:{channel}:{ts}",
        )
    return base


def _followed(channel: str, channel_type: object, policy: Policy) -> bool:
    if _direct(channel, channel_type):
        return policy.direct_messages
    return policy.follows(channel)


def _direct(channel: str, channel_type: object) -> bool:
    """A direct message (``D…``, ``channel_type = im``) or a group DM (``mpim``)."""
    return channel_type in ("im", "mpim") or channel.startswith("D")


def _inner(event: Event, name: str) -> Message:
    inner = event.get(name)
    if not isinstance(inner, dict):
        raise NormalizationError(f"the {event.get('subtype')} event has no {name} object")
    return cast(Message, inner)


def _by_bot(message: Message, callback: Callback) -> bool:
    """A bot's message: ``bot_id`` (every message a bot token posts has one, ours included),
    ``subtype = bot_message`` (classic bots, webhooks), or one our own app posted (``app_id``)."""
    if message.get("bot_id") or message.get("subtype") == "bot_message":
        return True
    app = cast(dict[str, Any], message).get("app_id")
    return isinstance(app, str) and app == callback.get("api_app_id")


def _really_edited(event: Event) -> bool:
    new, old = event.get("message"), event.get("previous_message")
    if isinstance(new, dict) and isinstance(new.get("edited"), dict):
        return True
    if not isinstance(old, dict) or not isinstance(new, dict):
        return True
    files_now, files_before = new.get("files"), old.get("files")
    count_now = len(files_now) if isinstance(files_now, list) else 0
    count_before = len(files_before) if isinstance(files_before, list) else 0
    return new.get("text") != old.get("text") or count_now != count_before


def _author_team(message: Message, event: Event, callback: Callback) -> str | None:
    for value in (message.get("user_team"), message.get("team"), event.get("user_team"), event.get("team"),
                  message.get("source_team"), our_team(callback)):
        if isinstance(value, str) and value:
            return value
    return None


def _profile(meta: Mapping[str, Any], author: Author) -> Mapping[str, Any]:
    profiles = meta.get("profiles")
    found = profiles.get(f"{author.team}:{author.user}") if isinstance(profiles, Mapping) else None
    return found if isinstance(found, Mapping) else {}


def _name(profile: Mapping[str, Any]) -> str | None:
    for key in ("display_name", "real_name"):
        value = profile.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _files(message: Message, extra: dict[str, Any]) -> tuple[MediaRef, ...]:
    """The message's files, fetched by id after the commit; tombstones are listed in ``extra``."""
    refs: list[MediaRef] = []
    skipped: list[dict[str, Any]] = []
    files = message.get("files")
    for file in files if isinstance(files, list) else ():
        if not isinstance(file, dict) or not isinstance(file.get("id"), str):
            continue
        if isinstance(file.get("mode"), str) and file.get("mode") in UNFETCHABLE_FILE_MODES:
            skipped.append({"id": file["id"], "reason": file.get("mode")})
            continue
        mimetype = file.get("mimetype")
        content_type = mimetype if isinstance(mimetype, str) and "/" in mimetype else None
        name = file.get("name") or file.get("title")
        refs.append(MediaRef(
            kind=_media_kind(content_type), ref=file["id"], name=name if isinstance(name, str) else None,
            content_type=content_type,
        ))
    if skipped:
        extra["files_skipped"] = skipped
    return tuple(refs)


def _media_kind(content_type: str | None) -> str:
    major = (content_type or "").partition("/")[0]
    return {"image": "image", "video": "video", "audio": "audio"}.get(major, "file")


_LINK = re.compile(r"<([^<>|]*)(?:\|([^<>]*))?>")


def to_plain(text: str) -> str:
    """Slack's mrkdwn as plain text: ``<@U1>`` -> ``@U1``, ``<#C1|general>`` -> ``#general``,
    ``<!here>`` -> ``@here``, ``<url|label>`` -> ``label (url)``, and ``&amp; &lt; &gt;`` unescaped."""

    def link(match: re.Match[str]) -> str:
        target, label = match.group(1), match.group(2)
        if target.startswith("@"):
            return f"@{label or target[1:]}"
        if target.startswith("#"):
            return f"#{label or target[1:]}"
        if target.startswith("!"):
            return f"@{label or target[1:].partition('^')[0]}"
        if label and label != target:
            return f"{label} ({target})"
        return target

    if "<" not in text and "&" not in text:
        return text
    # Slack escapes exactly these three; anything else that looks like an entity is what was typed.
    return _LINK.sub(link, text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _timestamp(ts: str) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(ts), UTC)
    except (OverflowError, OSError, ValueError):
        return None


# The plain normalizer (every channel followed): quarantine replay without settings, tests.
normalize_slack = normalize_with(lambda inbox: ACCEPT_ALL)

"""Replies to Slack: one chat.postMessage per reply, into the customer's Slack thread.

The way back comes from the customer's latest message (``OutboundReply.answering``, the ``extra``
the normalizer kept): its channel, and its ``thread_ts`` (or its own ts in a channel, which starts
the thread under it). A direct message is answered in the DM itself unless the customer wrote in a
thread there (or ``dm_replies_in_thread``). Without a message to answer, the reply opens a DM with
the customer (conversations.open) when their identity is a Slack user.

Slack has no idempotency key for chat.postMessage, so a crash between Slack's acceptance and our
commit can send a reply twice (``idempotent = False``). Its errors are sorted for the dispatcher:
``ratelimited`` (429, ``Retry-After``) is retried after the pause Slack asks for; a channel that is
gone, archived or without the app is permanent (``recipient_unreachable``); a refused token is
``auth`` (retried, so that replies go out once the token is fixed); text Slack refuses is
``rejected`` or ``too_large``. A reply with attachments is one files upload (slack-sdk's
``files_upload_v2``) whose comment is the text; its id names the files, Slack gives no message ts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connectors.slack.api import AUTH_ERRORS, SlackError, WebApi
from connectors.slack.workspace import Workspace
from core.channel import Blobs, OutboundReply, SendError, SenderSpec, Sent
from core.model import IdentityKind
from normalizers.html import to_text

UNREACHABLE = frozenset({
    "channel_not_found", "not_in_channel", "is_archived", "user_not_found", "user_disabled",
    "cannot_dm_bot", "user_not_visible", "method_not_supported_for_channel_type",
})
REFUSED = frozenset({"no_text", "invalid_blocks", "invalid_arguments", "restricted_action",
                     "restricted_action_read_only_channel", "restricted_action_thread_only_channel",
                     "restricted_action_non_threadable_channel", "duplicate_message_not_found",
                     "messages_tab_disabled"})
MAX_TEXT = 40_000  # Slack truncates longer text; refuse instead of sending a cut reply


class SlackSender:
    """chat.postMessage with the inbox's bot token."""

    def __init__(
        self, apis: Mapping[str, WebApi], workspaces: Mapping[str, Workspace], blobs: Blobs
    ) -> None:
        self._apis = apis
        self._workspaces = workspaces
        self._blobs = blobs

    @classmethod
    def spec(
        cls, apis: Mapping[str, WebApi], workspaces: Mapping[str, Workspace], blobs: Blobs
    ) -> SenderSpec:
        # Slack allows about one message per second per channel, with short bursts.
        sender = cls(apis, workspaces, blobs)
        return SenderSpec(sender=sender, window=None, rate=1.0, burst=5, idempotent=False)

    async def send(self, reply: OutboundReply) -> Sent:
        api = self._apis.get(reply.inbox)
        ws = self._workspaces.get(reply.inbox)
        if api is None or ws is None:
            raise SendError("unsupported", f"inbox {reply.inbox!r} has no Slack installation", permanent=True)
        text = reply.text or (to_text(reply.html) if reply.html else None)
        if (not text or not text.strip()) and not reply.attachments:
            raise SendError("rejected", "the reply has no text", permanent=True)
        if text and len(text) > MAX_TEXT:
            raise SendError("too_large", f"Slack takes at most {MAX_TEXT} characters", permanent=True)
        channel, thread_ts = self._target(reply, ws)
        if channel is None:
            channel = await self._open_dm(api, reply)
        if reply.attachments:
            return await self._upload(api, reply, channel, thread_ts, text)
        payload: dict[str, Any] = {"channel": channel, "text": text, "unfurl_links": False}
        if thread_ts:
            payload["thread_ts"] = thread_ts
        try:
            data = await api.call("chat.postMessage", **payload)
        except SlackError as exc:
            raise _send_error(exc) from None
        ts = data.get("ts")
        if not isinstance(ts, str):
            raise SendError("provider_error", "chat.postMessage answered ok without a ts", permanent=False)
        answered = data.get("channel") if isinstance(data.get("channel"), str) else channel
        return Sent(provider_message_id=f"{answered}:{ts}",
                    detail={"channel": answered, "ts": ts, "thread_ts": thread_ts})

    async def _upload(
        self, api: WebApi, reply: OutboundReply, channel: str, thread_ts: str | None, text: str | None
    ) -> Sent:
        """The files with the text as their comment: files.getUploadURLExternal, the uploads, then one
        files.completeUploadExternal that shares them in the conversation (slack-sdk's files_upload_v2)."""
        uploads: list[dict[str, Any]] = []
        for attachment in reply.attachments:
            content = await self._blobs.read(attachment.sha256)
            if content is None:
                raise SendError("rejected", f"attachment {attachment.name!r} is not in the blob store",
                                permanent=True)
            uploads.append({"file": content, "filename": attachment.name, "title": attachment.name})
        arguments: dict[str, Any] = {"file_uploads": uploads, "channel": channel}
        if text and text.strip():
            arguments["initial_comment"] = text
        if thread_ts:
            arguments["thread_ts"] = thread_ts
        try:
            data = await api.call("files.upload_v2", **arguments)
        except SlackError as exc:
            raise _send_error(exc) from None
        shared = data.get("files")
        files: list[Any] = shared if isinstance(shared, list) else []
        ids = [f["id"] for f in files if isinstance(f, dict) and isinstance(f.get("id"), str)]
        if not ids:
            raise SendError("provider_error", "files.completeUploadExternal named no file", permanent=False)
        return Sent(provider_message_id=f"{channel}:files:{','.join(ids)}",
                    detail={"channel": channel, "files": ids, "thread_ts": thread_ts})

    @staticmethod
    def _target(reply: OutboundReply, ws: Workspace) -> tuple[str | None, str | None]:
        answering = reply.answering
        channel = answering.get("channel")
        if not isinstance(channel, str) or not channel:
            return None, None
        thread_ts = answering.get("thread_ts")
        ts = answering.get("ts")
        direct = answering.get("channel_type") in ("im", "mpim") or channel.startswith("D")
        if isinstance(thread_ts, str) and thread_ts:
            return channel, thread_ts
        if isinstance(ts, str) and ts and (not direct or ws.dm_replies_in_thread):
            return channel, ts
        return channel, None

    @staticmethod
    async def _open_dm(api: WebApi, reply: OutboundReply) -> str:
        recipient = reply.recipient
        if recipient.kind != IdentityKind.SLACK or ":" not in recipient.value:
            raise SendError("recipient_unreachable", "no Slack conversation to answer in", permanent=True)
        user = recipient.value.split(":", 1)[1]
        try:
            data = await api.call("conversations.open", users=user)
        except SlackError as exc:
            raise _send_error(exc) from None
        channel = data.get("channel")
        channel_id = channel.get("id") if isinstance(channel, dict) else None
        if not isinstance(channel_id, str):
            raise SendError("provider_error", "conversations.open gave no channel id", permanent=False)
        return channel_id


def _send_error(exc: SlackError) -> SendError:
    error = exc.error
    detail = f"{exc.method}: {error}"
    if error == "ratelimited" or exc.status == 429:
        return SendError("rate_limited", detail, permanent=False, retry_after=exc.retry_after or 1.0)
    if error in UNREACHABLE:
        return SendError("recipient_unreachable", detail, permanent=True)
    if error in AUTH_ERRORS:
        # Permanent for this token, but fixable by the operator: retried until the command expires.
        return SendError("auth", detail, permanent=False)
    if error == "msg_too_long":
        return SendError("too_large", detail, permanent=True)
    if error in REFUSED:
        return SendError("rejected", detail, permanent=True)
    if error == "unreachable":
        return SendError("timeout", detail, permanent=False)
    if exc.transient:
        return SendError("provider_error", detail, permanent=False, retry_after=exc.retry_after)
    return SendError("provider_error", detail, permanent=True)

"""The live half of the chat: open sockets per conversation, replies held for visitors, the sender.

**Conversations.** A conversation is where a visitor's replies go: ``u:<user_id>`` for a visitor the
site signed in (every device of theirs), else ``s:<session>``. This instance keeps the sockets open
for each one; a reply is pushed to all of them.

**Held replies.** An agent's reply is first written to the channel's durable state under the
conversation (``ctx.state``, shared by every instance on the store), then pushed. A visitor who is
not connected gets it in the ``welcome`` of their next connection; the widget confirms what it
received and what the visitor saw. The newest ``held_replies`` per conversation are kept.

**What the reply events mean here.** ``reply.sent``: the reply is stored for the visitor (held; it
will be shown however late they come back). ``reply.delivered``: an open widget received it (pushed
to a live socket, or handed over when the visitor came back). ``reply.read``: the widget's panel was
open and visible with the reply in it (the widget's read receipt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from core.channel import (
    ChannelState,
    DeliveryStatus,
    OutboundReply,
    SendError,
    Sent,
)
from core.errors import StoreError
from core.events import isoformat
from normalizers import html as html_body

logger = logging.getLogger(__name__)

Frame = Mapping[str, Any]
ReportDelivery = Callable[[str, DeliveryStatus], Awaitable[bool]]
_STATUS_RANK = {"sent": 0, "delivered": 1, "read": 2}
# report_delivery may run before the dispatcher committed the Sent (the widget acks a push within
# milliseconds): retry a "not ours (yet)" this many times, this far apart.
_REPORT_TRIES = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0)


class Peer:
    """One open socket: where to push frames for its conversation."""

    __slots__ = ("conversation", "inbox", "ws")

    def __init__(self, ws: web.WebSocketResponse, inbox: str, conversation: str) -> None:
        self.ws = ws
        self.inbox = inbox
        self.conversation = conversation

    async def send(self, frame: Frame) -> bool:
        if self.ws.closed:
            return False
        try:
            await self.ws.send_str(orjson.dumps(frame).decode())
        except (ConnectionError, RuntimeError):
            return False
        return True


class Conversations:
    """The sockets open on this instance, by (inbox, conversation) and by client IP."""

    def __init__(self) -> None:
        self._peers: dict[tuple[str, str], set[Peer]] = {}
        self._per_ip: dict[str, int] = {}
        self.sockets = 0

    def admit(self, remote: str, *, total: int, per_ip: int) -> bool:
        """Count a new socket from ``remote`` if the caps allow it."""
        if self.sockets >= total or self._per_ip.get(remote, 0) >= per_ip:
            return False
        self.sockets += 1
        self._per_ip[remote] = self._per_ip.get(remote, 0) + 1
        return True

    def release(self, remote: str) -> None:
        self.sockets -= 1
        left = self._per_ip.get(remote, 1) - 1
        if left > 0:
            self._per_ip[remote] = left
        else:
            self._per_ip.pop(remote, None)

    def add(self, peer: Peer) -> None:
        self._peers.setdefault((peer.inbox, peer.conversation), set()).add(peer)

    def discard(self, peer: Peer) -> None:
        key = (peer.inbox, peer.conversation)
        peers = self._peers.get(key)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self._peers[key]

    def peers(self, inbox: str, conversation: str) -> tuple[Peer, ...]:
        return tuple(self._peers.get((inbox, conversation), ()))

    def all(self) -> Iterable[Peer]:
        return [peer for peers in self._peers.values() for peer in peers]

    async def push(self, inbox: str, conversation: str, frame: Frame, *, skip: Peer | None = None) -> int:
        """Send ``frame`` to every socket of the conversation; how many took it."""
        peers = [p for p in self.peers(inbox, conversation) if p is not skip]
        if not peers:
            return 0
        sent = await asyncio.gather(*(p.send(frame) for p in peers))
        return sum(sent)


class HeldReplies:
    """Agent replies per conversation in the channel's durable state (compare-and-set updates)."""

    def __init__(self, state: ChannelState, keep: int) -> None:
        self._state = state
        self._keep = keep

    @staticmethod
    def _key(inbox: str, conversation: str) -> str:
        return f"replies/{inbox}/{conversation}"

    async def _update(
        self, inbox: str, conversation: str, change: Callable[[list[dict[str, Any]]], bool]
    ) -> list[dict[str, Any]]:
        """Apply ``change`` (which says whether it changed anything) until the write wins."""
        key = self._key(inbox, conversation)
        for _ in range(50):
            raw = await self._state.get(key)
            items: list[dict[str, Any]] = orjson.loads(raw) if raw else []
            if not change(items):
                return items
            items = items[-self._keep :]
            if await self._state.compare_and_set(key, raw, orjson.dumps(items)):
                return items
        raise StoreError(f"webchat: conversation {conversation} kept changing under the update")

    async def hold(self, inbox: str, conversation: str, item: dict[str, Any]) -> bool:
        """Keep ``item`` (insert-if-absent by id); whether it is new."""
        new = False

        def add(items: list[dict[str, Any]]) -> bool:
            nonlocal new
            new = all(i.get("id") != item["id"] for i in items)
            if new:
                items.append(item)
            return new

        await self._update(inbox, conversation, add)
        return new

    async def items(self, inbox: str, conversation: str) -> list[dict[str, Any]]:
        raw = await self._state.get(self._key(inbox, conversation))
        return orjson.loads(raw) if raw else []

    async def mark(self, inbox: str, conversation: str, ids: Sequence[str], status: str) -> list[str]:
        """Move the named replies forward to ``status``; the ids that moved (reported once each)."""
        wanted = set(ids)
        moved: list[str] = []

        def advance(items: list[dict[str, Any]]) -> bool:
            moved.clear()
            for item in items:
                if (
                    item.get("id") in wanted
                    and _STATUS_RANK.get(item.get("status", "sent"), 0) < _STATUS_RANK[status]
                ):
                    item["status"] = status
                    moved.append(str(item["id"]))
            return bool(moved)

        await self._update(inbox, conversation, advance)
        return list(moved)


def reply_frame(item: Mapping[str, Any]) -> dict[str, Any]:
    """What the widget is sent for one held reply."""
    return {"type": "reply", **item}


def conversation_of(reply: OutboundReply) -> str | None:
    """The conversation a reply goes to: the one the customer's latest chat message came from."""
    conversation = reply.answering.get("conversation")
    if isinstance(conversation, str) and conversation:
        return conversation
    session = reply.answering.get("session")
    if isinstance(session, str) and session:
        return f"s:{session}"
    prefix = f"{reply.inbox}:"
    if reply.recipient.kind == "webchat_visitor" and reply.recipient.value.startswith(prefix):
        return f"s:{reply.recipient.value[len(prefix) :]}"
    return None


class Bulletin:
    """Where every instance learns of replies sent by another (several gateways on one store).

    The sender appends ``(seq, conversation, reply_id)`` to one small record per inbox in the
    channel's shared state; each instance reads that record every ``interval`` and pushes the
    replies of the conversations it has sockets for, unless it pushed them itself. One state read per
    inbox per interval, whatever the number of sockets."""

    KEEP = 500

    def __init__(self, state: ChannelState, held: HeldReplies, conversations: Conversations) -> None:
        self._state = state
        self._held = held
        self._conversations = conversations
        self._seen: dict[str, int] = {}  # inbox -> last seq looked at
        self._pushed: OrderedDict[str, None] = OrderedDict()  # reply ids this instance pushed

    @staticmethod
    def _key(inbox: str) -> str:
        return f"bulletin/{inbox}"

    def pushed_here(self, reply_id: str) -> None:
        self._pushed[reply_id] = None
        while len(self._pushed) > 4 * self.KEEP:
            self._pushed.popitem(last=False)

    async def post(self, inbox: str, conversation: str, reply_id: str) -> None:
        key = self._key(inbox)
        for _ in range(50):
            raw = await self._state.get(key)
            board: dict[str, Any] = orjson.loads(raw) if raw else {"seq": 0, "items": []}
            seq = int(board["seq"]) + 1
            items = [*board["items"], [seq, conversation, reply_id]][-self.KEEP :]
            if await self._state.compare_and_set(key, raw, orjson.dumps({"seq": seq, "items": items})):
                return
        raise StoreError("webchat: the reply bulletin kept changing under the update")

    async def check(self, inboxes: Iterable[str]) -> int:
        """Push what other instances sent since the last check; how many replies were pushed."""
        pushed = 0
        for inbox in inboxes:
            raw = await self._state.get(self._key(inbox))
            if raw is None:
                self._seen.setdefault(inbox, 0)
                continue
            board = orjson.loads(raw)
            last = self._seen.get(inbox)
            self._seen[inbox] = int(board["seq"])
            if last is None:
                continue  # the first look: what was sent before this instance started is held
            for seq, conversation, reply_id in board["items"]:
                if (
                    seq <= last
                    or reply_id in self._pushed
                    or not self._conversations.peers(inbox, conversation)
                ):
                    continue
                item = next(
                    (i for i in await self._held.items(inbox, conversation) if i.get("id") == reply_id), None
                )
                if item is not None:
                    self.pushed_here(reply_id)
                    pushed += await self._conversations.push(inbox, conversation, reply_frame(item))
        return pushed

    async def watch(self, inboxes: Sequence[str], interval: float) -> None:
        """Run for the gateway's lifetime (a supervised task)."""
        while True:
            await self.check(inboxes)
            await asyncio.sleep(interval)


class WebchatSender:
    """Holds a reply for the visitor, then pushes it to their open widgets.

    Idempotent: the reply id is the held item's id, so a retried send holds nothing twice and the
    widget drops a repeat by id."""

    def __init__(
        self,
        held: HeldReplies,
        conversations: Conversations,
        now: Callable[[], datetime],
        bulletin: Bulletin | None = None,
    ) -> None:
        self._held = held
        self._conversations = conversations
        self._now = now
        self._bulletin = bulletin
        self._pushes: set[asyncio.Task[None]] = set()

    async def send(self, reply: OutboundReply) -> Sent:
        conversation = conversation_of(reply)
        if conversation is None:
            raise SendError("recipient_unreachable", "no chat session to answer", permanent=True)
        if not (reply.text or reply.html or reply.attachments):
            raise SendError("rejected", "the reply has no text and no file", permanent=True)
        # The widget shows text only (no agent HTML runs in a customer's page): an HTML-only reply is
        # shown as the text of its sanitized HTML.
        text = reply.text or (html_body.to_text(html_body.sanitize(reply.html)) if reply.html else "")
        item: dict[str, Any] = {
            "id": reply.reply_id,
            "text": text,
            "at": isoformat(self._now()),
            "status": "sent",
        }
        if reply.agent_name:
            item["agent"] = reply.agent_name
        if reply.attachments:
            item["files"] = [
                {"name": a.name, "type": a.content_type, "size": a.size, "sha256": a.sha256}
                for a in reply.attachments
            ]
        try:
            await self._held.hold(reply.inbox, conversation, item)
            if self._bulletin is not None:
                self._bulletin.pushed_here(reply.reply_id)
                await self._bulletin.post(reply.inbox, conversation, reply.reply_id)
        except StoreError as exc:
            raise SendError(
                "provider_error", f"could not hold the reply: {exc}", permanent=False, retry_after=5.0
            ) from None
        # Push after answering the dispatcher, so the Sent is usually recorded before the widget's
        # receipt arrives (a receipt that still comes first is retried, see report()).
        task = asyncio.get_running_loop().create_task(
            self._push(reply.inbox, conversation, reply_frame(item))
        )
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        return Sent(
            provider_message_id=reply.reply_id,
            detail={"conversation_online": bool(self._conversations.peers(reply.inbox, conversation))},
        )

    async def _push(self, inbox: str, conversation: str, frame: Frame) -> None:
        await asyncio.sleep(0)
        pushed = await self._conversations.push(inbox, conversation, frame)
        logger.debug("webchat %s: reply pushed to %d socket(s) of %s", inbox, pushed, conversation)

    async def close(self) -> None:
        for task in list(self._pushes):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._pushes, return_exceptions=True)


async def report(report_delivery: ReportDelivery, reply_id: str, status: DeliveryStatus) -> None:
    """Tell the desk (``reply.delivered`` / ``reply.read``), waiting a little for the dispatcher to
    have recorded the reply when the widget's receipt overtook it."""
    for delay in _REPORT_TRIES:
        if delay:
            await asyncio.sleep(delay)
        try:
            if await report_delivery(reply_id, status):
                return
        except StoreError as exc:
            logger.warning("webchat: could not report %s for reply %s: %s", status, reply_id, exc)
    logger.info("webchat: reply %s is unknown to the dispatcher; %s not reported", reply_id, status)

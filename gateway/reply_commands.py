"""The reply command: what a desk sends to answer a customer, on the control queue or over HTTP.

``reply.requested`` on the control queue and ``POST /api/v1/threads/{id}/replies`` carry the same
fields (docs/schema/reply.requested.json, docs/replies.md). The command is stored in the reply
ledger before it is acknowledged; the dispatcher (:mod:`gateway.replies`) sends it. ``command_id``
is the desk's idempotency key: the same body again changes nothing, another body is refused.
Unknown fields are ignored (and are not part of the body's fingerprint).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import validation_reason
from core.events import REPLY_FAILED, ReplyView, reply_event
from core.settings import ReplySettings
from dedupe.engine import new_id
from gateway.store.base import Store
from gateway.store.replies import ReplyRecord, ReplyRequest

logger = logging.getLogger(__name__)

COMMAND_TYPE = "reply.requested"
MAX_TEXT_CHARS = 64 * 1024
MAX_HTML_CHARS = 512 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class AttachmentIn(BaseModel):
    """An attachment: a blob the gateway already holds (``sha256``, e.g. a customer's attachment or
    one uploaded through the API channel) or an ``https`` URL fetched when the reply goes out."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=255)
    content_type: str = Field("application/octet-stream", min_length=3, max_length=200)
    sha256: str | None = None
    url: str | None = Field(None, max_length=2000)
    # What the desk says the size is: refused up front when past the cap (the fetch checks again).
    size: int | None = Field(None, ge=0)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value.lower()):
            raise ValueError("a sha256 is 64 hexadecimal digits")
        return value.lower() if value is not None else None

    @field_validator("url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().startswith("https://"):
            raise ValueError("only https URLs are fetched")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.sha256 is None) == (self.url is None):
            raise ValueError("give exactly one of sha256 and url")
        return self


class ReplyCommand(BaseModel):
    """``reply.requested``. ``type`` is required on the queue, optional over HTTP."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: Literal["reply.requested"] = "reply.requested"
    command_id: str = Field(min_length=1, max_length=200)
    thread_id: str = Field(min_length=1, max_length=200)
    tenant: str = Field(min_length=1, max_length=200)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    html: str | None = Field(None, max_length=MAX_HTML_CHARS)
    attachments: tuple[AttachmentIn, ...] = Field((), max_length=50)
    agent_name: str | None = Field(None, max_length=200)
    # One of the customer's channels (as message.received's reply.channels names them); by
    # default the channel the customer last wrote on in this thread.
    channel: str | None = Field(None, min_length=1, max_length=64)
    # Channel-specific hints passed to the sender (docs/replies.md names those a channel reads).
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not (self.text and self.text.strip()) and not self.html and not self.attachments:
            raise ValueError("give text, html or attachments")
        return self

    def body(self) -> dict[str, Any]:
        """What the ledger keeps and the fingerprint covers (no ``type``, no unknown fields)."""
        return self.model_dump(mode="json", exclude={"type"})

    def fingerprint(self) -> str:
        return hashlib.sha256(orjson.dumps(self.body(), option=orjson.OPT_SORT_KEYS)).hexdigest()


class CommandError(ValueError):
    """A command that cannot be read: ``status`` 400 (not JSON) or 422 (a field is wrong)."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def parse_command(
    body: bytes | dict[str, Any], *, max_attachments: int, max_attachment_bytes: int
) -> ReplyCommand:
    """The command in ``body``; :class:`CommandError` naming the field when it is not one."""
    if isinstance(body, bytes):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise CommandError("the body is not valid JSON", 400) from None
    else:
        data = body
    if not isinstance(data, dict):
        raise CommandError("the body must be a JSON object", 422)
    try:
        command = ReplyCommand.model_validate(data)
    except ValidationError as exc:
        raise CommandError(validation_reason(exc.errors()), 422) from None
    if len(command.attachments) > max_attachments:
        raise CommandError(f"attachments: at most {max_attachments}", 422)
    for index, attachment in enumerate(command.attachments):
        if attachment.size is not None and attachment.size > max_attachment_bytes:
            raise CommandError(f"attachments.{index}.size: past the cap of {max_attachment_bytes} bytes", 422)
    return command


class ThreadOrder:
    """Commands of one thread are stored one at a time, in the order they arrived.

    The control queue's deliveries are handled concurrently (aio-pika runs a task per message), and
    so are HTTP requests: without this, two commands for one thread could commit in either order,
    and replies go out in the order they were stored. ``asyncio.Lock`` serves waiters first come,
    first served; commands of different threads do not wait for each other.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, thread_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(thread_id, (asyncio.Lock(), 0))
        self._locks[thread_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[thread_id]
            if users <= 1:
                del self._locks[thread_id]
            else:
                self._locks[thread_id] = (lock, users - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyIntake:
    """How reply commands are taken (queue and HTTP): their bounds, who to wake once stored, and
    the order of each thread's commands."""

    settings: ReplySettings
    wake: Callable[[], None] | None = None
    order: ThreadOrder = field(default_factory=ThreadOrder)


Recorded = Literal["created", "duplicate", "conflict", "unknown_thread"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    outcome: Recorded
    record: ReplyRecord | None


async def record_command(
    store: Store, command: ReplyCommand, *, wake: Callable[[], None] | None = None
) -> CommandResult:
    """Store ``command`` in the ledger (committed when this returns) and wake the dispatcher."""
    requested = await store.reply_request(
        ReplyRequest(
            reply_id=new_id("rpl"),
            tenant=command.tenant,
            command_id=command.command_id,
            thread_id=command.thread_id,
            fingerprint=command.fingerprint(),
            command=command.body(),
            requested_channel=command.channel,
        )
    )
    if requested.outcome == "created" and wake is not None:
        wake()
    if requested.outcome == "conflict":
        logger.warning(
            "replies: command %s of tenant %s reused with another body; refused",
            command.command_id,
            command.tenant,
        )
    elif requested.outcome == "unknown_thread":
        logger.warning(
            "replies: command %s names thread %s, unknown in tenant %s; refused",
            command.command_id,
            command.thread_id,
            command.tenant,
        )
    return CommandResult(outcome=requested.outcome, record=requested.record)


async def announce_refusal(store: Store, command: ReplyCommand, reason: str) -> None:
    """A queued command that cannot be taken (another tenant's thread, a reused command id) is
    answered with ``reply.failed`` (reason ``rejected``) on the command's own tenant, so a desk
    that only listens to the bus hears it; nothing is sent and nothing is stored."""
    view = ReplyView(
        id=new_id("rpl"),
        command_id=command.command_id,
        tenant=command.tenant,
        thread_id=command.thread_id,
        thread_number=None,
        customer_id=None,
        channel=None,
        inbox=None,
        attempts=0,
        requested_at=datetime.now(UTC),
    )
    event = reply_event(REPLY_FAILED, view, occurred_at=view.requested_at, reason="rejected", detail=reason)
    await store.enqueue([event])

"""Builders shared by the store tests: envelopes, messages, an event builder and a settable clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from core import events
from core.events import CustomerView, Event
from core.model import Attachment, CanonicalMessage, Identity, Placement, RawEnvelope
from core.settings import OutboxSettings, StoreSettings
from dedupe.policy import PlacementPolicy

T0 = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
WINDOW = 3600.0
POLICY = PlacementPolicy(window=WINDOW)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def store_settings(tmp_path: Path, **overrides: object) -> StoreSettings:
    return StoreSettings.model_validate(
        {"path": tmp_path / "tg.db", "blob_dir": tmp_path / "blobs", "min_free_disk_mb": 0, **overrides}
    )


def outbox_settings(**overrides: object) -> OutboxSettings:
    return OutboxSettings.model_validate(overrides)


def envelope(
    body: bytes = b'{"text": "hello"}', *, tenant: str = "acme", inbox: str = "support"
) -> RawEnvelope:
    return RawEnvelope(
        channel="form",
        tenant=tenant,
        inbox=inbox,
        body=body,
        received_at=T0,
        content_type="application/json",
        headers={"content-type": "application/json", "x-request-id": "r-1"},
        signature_verified=True,
        retry=2,
        remote="203.0.113.7",
        meta={"accept_language": "de-CH", "ports": [25, 587]},
    )


def message(
    external_id: str | None,
    *,
    email: str = "ada@example.com",
    phone: str | None = None,
    name: str | None = "Ada",
    tenant: str = "acme",
    inbox: str = "support",
    channel: str = "form",
    subject: str | None = "Order 1234 is late",
    text: str = "Where is my order?",
    attachments: tuple[Attachment, ...] = (),
) -> CanonicalMessage:
    identities = [Identity(kind="email", value=email, verified=True)]
    if phone is not None:
        identities.append(Identity(kind="phone", value=phone))
    return CanonicalMessage(
        channel=channel,
        tenant=tenant,
        inbox=inbox,
        external_id=external_id,
        received_at=T0,
        identities=tuple(identities),
        display_name=name,
        subject=subject,
        text=text,
        attachments=attachments,
    )


def build_event(
    message: CanonicalMessage,
    placement: Placement,
    customer: CustomerView,
    thread_subject: str | None,
    raw_ref: str | None,
) -> Event:
    return events.message_received(
        message,
        placement=placement,
        customer=customer,
        thread_subject=thread_subject,
        raw_ref=raw_ref,
        signature_verified=True,
        retry=0,
        public_url=None,
        occurred_at=message.received_at,
    )


def broken_builder(
    message: CanonicalMessage,
    placement: Placement,
    customer: CustomerView,
    thread_subject: str | None,
    raw_ref: str | None,
) -> Event:
    """An event builder with a bug: the job that calls it fails, its batch siblings must not."""
    raise RuntimeError("builder bug")

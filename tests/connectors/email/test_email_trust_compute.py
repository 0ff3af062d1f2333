"""A trusted Authentication-Results header is read where the channel context computes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from connectors.email import trust
from connectors.email.envelope import EnvelopeFactory
from connectors.email.settings import EmailSettings

T = TypeVar("T")

HEADER = (
    b"Authentication-Results: mx.trusted.example; dkim=pass header.d=shop.example;"
    b" spf=pass smtp.mailfrom=shop.example; dmarc=pass header.from=shop.example\r\n"
)
MAIL = HEADER + b"From: a@shop.example\r\nSubject: hi\r\n\r\n" + b"body\r\n" * 1000


class Computed:
    """A compute that records what it was handed, then runs it (or fails as a dead process)."""

    def __init__(self, *, dies: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.dies = dies

    async def __call__(self, fn: Callable[..., T], /, *args: Any) -> T:
        self.calls.append((fn, *args))
        if self.dies:
            raise RuntimeError("the normalizer process died while computing this call")
        return fn(*args)


def factory(compute: Computed) -> EnvelopeFactory:
    email = EmailSettings.model_validate({"inboxes": {"support": {"addresses": ["support@demo.localhost"]}}})
    return EnvelopeFactory(email=email, tenants={"support": "demo"}, ticket_ref_pattern="x", compute=compute)


async def test_the_header_block_alone_is_handed_over_and_its_verdict_kept() -> None:
    compute = Computed()

    envelope = await factory(compute).build(
        MAIL, inbox="support", transport={}, authserv_id="mx.trusted.example"
    )

    [(fn, head, authserv_id)] = compute.calls
    assert (fn, authserv_id) == (trust.verdict, "mx.trusted.example")
    assert head == trust.header_block(MAIL)
    assert len(head) < 200
    assert envelope.meta["authentication"] == trust.verdict(MAIL, "mx.trusted.example")
    assert envelope.signature_verified is True


async def test_mail_without_the_header_is_not_handed_over() -> None:
    compute = Computed()

    envelope = await factory(compute).build(
        MAIL[len(HEADER) :], inbox="support", transport={}, authserv_id="mx.trusted.example"
    )

    assert compute.calls == []
    assert envelope.meta["authentication"] is None


async def test_a_header_that_took_the_process_down_is_not_trusted(caplog: pytest.LogCaptureFixture) -> None:
    envelope = await factory(Computed(dies=True)).build(
        MAIL, inbox="support", transport={}, authserv_id="mx.trusted.example"
    )

    assert envelope.meta["authentication"] is None
    assert envelope.signature_verified is False
    assert "its sender is not trusted" in caplog.text

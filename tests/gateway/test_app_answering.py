"""message.received's reply block from the registered senders (gateway.app._Answering)."""

from datetime import UTC, datetime

from core.channel import OutboundReply, SenderSpec, Sent
from core.events import CustomerView
from core.model import CanonicalMessage, Identity
from gateway.app import _Answering

EMAIL = Identity(kind="email", value="a@example.com", verified=True)
MESSAGE = CanonicalMessage(
    channel="api",
    tenant="demo",
    inbox="app",
    external_id="m1",
    received_at=datetime(2026, 12, 5, 10, 0, tzinfo=UTC),
    identities=(EMAIL,),
    text="hello",
)
CUSTOMER = CustomerView(id="cus_1", identities=(EMAIL,), display_name=None)


class Unused:
    async def send(self, reply: OutboundReply) -> Sent:
        raise AssertionError("not sent in this test")


def test_a_sender_registered_after_the_first_message_is_offered() -> None:
    senders: dict[str, SenderSpec] = {"api": SenderSpec(sender=Unused(), window=3600.0)}
    kinds = {"api": frozenset({"external"})}
    answering = _Answering(senders, kinds)
    first = answering(MESSAGE, CUSTOMER)
    assert [c["channel"] for c in first["channels"]] == ["api"]
    assert first["channels"][0]["window_ends_at"] == "2026-12-05T11:00:00Z"

    senders["email"] = SenderSpec(sender=Unused())
    kinds["email"] = frozenset({"email"})
    second = answering(MESSAGE, CUSTOMER)
    assert [c["channel"] for c in second["channels"]] == ["api", "email"]
    assert second["default_channel"] == "api"

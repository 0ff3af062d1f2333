"""The Meta senders against a local server that answers like the Graph API, errors included, and
delivery receipts turned into ``ctx.report_delivery`` calls."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.meta.graph import GraphApi
from connectors.meta.sender import SendApiSender, WhatsAppSender, send_api_spec, whatsapp_spec
from core.channel import OutboundAttachment, OutboundReply, SendError
from core.model import Identity, IdentityKind, IngestResult, Outcome, RawEnvelope
from core.settings import Settings
from gateway.channels import GatewayContext, Registry
from gateway.metrics import Metrics
from normalizers.base import Normalizer
from tests.connectors.meta.fake_graph import VERSION, FakeGraph, graph_error
from tests.connectors.meta.probe import sign

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


class Http:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base.rstrip("/")
        self.session = session

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"


class Blobs:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def add(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.data[digest] = data
        return digest

    async def read(self, sha256: str) -> bytes | None:
        return self.data.get(sha256)


@pytest.fixture
async def graph(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[tuple[FakeGraph, GraphApi]]:
    fake = FakeGraph()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("/"))
    async with aiohttp.ClientSession() as session:
        yield fake, GraphApi(Http(fake.base, session), VERSION, "graph-token", timeout=5.0)  # type: ignore[arg-type]


def reply(channel: str = "whatsapp", **kwargs: Any) -> OutboundReply:
    recipient = {
        "whatsapp": Identity(kind=IdentityKind.WHATSAPP, value="4915112345678", verified=True),
        "messenger": Identity(kind=IdentityKind.MESSENGER_PSID, value="6254147181305912"),
        "instagram": Identity(kind=IdentityKind.INSTAGRAM_IGSID, value="1254459154682919"),
    }[channel]
    answering = {
        "whatsapp": {"phone_number_id": "106540352242922", "wa_id": "4915112345678"},
        "messenger": {"page_id": "104553821234567"},
        "instagram": {"account_id": "17841405822304914"},
    }[channel]
    defaults: dict[str, Any] = dict(
        reply_id="01JREPLY0000000000000000001",
        command_id="cmd-1",
        tenant="acme",
        channel=channel,
        inbox="support",
        thread_id="thr-1",
        thread_number=12,
        subject=None,
        recipient=recipient,
        text="Your parcel ships today.",
        answering=answering,
    )
    defaults.update(kwargs)
    return OutboundReply(**defaults)


async def test_whatsapp_text_from_the_number_the_customer_wrote_to(graph: tuple[FakeGraph, GraphApi]) -> None:
    fake, api = graph
    sender = WhatsAppSender({"support": api}, {"support": None}, Blobs())
    sent = await sender.send(reply())
    assert sent.provider_message_id.startswith("wamid.SENT")
    [payload] = fake.sent
    assert payload["_owner"] == "106540352242922"
    assert payload["to"] == "4915112345678"
    assert payload["text"] == {"body": "Your parcel ships today.", "preview_url": False}


async def test_whatsapp_media_is_uploaded_then_sent_with_the_text_as_caption(
    graph: tuple[FakeGraph, GraphApi],
) -> None:
    fake, api = graph
    blobs = Blobs()
    digest = blobs.add(b"%PDF-1.7 invoice")
    attachment = OutboundAttachment(
        name="invoice.pdf", content_type="application/pdf", size=16, sha256=digest
    )
    sender = WhatsAppSender({"support": api}, {"support": None}, blobs)
    await sender.send(reply(attachments=(attachment,)))
    assert fake.uploads == [("106540352242922", b"%PDF-1.7 invoice", "application/pdf")]
    [payload] = fake.sent
    assert payload["type"] == "document"
    assert payload["document"] == {
        "id": "upload-1",
        "filename": "invoice.pdf",
        "caption": "Your parcel ships today.",
    }


async def test_the_window_lets_only_templates_through_and_whatsapp_says_the_same(
    graph: tuple[FakeGraph, GraphApi],
) -> None:
    fake, api = graph
    spec = whatsapp_spec(WhatsAppSender({"support": api}, {"support": None}, Blobs()))
    assert spec.window == 24 * 3600
    assert spec.outside_window is not None
    template = {"name": "order_update", "language": "de", "components": [{"type": "body", "parameters": []}]}
    assert spec.outside_window(reply(options={"template": template})) is True
    assert spec.outside_window(reply()) is False
    await spec.sender.send(reply(options={"template": template}))
    assert fake.sent[-1]["template"] == {
        "name": "order_update",
        "language": {"code": "de"},
        "components": [{"type": "body", "parameters": []}],
    }
    fake.send_errors.append(
        graph_error(
            400,
            131047,
            "Re-engagement message",
            details="Message failed to send because more than 24 hours have passed",
        )
    )
    with pytest.raises(SendError) as failed:
        await spec.sender.send(reply())
    assert (failed.value.reason, failed.value.permanent) == ("window_closed", True)


@pytest.mark.parametrize(
    ("error", "reason", "permanent"),
    [
        (graph_error(400, 130429, "Rate limit hit", retry_after=30), "rate_limited", False),
        (
            graph_error(400, 131056, "(Business Account, Consumer Account) pair rate limit hit"),
            "rate_limited",
            False,
        ),
        (graph_error(401, 190, "Error validating access token"), "auth", True),
        (graph_error(400, 131026, "Message Undeliverable"), "recipient_unreachable", True),
        (graph_error(400, 100, "Invalid parameter"), "rejected", True),
        (graph_error(500, 131000, "Something went wrong"), "provider_error", False),
        (web.Response(status=502, text="<html>bad gateway</html>"), "provider_error", False),
    ],
)
async def test_graph_errors_are_reply_failures(
    graph: tuple[FakeGraph, GraphApi], error: web.Response, reason: str, permanent: bool
) -> None:
    fake, api = graph
    fake.send_errors.append(error)
    with pytest.raises(SendError) as failed:
        await WhatsAppSender({"support": api}, {"support": None}, Blobs()).send(reply())
    assert (failed.value.reason, failed.value.permanent) == (reason, permanent)
    if reason == "rate_limited":
        assert failed.value.retry_after is not None


async def test_an_unreachable_graph_is_a_retry() -> None:
    async with aiohttp.ClientSession() as session:
        api = GraphApi(Http("http://127.0.0.1:9", session), VERSION, "t", timeout=2.0)  # type: ignore[arg-type]
        with pytest.raises(SendError) as failed:
            await WhatsAppSender({"support": api}, {"support": None}, Blobs()).send(reply())
    assert (failed.value.reason, failed.value.permanent) == ("timeout", False)


async def test_messenger_inside_the_window_and_with_a_tag_outside_it(
    graph: tuple[FakeGraph, GraphApi],
) -> None:
    fake, api = graph
    spec = send_api_spec(SendApiSender("messenger", {"support": api}, {"support": None}, Blobs()))
    sent = await spec.sender.send(reply("messenger"))
    assert sent.provider_message_id.startswith("m_SENT")
    assert fake.sent[-1]["_owner"] == "104553821234567"
    assert fake.sent[-1]["messaging_type"] == "RESPONSE"
    assert fake.sent[-1]["recipient"] == {"id": "6254147181305912"}
    tagged = reply("messenger", options={"tag": "HUMAN_AGENT"})
    assert spec.outside_window is not None
    assert spec.outside_window(tagged) is True
    assert spec.outside_window(reply("messenger", options={"tag": "MADE_UP"})) is False
    await spec.sender.send(tagged)
    assert (fake.sent[-1]["messaging_type"], fake.sent[-1]["tag"]) == ("MESSAGE_TAG", "HUMAN_AGENT")
    fake.send_errors.append(
        graph_error(400, 10, "This message is sent outside of allowed window.", subcode=2018278)
    )
    with pytest.raises(SendError) as failed:
        await spec.sender.send(reply("messenger"))
    assert failed.value.reason == "window_closed"


async def test_messenger_attachments_are_uploaded_and_instagram_refuses_them(
    graph: tuple[FakeGraph, GraphApi],
) -> None:
    fake, api = graph
    blobs = Blobs()
    digest = blobs.add(b"\x89PNG")
    attachment = OutboundAttachment(name="label.png", content_type="image/png", size=4, sha256=digest)
    await SendApiSender("messenger", {"support": api}, {"support": None}, blobs).send(
        reply("messenger", attachments=(attachment,))
    )
    assert fake.sent[0]["filedata"] == "<file>"
    assert '"type":"image"' in fake.sent[0]["message"]
    assert fake.sent[1]["message"] == {"text": "Your parcel ships today."}
    with pytest.raises(SendError) as failed:
        await SendApiSender("instagram", {"support": api}, {"support": None}, blobs).send(
            reply("instagram", attachments=(attachment,))
        )
    assert (failed.value.reason, failed.value.permanent) == ("unsupported", True)
    sent = await SendApiSender("instagram", {"support": api}, {"support": None}, blobs).send(
        reply("instagram")
    )
    assert sent.provider_message_id.startswith("m_SENT")
    assert fake.sent[-1]["_owner"] == "17841405822304914"


async def test_statuses_and_receipts_report_deliveries(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "store": {"path": str(tmp_path / "g.db")},
            "tenants": {"acme": {}},
            "inboxes": {"support": {"tenant": "acme"}},
            "channels": {
                "meta": {"apps": {"acme": {"app_secret": "s", "verify_token": "v"}}},
                "whatsapp": {
                    "inboxes": {"support": {"app": "acme", "access_token": "t", "fetch_media": False}}
                },
                "messenger": {
                    "inboxes": {"support": {"app": "acme", "access_token": "t", "fetch_media": False}}
                },
            },
        }
    )
    reports: list[tuple[str, str, str, datetime, str | None]] = []

    async def deliveries(
        channel: str, message_id: str, status: str, at: datetime, reason: str | None, detail: str | None
    ) -> bool:
        reports.append((channel, message_id, status, at, reason))
        return True

    async def ingest(envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
        normalize(envelope)
        return IngestResult(outcome=Outcome.ACCEPTED)

    app = web.Application()
    registry = Registry.installed()
    for name in ("whatsapp", "messenger"):
        descriptor = registry.get(name)
        connector = descriptor.connector.from_settings(settings)
        assert connector is not None
        ctx = GatewayContext(
            app,
            descriptor,
            settings=settings,
            ingest=ingest,
            store=None,
            metrics=Metrics(),
            deliveries=deliveries,
        )  # type: ignore[arg-type]
        connector.setup(ctx)
    async with TestClient(TestServer(app)) as client:
        failed = {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": "1",
                    "changes": [
                        {
                            "field": "messages",
                            "value": {
                                "metadata": {"phone_number_id": "1"},
                                "statuses": [
                                    {
                                        "id": "wamid.SENT1",
                                        "status": "failed",
                                        "timestamp": "1764920300",
                                        "recipient_id": "49151",
                                        "errors": [{"code": 131047, "title": "Re-engagement message"}],
                                    }
                                ],
                            },
                        }
                    ],
                }
            ],
        }
        for path in ("whatsapp/statuses", "messenger/receipts"):
            body = (FIXTURES / f"{path}.json").read_bytes()
            response = await client.post(
                "/meta/acme", data=body, headers={"X-Hub-Signature-256": sign(body, "s")}
            )
            assert response.status == 200
        body = orjson.dumps(failed)
        response = await client.post(
            "/meta/acme", data=body, headers={"X-Hub-Signature-256": sign(body, "s")}
        )
        assert response.status == 200
    assert [(c, m, s, r) for c, m, s, _, r in reports] == [
        ("whatsapp", "wamid.HBgNNDkxNTExMjM0NTY3OBUCABEYEjk5OTAwMDAwMDAwMDAwMDAA", "delivered", None),
        ("whatsapp", "wamid.HBgNNDkxNTExMjM0NTY3OBUCABEYEjk5OTAwMDAwMDAwMDAwMDAA", "read", None),
        ("messenger", "m_OURREPLY1", "delivered", None),
        ("whatsapp", "wamid.SENT1", "failed", "window_closed"),
    ]
    assert reports[0][3] == datetime.fromtimestamp(1764920100, UTC)

"""The WeChat / WeCom callback sub-apps, driven with real callbacks encrypted by wechatpy's own crypto."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from wechatpy.crypto import WeChatCrypto as OfficialCrypto
from wechatpy.enterprise.crypto import PrpCrypto as WeComPrp
from wechatpy.enterprise.crypto import WeChatCrypto as WeComCrypto
from wechatpy.utils import WeChatSigner

from connectors.wechat import WeChatConnector, WeComConnector
from core.errors import ConfigError, RetryableError
from core.model import IngestResult, Outcome, Placement, RawEnvelope
from core.settings import Settings
from gateway.metrics import Metrics
from normalizers.base import Normalizer
from tests.support.channels import set_up
from tests.support.corpora import CORPORA as CORPORA_DIR

DEFUSED = CORPORA_DIR / "defusedxml"
NOW = 1_718_000_000
TOKEN, AES_KEY, APP_ID = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "wx0123456789abcdef"
OLD_TOKEN, OLD_AES_KEY = "oldtoken", "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"
CORP_ID, AGENT_ID = "ww0123456789abcdef", 1000002

TEXT = (
    "<xml><ToUserName><![CDATA[gh_0a1b2c3d4e5f]]></ToUserName><FromUserName><![CDATA[oUser1]]></FromUserName>"
    "<CreateTime>1718000000</CreateTime><MsgType><![CDATA[text]]></MsgType>"
    "<Content><![CDATA[我的订单在哪里]]></Content><MsgId>24600000000000001</MsgId></xml>"
)
WECOM_TEXT = (
    f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><FromUserName><![CDATA[zhangsan]]></FromUserName>"
    "<CreateTime>1718000000</CreateTime><MsgType><![CDATA[text]]></MsgType>"
    f"<Content><![CDATA[hi]]></Content><MsgId>7000000000000000001</MsgId><AgentID>{AGENT_ID}</AgentID></xml>"
)
STORED = IngestResult(
    outcome=Outcome.ACCEPTED,
    placements=(Placement(message_id="m", thread_id="t", customer_id="c", sequence=1, is_new_thread=True),),
)


class FakeIngest:
    """Records envelopes and the messages our normalizer makes of them; answers ``result``."""

    def __init__(self, result: IngestResult = STORED, delay: float = 0.0) -> None:
        self.result = result
        self.delay = delay
        self.envelopes: list[RawEnvelope] = []
        self.keys: list[str] = []
        self.raise_: Exception | None = None

    async def __call__(self, envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
        self.envelopes.append(envelope)
        self.keys.extend(m.idempotency_key() for m in normalize(envelope))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.raise_ is not None:
            raise self.raise_
        return self.result


def settings(
    wechat: dict[str, Any] | None = None, wecom: dict[str, Any] | None = None, **table: Any
) -> Settings:
    account = {"inbox": "wx-demo", "app_id": APP_ID, "token": TOKEN, "encoding_aes_key": AES_KEY}
    app = {
        "inbox": "wecom-demo", "corp_id": CORP_ID, "agent_id": AGENT_ID, "token": TOKEN,
        "encoding_aes_key": AES_KEY,
    }
    return Settings.model_validate(
        {
            "tenants": {"acme": {}},
            "inboxes": {"wx-demo": {"tenant": "acme"}, "wecom-demo": {"tenant": "acme"}},
            "channels": {
                "wechat": {"accounts": {"demo": {**account, **(wechat or {})}}, **table},
                "wecom": {"apps": {"helpdesk": {**app, **(wecom or {})}}, **table},
            },
        }
    )


Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_client(aiohttp_client: Any) -> MakeClient:
    async def make(
        ingest: FakeIngest, config: Settings | None = None, clock: float = NOW, metrics: Metrics | None = None
    ) -> Client:
        config = config or settings()
        app = web.Application()
        for connector_class in (WeChatConnector, WeComConnector):
            connector = connector_class.from_settings(config, clock=lambda: clock)
            assert connector is not None
            set_up(app, connector, ingest, settings=config, metrics=metrics)
        client: Client = await aiohttp_client(app)
        return client

    return make


def _sign(*parts: str) -> str:
    signer = WeChatSigner()  # wechatpy's signer, not ours
    signer.add_data(*parts)
    return str(signer.signature)


def encrypted_post(
    plaintext: str, *, token: str = TOKEN, key: str = AES_KEY, ts: int = NOW, nonce: str = "n0nce"
) -> tuple[dict[str, str], bytes]:
    """Query and body of an Official Account safe-mode callback, made by wechatpy."""
    reply = OfficialCrypto(token, key, APP_ID).encrypt_message(plaintext, nonce, str(ts))
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    signature = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    body = (
        "<xml><ToUserName><![CDATA[gh_0a1b2c3d4e5f]]></ToUserName>"
        f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    )
    query = {
        "signature": _sign(token, str(ts), nonce), "timestamp": str(ts), "nonce": nonce,
        "openid": "oUser1", "encrypt_type": "aes", "msg_signature": signature,
    }
    return query, body.encode()


def wecom_post(plaintext: str, *, ts: int = NOW, nonce: str = "n0nce") -> tuple[dict[str, str], bytes]:
    reply = WeComCrypto(TOKEN, AES_KEY, CORP_ID).encrypt_message(plaintext, nonce, str(ts))
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    signature = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    body = (
        f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt>"
        f"<AgentID><![CDATA[{AGENT_ID}]]></AgentID></xml>"
    )
    return {"msg_signature": signature, "timestamp": str(ts), "nonce": nonce}, body.encode()


def plaintext_query(ts: int = NOW, nonce: str = "n0nce") -> dict[str, str]:
    signature = _sign(TOKEN, str(ts), nonce)
    return {"signature": signature, "timestamp": str(ts), "nonce": nonce, "openid": "oUser1"}


# --- handshakes -------------------------------------------------------------------------------


async def test_official_account_handshake_echoes_when_signed(make_client: MakeClient) -> None:
    client = await make_client(FakeIngest())
    query = {**plaintext_query(), "echostr": "8361237982123"}
    response = await client.get("/wechat/demo", params=query)
    assert response.status == 200
    assert await response.text() == "8361237982123"
    bad = await client.get("/wechat/demo", params={**query, "signature": "0" * 40})
    assert bad.status == 401
    assert "8361237982123" not in await bad.text()


async def test_wecom_handshake_answers_the_decrypted_echostr(make_client: MakeClient) -> None:
    client = await make_client(FakeIngest())
    echostr = WeComPrp(__import__("base64").b64decode(AES_KEY + "=")).encrypt("1616140317555161061", CORP_ID)
    echostr = echostr.decode() if isinstance(echostr, bytes) else echostr
    query = {"msg_signature": _sign(TOKEN, str(NOW), "n", echostr), "timestamp": str(NOW), "nonce": "n",
             "echostr": echostr}
    response = await client.get("/wecom/helpdesk", params=query)
    assert response.status == 200
    assert await response.text() == "1616140317555161061"
    bad = await client.get("/wecom/helpdesk", params={**query, "nonce": "m"})
    assert bad.status == 401


async def test_unknown_account_is_404(make_client: MakeClient) -> None:
    client = await make_client(FakeIngest())
    assert (await client.get("/wechat/nope", params=plaintext_query())).status == 404


# --- safe mode --------------------------------------------------------------------------------


async def test_signed_encrypted_callback_is_acknowledged_after_ingest(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest)
    query, body = encrypted_post(TEXT)
    response = await client.post("/wechat/demo", params=query, data=body)
    assert response.status == 200
    assert await response.text() == "success"
    [envelope] = ingest.envelopes
    assert envelope.channel == "wechat"
    assert envelope.inbox == "wx-demo"
    assert envelope.tenant == "acme"
    assert envelope.body == body  # archived exactly as received
    assert envelope.meta["plaintext"] == TEXT
    assert envelope.meta["app_id"] == APP_ID
    assert envelope.meta["mode"] == "safe"
    assert envelope.signature_verified is True
    assert ingest.keys == ["acme/wechat/wx-demo/id:24600000000000001"]


async def test_wrong_signature_is_refused_before_ingest(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    metrics = Metrics()
    client = await make_client(ingest, metrics=metrics)
    query, body = encrypted_post(TEXT)
    response = await client.post("/wechat/demo", params={**query, "msg_signature": "f" * 40}, data=body)
    assert response.status == 401
    # A body signed for another token is refused the same way.
    query, body = encrypted_post(TEXT, token="sometoken")
    assert (await client.post("/wechat/demo", params=query, data=body)).status == 401
    assert ingest.envelopes == []
    # Counted for the signature-failure alert (deploy/prometheus/alerts.yml).
    labels = {"channel": "wechat", "inbox": "wx-demo", "reason": "signature"}
    assert metrics.registry.get_sample_value("ticketgate_refusals_total", labels) == 2


async def test_tampered_body_fails_the_signature(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest)
    query, body = encrypted_post(TEXT)
    tampered = body.replace(b"<Encrypt><![CDATA[", b"<Encrypt><![CDATA[AAAA")
    assert (await client.post("/wechat/demo", params=query, data=tampered)).status == 401
    assert ingest.envelopes == []


@pytest.mark.parametrize("skew", [-301, 301, 10_000])
async def test_stale_timestamp_is_403(make_client: MakeClient, skew: int) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest)
    query, body = encrypted_post(TEXT, ts=NOW + skew)
    assert (await client.post("/wechat/demo", params=query, data=body)).status == 403
    assert ingest.envelopes == []


async def test_timestamp_inside_window_is_accepted(make_client: MakeClient) -> None:
    client = await make_client(FakeIngest())
    query, body = encrypted_post(TEXT, ts=NOW - 299)
    assert (await client.post("/wechat/demo", params=query, data=body)).status == 200


@pytest.mark.parametrize(
    ("token", "key"), [(OLD_TOKEN, OLD_AES_KEY), (TOKEN, OLD_AES_KEY), (OLD_TOKEN, AES_KEY)]
)
async def test_previous_token_and_key_are_accepted_during_rotation(
    make_client: MakeClient, token: str, key: str
) -> None:
    rotating = settings({"previous_token": OLD_TOKEN, "previous_encoding_aes_key": OLD_AES_KEY})
    ingest = FakeIngest()
    client = await make_client(ingest, rotating)
    query, body = encrypted_post(TEXT, token=token, key=key)
    assert (await client.post("/wechat/demo", params=query, data=body)).status == 200
    assert ingest.envelopes[0].meta["plaintext"] == TEXT
    # Without the rotation settings the old secrets are refused.
    plain_client = await make_client(FakeIngest())
    assert (await plain_client.post("/wechat/demo", params=query, data=body)).status in (400, 401)


async def test_compatible_mode_uses_the_encrypted_part(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest, settings({"mode": "compatible"}))
    query, body = encrypted_post(TEXT)
    # Compatible mode also carries the plaintext fields; only the signed ciphertext is believed.
    body = body.replace(b"</xml>", b"<Content><![CDATA[forged]]></Content></xml>")
    assert (await client.post("/wechat/demo", params=query, data=body)).status == 200
    assert ingest.envelopes[0].meta["plaintext"] == TEXT
    assert ingest.envelopes[0].meta["mode"] == "compatible"


# --- plaintext mode ---------------------------------------------------------------------------


async def test_plaintext_is_refused_unless_allowed(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest)
    response = await client.post("/wechat/demo", params=plaintext_query(), data=TEXT.encode())
    assert response.status == 403
    assert ingest.envelopes == []


async def test_plaintext_when_allowed_is_not_marked_verified(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest, settings({"mode": "plaintext", "allow_plaintext": True}))
    response = await client.post("/wechat/demo", params=plaintext_query(), data=TEXT.encode())
    assert response.status == 200
    [envelope] = ingest.envelopes
    assert envelope.signature_verified is False
    assert envelope.meta["mode"] == "plaintext"
    forged = {**plaintext_query(), "signature": "0" * 40}
    bad = await client.post("/wechat/demo", params=forged, data=TEXT.encode())
    assert bad.status == 401
    assert len(ingest.envelopes) == 1


# --- hostile input ----------------------------------------------------------------------------

ATTACKS = sorted(p.name for p in DEFUSED.glob("*.xml")) if DEFUSED.is_dir() else []


@pytest.mark.skipif(not DEFUSED.is_dir(), reason="defusedxml corpus not present")
@pytest.mark.parametrize("name", ATTACKS)
async def test_xml_attacks_are_400_as_body_and_as_plaintext(make_client: MakeClient, name: str) -> None:
    attack = (DEFUSED / name).read_bytes()
    ingest = FakeIngest()
    client = await make_client(ingest, settings({"mode": "compatible", "allow_plaintext": True}))
    # 1. As a plaintext body, correctly signed.
    response = await client.post("/wechat/demo", params=plaintext_query(), data=attack)
    assert response.status == 400, await response.text()
    # 2. As the decrypted plaintext inside a correctly signed Encrypt.
    query, body = encrypted_post(attack.decode("utf-8"))
    response = await client.post("/wechat/demo", params=query, data=body)
    assert response.status == 400, await response.text()
    # 3. As the outer body of a safe-mode callback, with a valid signed Encrypt spliced in.
    encrypt = re.search(rb"<Encrypt>.*?</Encrypt>", body).group(0)  # type: ignore[union-attr]
    last_close = attack.rindex(b"</")
    spliced = attack[:last_close] + encrypt + attack[last_close:]
    response = await client.post("/wechat/demo", params=query, data=spliced)
    assert response.status == 400, await response.text()
    # 4. Inside a WeCom callback.
    query, body = wecom_post(attack.decode("utf-8"))
    response = await client.post("/wecom/helpdesk", params=query, data=body)
    assert response.status == 400, await response.text()
    assert ingest.envelopes == []


async def test_oversized_body_is_413(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest, settings(max_body_bytes=1024))
    query, body = encrypted_post(TEXT.replace("我的订单在哪里", "x" * 4000))
    assert (await client.post("/wechat/demo", params=query, data=body)).status == 413
    assert ingest.envelopes == []


async def test_body_without_encrypt_is_400(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest)
    query, _ = encrypted_post(TEXT)
    assert (await client.post("/wechat/demo", params=query, data=TEXT.encode())).status == 400
    assert ingest.envelopes == []


# --- answers ----------------------------------------------------------------------------------


async def test_retry_result_is_503(make_client: MakeClient) -> None:
    client = await make_client(FakeIngest(IngestResult(outcome=Outcome.RETRY, retry_after=7)))
    query, body = encrypted_post(TEXT)
    response = await client.post("/wechat/demo", params=query, data=body)
    assert response.status == 503
    assert response.headers["Retry-After"] == "7"
    assert await response.text() != "success"


async def test_retryable_error_is_503(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    ingest.raise_ = RetryableError("disk low")
    client = await make_client(ingest)
    query, body = encrypted_post(TEXT)
    assert (await client.post("/wechat/demo", params=query, data=body)).status == 503


async def test_rejected_result_is_400(make_client: MakeClient) -> None:
    client = await make_client(FakeIngest(IngestResult(outcome=Outcome.REJECTED, reason="not ours")))
    query, body = encrypted_post(TEXT)
    assert (await client.post("/wechat/demo", params=query, data=body)).status == 400


async def test_slow_store_is_503_within_the_deadline_and_never_success(make_client: MakeClient) -> None:
    ingest = FakeIngest(delay=0.5)
    client = await make_client(ingest, settings(ingest_timeout=0.1))
    query, body = encrypted_post(TEXT)
    started = time.monotonic()
    response = await client.post("/wechat/demo", params=query, data=body)
    assert response.status == 503
    assert time.monotonic() - started < 0.45


async def test_retry_storm_maps_to_one_idempotency_key(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest)
    event = TEXT.replace("<MsgType><![CDATA[text]]></MsgType>", "<MsgType><![CDATA[event]]></MsgType>"
                         "<Event><![CDATA[CLICK]]></Event><EventKey><![CDATA[HELP]]></EventKey>")
    for plaintext in (TEXT, event):
        ingest.keys.clear()
        # WeChat's retries are fresh deliveries: new nonce, new encryption, same message.
        posts = [encrypted_post(plaintext, nonce=f"nonce{i}") for i in range(3)]
        responses = await asyncio.gather(*(client.post("/wechat/demo", params=q, data=b) for q, b in posts))
        assert [r.status for r in responses] == [200, 200, 200]
        assert len(ingest.keys) == 3
        assert len(set(ingest.keys)) == 1


# --- WeCom ------------------------------------------------------------------------------------


async def test_wecom_callback_is_acknowledged_with_an_empty_body(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest)
    query, body = wecom_post(WECOM_TEXT)
    response = await client.post("/wecom/helpdesk", params=query, data=body)
    assert response.status == 200
    assert await response.text() == ""
    [envelope] = ingest.envelopes
    assert envelope.channel == "wecom"
    assert envelope.body == body
    assert envelope.meta["corp_id"] == CORP_ID
    assert envelope.signature_verified
    assert ingest.keys == ["acme/wecom/wecom-demo/id:7000000000000000001"]


async def test_wecom_refuses_bad_signature_stale_time_and_other_agents(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest)
    query, body = wecom_post(WECOM_TEXT)
    assert (await client.post("/wecom/helpdesk", params={**query, "nonce": "x"}, data=body)).status == 401
    query, body = wecom_post(WECOM_TEXT, ts=NOW - 3600)
    assert (await client.post("/wecom/helpdesk", params=query, data=body)).status == 403
    query, body = wecom_post(WECOM_TEXT.replace(f"<AgentID>{AGENT_ID}", "<AgentID>999"))
    assert (await client.post("/wecom/helpdesk", params=query, data=body)).status == 400
    assert ingest.envelopes == []


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["token", "encoding_aes_key"])
def test_missing_secret_fails_closed_naming_the_key(missing: str) -> None:
    config = settings()
    raw = config.channels["wechat"]["accounts"]["demo"]
    del raw[missing]
    with pytest.raises(ConfigError, match=rf"channels\.wechat\.accounts\.demo\.{missing}"):
        WeChatConnector.from_settings(config)
    raw_app = config.channels["wecom"]["apps"]["helpdesk"]
    del raw_app[missing]
    with pytest.raises(ConfigError, match=rf"channels\.wecom\.apps\.helpdesk\.{missing}"):
        WeComConnector.from_settings(config)


def test_plaintext_mode_needs_explicit_opt_in() -> None:
    with pytest.raises(ConfigError, match="allow_plaintext"):
        WeChatConnector.from_settings(settings({"mode": "plaintext"}))


def test_bad_aes_key_and_deadline_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="encoding_aes_key"):
        WeChatConnector.from_settings(settings({"encoding_aes_key": "short"}))
    with pytest.raises(ConfigError, match="ingest_timeout"):
        WeChatConnector.from_settings(settings(ingest_timeout=5))


def test_unconfigured_channel_gives_no_connector() -> None:
    assert WeChatConnector.from_settings(Settings()) is None


def test_secrets_never_appear_in_repr() -> None:
    connector = WeChatConnector.from_settings(settings())
    assert connector is not None
    assert TOKEN not in repr(connector.endpoints)
    assert AES_KEY not in repr(connector.endpoints)

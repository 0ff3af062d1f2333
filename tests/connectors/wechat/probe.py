"""Contract probes of the three WeChat channels (see ``tests/contract/kit.py``): callbacks signed
and encrypted as WeChat does; WeChat Customer Service also pulls its messages from a fake API."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp.test_utils import TestServer

from connectors.wechat.security import CallbackSecurity, Flavor, signature
from tests.connectors.wechat.fake_api import CORP_ID, CORP_SECRET, FakeWeChatApi
from tests.contract.kit import INBOX, Answer, Gateway, HttpDelivery, HttpProbe

TOKEN, AES_KEY = "contract-token", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APP_ID, AGENT_ID = "wx0123456789abcdef", 1000002
KFID = "wkContract0001"
LIMIT = 16 * 1024
# Unparseable after the Encrypt element: a handler that parsed before verifying would answer 400.
BROKEN_TAIL = "<MsgType><![CDATA[text"


class WeChatProbe(HttpProbe):
    """One callback flavor; ``ok_body`` is the answer WeChat takes for "received"."""

    def __init__(self, channel: str, flavor: Flavor, receive_id: str, ok_body: str) -> None:
        self.channel = channel
        self.ok_body = ok_body
        self.security = CallbackSecurity(
            flavor=flavor, receive_id=receive_id, tokens=(TOKEN,), aes_keys=(AES_KEY,)
        )

    def table(self) -> dict[str, Any]:
        return {"inbox": INBOX, "token": TOKEN, "encoding_aes_key": AES_KEY, "app_id": APP_ID}

    def tables(self) -> dict[str, Any]:
        table = {"max_body_bytes": LIMIT, "ingest_timeout": 1.0, self.key: {"demo": self.table()}}
        return {self.channel: table}

    key = "accounts"

    def message(self, n: int, text: str | None = None) -> str:
        return (
            "<xml><ToUserName><![CDATA[gh_contract]]></ToUserName>"
            f"<FromUserName><![CDATA[oUser{n}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{text or f'message {n}'}]]></Content>"
            f"<MsgId>{24600000000000000 + n}</MsgId></xml>"
        )

    def _callback(self, plaintext: str, *, tail: str = "", sign: bool = True) -> HttpDelivery:
        encrypt = self.security.encrypt(plaintext)
        timestamp, nonce = str(int(time.time())), "nonce"
        msg_signature = signature(TOKEN, timestamp, nonce, encrypt) if sign else "0" * 40
        body = f"<xml><ToUserName>x</ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt>{tail}</xml>"
        query = {
            "msg_signature": msg_signature, "timestamp": timestamp, "nonce": nonce, "encrypt_type": "aes"
        }
        return HttpDelivery(path=f"/{self.channel}/demo", body=body.encode(), query=query)

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        return self._callback(self.message(n, text))

    def forged(self, n: int) -> HttpDelivery:
        return self._callback(self.message(n), tail=BROKEN_TAIL, sign=False)

    def oversized(self) -> HttpDelivery:
        return self._callback(self.message(1), tail="<Pad>" + "x" * LIMIT + "</Pad>")

    def malformed(self) -> HttpDelivery:
        return self._callback("<xml><MsgType><![CDATA[text")

    def answer(self, status: int, text: str) -> Answer:
        if status == 200:
            # WeChat retries anything but its success body.
            return Answer(kind="accepted" if text == self.ok_body else "retry", status=status, text=text)
        return super().answer(status, text)


class WeComProbe(WeChatProbe):
    key = "apps"

    def table(self) -> dict[str, Any]:
        table = {**super().table(), "corp_id": CORP_ID, "agent_id": AGENT_ID}
        del table["app_id"]
        return table

    def message(self, n: int, text: str | None = None) -> str:
        return (
            f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName>"
            f"<FromUserName><![CDATA[user{n}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{text or f'message {n}'}]]></Content><MsgId>{7000000000000000000 + n}</MsgId>"
            f"<AgentID>{AGENT_ID}</AgentID></xml>"
        )


class KfProbe(WeComProbe):
    """The callback only announces; the messages come from ``sync_msg`` of a fake WeChat API."""

    def __init__(self) -> None:
        super().__init__("wechat_kf", "wecom", CORP_ID, "")
        self.fake = FakeWeChatApi()

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[None]:
        self.fake = FakeWeChatApi(token_apps={CORP_ID: CORP_SECRET}, ignore_cursor=True)
        server = TestServer(self.fake.app())
        await server.start_server()
        self.fake.base_url = str(server.make_url("")).rstrip("/")
        try:
            yield
        finally:
            await server.close()

    def table(self) -> dict[str, Any]:
        table = {**super().table(), "secret": CORP_SECRET, "api_base": self.fake.base_url}
        del table["agent_id"]
        return table

    def message(self, n: int, text: str | None = None) -> str:
        item = {
            "msgid": f"msg-{n}", "open_kfid": KFID, "external_userid": f"wmContract{n}",
            "send_time": int(time.time()), "origin": 3, "msgtype": "text",
            "text": {"content": text or f"message {n}"},
        }
        if item not in self.fake.kf_messages:
            self.fake.kf_messages.append(item)
        return (
            f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><CreateTime>{int(time.time())}</CreateTime>"
            "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
            f"<Token><![CDATA[token-{n}]]></Token><OpenKfId><![CDATA[{KFID}]]></OpenKfId></xml>"
        )

    async def settle(self, gateway: Gateway) -> None:
        """The syncs the callbacks started (tasks named by the connector) are over."""
        syncs = [t for t in asyncio.all_tasks() if t.get_name().startswith("ticketgate-kf-sync-")]
        await asyncio.gather(*syncs, return_exceptions=True)


class MiniProgramProbe(WeChatProbe):
    """A Mini Program in JSON format and safe mode: ``{"ToUserName", "Encrypt"}`` bodies."""

    key = "apps"

    def __init__(self) -> None:
        super().__init__("miniprogram", "official_account", APP_ID, "success")

    def table(self) -> dict[str, Any]:
        return {**super().table(), "data_format": "json"}

    def message(self, n: int, text: str | None = None) -> str:
        return orjson.dumps({
            "ToUserName": "gh_contract", "FromUserName": f"oMiniUser{n}", "CreateTime": int(time.time()),
            "MsgType": "text", "Content": text or f"message {n}", "MsgId": 24700000000000000 + n,
        }).decode()

    def _callback(self, plaintext: str, *, tail: str = "", sign: bool = True) -> HttpDelivery:
        encrypt = self.security.encrypt(plaintext)
        timestamp, nonce = str(int(time.time())), "nonce"
        msg_signature = signature(TOKEN, timestamp, nonce, encrypt) if sign else "0" * 40
        body = f'{{"ToUserName": "gh_contract", "Encrypt": "{encrypt}"{tail}}}'
        query = {
            "msg_signature": msg_signature, "timestamp": timestamp, "nonce": nonce, "encrypt_type": "aes"
        }
        return HttpDelivery(path="/miniprogram/demo", body=body.encode(), query=query,
                            headers={"Content-Type": "application/json"})

    def forged(self, n: int) -> HttpDelivery:
        # Broken JSON after the Encrypt member: a handler that parsed before verifying answers 400.
        return self._callback(self.message(n), tail=', "MsgType": [', sign=False)

    def oversized(self) -> HttpDelivery:
        return self._callback(self.message(1), tail=', "Pad": "' + "x" * LIMIT + '"')

    def malformed(self) -> HttpDelivery:
        return self._callback('{"MsgType": "text", ')


PROBES = {
    "miniprogram": MiniProgramProbe(),
    "wechat": WeChatProbe("wechat", "official_account", APP_ID, "success"),
    "wecom": WeComProbe("wecom", "wecom", CORP_ID, ""),
    "wechat_kf": KfProbe(),
}

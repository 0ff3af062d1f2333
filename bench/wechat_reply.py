"""Replies per second through the WeChat senders (Official Account, WeCom, 微信客服) to a local server
answering like WeChat, with the channels' real context on a SQLite store (the token shared through it).

    .venv/bin/python -m bench.wechat_reply --replies 2000 --concurrency 8

Prints sends per second and the latency of one send (p50 / p99) per channel. What it measures is
the sender's own cost (JSON, the token, the HTTP call to a local server), not WeChat's: the real
API allows 500 000 customer-service calls a day per account, which the channels' rate stays under.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from connectors.wechat import WECHAT, WECHAT_KF, WECOM, WeChatConnector, WeChatKfConnector, WeComConnector
from core.channel import OutboundReply, SenderSpec
from core.model import Identity, IdentityKind
from core.settings import OutboxSettings, Settings, StoreSettings
from gateway.channels import GatewayContext
from gateway.metrics import Metrics
from gateway.store.sqlite import SQLiteStore
from tests.connectors.wechat.fake_api import APP_ID, APP_SECRET, CORP_ID, CORP_SECRET, FakeWeChatApi

TOKEN, AES_KEY = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
DESCRIPTORS = {"wechat": WECHAT, "wecom": WECOM, "wechat_kf": WECHAT_KF}
KFID, EXTERNAL = "wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q", "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw"


def settings(base: str) -> Settings:
    common = {"token": TOKEN, "encoding_aes_key": AES_KEY, "api_base": base}
    return Settings.model_validate({
        "tenants": {"acme": {}},
        "inboxes": {"wx": {"tenant": "acme"}, "wecom": {"tenant": "acme"}, "kf": {"tenant": "acme"}},
        "channels": {
            "wechat": {"accounts": {"a": {"inbox": "wx", "app_id": APP_ID, "app_secret": APP_SECRET,
                                          **common}}},
            "wecom": {"apps": {"a": {"inbox": "wecom", "corp_id": CORP_ID, "agent_id": 1000002,
                                     "corp_secret": CORP_SECRET, **common}}},
            "wechat_kf": {"apps": {"a": {"inbox": "kf", "corp_id": CORP_ID, "secret": CORP_SECRET,
                                         **common}}},
        },
    })


def reply(channel: str, n: int) -> OutboundReply:
    recipients = {
        "wechat": (Identity(kind=IdentityKind.WECHAT_OPENID, value=f"{APP_ID}:oBench", verified=True), "wx"),
        "wecom": (
            Identity(kind=IdentityKind.WECOM_USERID, value=f"{CORP_ID}:zhangsan", verified=True), "wecom"
        ),
        "wechat_kf": (Identity(kind=IdentityKind.WECOM_EXTERNAL_USERID, value=f"{CORP_ID}:{EXTERNAL}",
                               verified=True), "kf"),
    }
    recipient, inbox = recipients[channel]
    return OutboundReply(
        reply_id=f"rpl_{n:032x}", command_id=f"c{n}", tenant="acme", channel=channel, inbox=inbox,
        thread_id=f"thr_{n:032x}", thread_number=n, subject=None, recipient=recipient,
        text="您好，您的订单已发货，预计明天送达。",
        answering={"open_kfid": KFID, "external_userid": EXTERNAL},
    )


async def run(replies: int, concurrency: int) -> None:
    fake = FakeWeChatApi()
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.base_url = f"http://127.0.0.1:{port}"
    config = settings(fake.base_url)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(
            StoreSettings.model_validate({"path": Path(tmp) / "tg.db", "blob_dir": Path(tmp) / "blobs",
                                          "min_free_disk_mb": 0}),
            OutboxSettings(),
        )
        await store.open()
        specs: dict[str, SenderSpec] = {}
        app = web.Application()
        for cls in (WeChatConnector, WeComConnector, WeChatKfConnector):
            connector = cls.from_settings(config)
            assert connector is not None
            descriptor = DESCRIPTORS[connector.name]

            async def no_ingest(*_: Any) -> Any:
                raise RuntimeError("no ingest in the bench")

            ctx = GatewayContext(app, descriptor, settings=config, ingest=no_ingest,
                                 store=store, metrics=Metrics(), senders=specs)
            connector.setup(ctx)
        app.freeze()
        await app.startup()  # the channels' lifecycles: HTTP sessions, fetchers, the 微信客服 poller
        try:
            for channel in ("wechat", "wecom", "wechat_kf"):
                sender = specs[channel].sender
                await sender.send(reply(channel, 0))  # the token, fetched once
                latencies: list[float] = []
                queue = iter(range(1, replies + 1))

                async def worker(channel: str = channel, sender: Any = sender,
                                 queue: Any = queue, latencies: list[float] = latencies) -> None:
                    for n in queue:
                        started = time.perf_counter()
                        await sender.send(reply(channel, n))
                        latencies.append(time.perf_counter() - started)

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                elapsed = time.perf_counter() - started
                latencies.sort()
                p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
                print(f"{channel:10s} {replies} replies in {elapsed:.2f} s: {replies / elapsed:8.0f} /s, "
                      f"p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms "
                      f"(token fetches so far: {fake.token_fetches})")
        finally:
            await app.cleanup()
            await store.close()
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replies", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    asyncio.run(run(args.replies, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())

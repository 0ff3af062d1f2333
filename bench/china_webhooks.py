"""Mini Program, Douyin and Weibo push benchmark: signed pushes into the real app.

The real application (verification, decryption for the Mini Program, pipeline, SQLite store with
group commit, inline outbox relay to an in-memory publisher) on a local port; a client posts signed
pushes at a fixed concurrency over keep-alive connections. Prints pushes/s answered with the
platform's success and the answer latency p50/p99/max against the platform's 5 s. Figures from a
shared, loaded machine: compare ratios, not absolutes.

Usage: .venv/bin/python bench/china_webhooks.py [--pushes 1000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.wechat_send import as_json_callback, build_callback  # noqa: E402
from connectors.douyin.account import signature as douyin_signature  # noqa: E402
from connectors.weibo.account import signature as weibo_signature  # noqa: E402
from core.settings import Settings  # noqa: E402
from gateway.app import Overrides, create_app  # noqa: E402
from gateway.publisher import MemoryPublisher  # noqa: E402

TOKEN, AES_KEY, APP_ID = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "wx0123456789abcdef"
DOUYIN_SECRET, WEIBO_SECRET = "bench-douyin-secret", "bench-weibo-secret"


def settings(tmp: Path) -> Settings:
    return Settings.model_validate(
        {
            "server": {"normalizer_process": False},
            "store": {"path": str(tmp / "bench.db"), "blob_dir": str(tmp / "blobs")},
            "outbox": {"relay": "inline"},
            "control": {"enabled": False},
            "tenants": {"acme": {}},
            "inboxes": {"cn": {"tenant": "acme"}},
            "channels": {
                "miniprogram": {
                    "apps": {
                        "bench": {
                            "inbox": "cn",
                            "app_id": APP_ID,
                            "token": TOKEN,
                            "encoding_aes_key": AES_KEY,
                        }
                    }
                },
                "douyin": {
                    "apps": {
                        "bench": {"inbox": "cn", "client_key": "awbench", "client_secret": DOUYIN_SECRET}
                    }
                },
                "weibo": {"accounts": {"bench": {"inbox": "cn", "app_secret": WEIBO_SECRET}}},
            },
        }
    )


Request = tuple[str, bytes, dict[str, str]]  # path with query, body, headers


def mini(n: int) -> Request:
    plaintext = orjson.dumps(
        {
            "ToUserName": "gh",
            "FromUserName": f"oBench{n % 5000}",
            "CreateTime": 1764921600,
            "MsgType": "text",
            "Content": f"退款 {n} 什么时候到账？",
            "MsgId": 24700000000000000 + n,
        }
    )
    query, body = build_callback(plaintext.decode(), token=TOKEN, aes_key=AES_KEY, app_id=APP_ID)
    return f"/miniprogram/bench?{query}", as_json_callback(body), {"Content-Type": "application/json"}


def douyin(n: int) -> Request:
    body = orjson.dumps(
        {
            "event": "im_receive_msg",
            "client_key": "awbench",
            "from_user_id": f"_000bench{n % 5000}",
            "to_user_id": "_000brand",
            "content": {
                "conversation_short_id": f"@c{n % 5000}==",
                "server_message_id": f"@bench{n}==",
                "conversation_type": 1,
                "message_type": "text",
                "text": f"耳机 {n} 没声音",
                "create_time": 1764921600000 + n,
            },
        }
    )
    return (
        "/douyin/bench",
        body,
        {
            "Content-Type": "application/json",
            "Msg-Id": str(n),
            "X-Douyin-Signature": douyin_signature(DOUYIN_SECRET, body),
        },
    )


def weibo(n: int) -> Request:
    body = orjson.dumps(
        {
            "type": "text",
            "receiver_id": 1902538057,
            "sender_id": 2_000_000_000 + n % 5000,
            "created_at": f"Fri Dec 05 16:{n // 60 % 60:02d}:{n % 60:02d} +0800 2025",
            "text": f"快递 {n} 没动",
            "data": {"n": n},
        }
    )
    ts, nonce = str(int(time.time() * 1000)), f"{n}"
    query = f"signature={weibo_signature(WEIBO_SECRET, ts, nonce)}&timestamp={ts}&nonce={nonce}"
    return f"/weibo/bench?{query}", body, {"Content-Type": "application/json"}


SHAPES: list[tuple[str, Callable[[int], Request], str]] = [
    ("Mini Program (JSON, AES)", mini, "success"),
    ("Douyin", douyin, '{"err_no":0}'),
    ("Weibo", weibo, ""),
]


async def run(name: str, make: Callable[[int], Request], ok: str, pushes: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = TestServer(create_app(settings(Path(tmp)), Overrides(publisher=MemoryPublisher())))
        await server.start_server()
        queue: asyncio.Queue[Request] = asyncio.Queue()
        for n in range(pushes):
            queue.put_nowait(make(n))
        latencies: list[float] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

            async def worker() -> None:
                while not queue.empty():
                    path, body, headers = queue.get_nowait()
                    started = time.perf_counter()
                    async with session.post(
                        str(server.make_url("")).rstrip("/") + path, data=body, headers=headers
                    ) as resp:
                        text = await resp.text()
                        if resp.status != 200 or text != ok:
                            raise RuntimeError(f"{name}: answered {resp.status} {text!r}")
                    latencies.append(time.perf_counter() - started)

            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
        await server.close()
    q = statistics.quantiles(latencies, n=100)
    print(
        f"{name:<26} {pushes / elapsed:7.0f} pushes/s  answer p50 {q[49] * 1000:6.1f} ms "
        f"p99 {q[98] * 1000:6.1f} ms max {max(latencies) * 1000:6.1f} ms (deadline 5 s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushes", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    for name, make, ok in SHAPES:
        asyncio.run(run(name, make, ok, args.pushes, args.concurrency))


if __name__ == "__main__":
    main()

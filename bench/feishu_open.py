"""Cost of opening one Feishu callback in-process: the signature check, AES decryption and parse
(``open_callback``), the normalizer, and what a forged request costs (refused before decrypting).

    .venv/bin/python -m bench.feishu_open --count 20000

Figures are per event on this machine (single core, no I/O); the HTTP and store path is measured by
the e2e suite, not here.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

import orjson

from connectors.feishu.app import App
from connectors.feishu.connector import Refused, open_callback
from connectors.feishu.crypto import encrypt, signature
from core.model import RawEnvelope
from normalizers.feishu import normalize

KEY, TOKEN = "bench-encrypt-key", "bench-token"
APP = App(
    inbox="bench",
    tenant="bench",
    mode="http",
    host="feishu",
    api_base="http://127.0.0.1:9",
    app_id="cli_bench",
    bot_open_id="",
    fetch_media=False,
    directory_emails=False,
    reply_in_thread=True,
    app_secret="",
    tokens=(TOKEN,),
    keys=(KEY,),
)


def body(n: int) -> bytes:
    event = {
        "schema": "2.0",
        "header": {
            "event_id": f"ev{n}",
            "event_type": "im.message.receive_v1",
            "token": TOKEN,
            "app_id": "cli_bench",
            "tenant_key": "t",
        },
        "event": {
            "sender": {
                "sender_id": {"open_id": f"ou_{n % 500}", "union_id": f"on_{n % 500}"},
                "sender_type": "user",
                "tenant_key": "t",
            },
            "message": {
                "message_id": f"om_{n}",
                "chat_id": f"oc_{n % 500}",
                "chat_type": "p2p",
                "message_type": "text",
                "create_time": "1764921600000",
                "content": orjson.dumps({"text": f"message {n}: VPN down"}).decode(),
            },
        },
    }
    return orjson.dumps({"encrypt": encrypt(orjson.dumps(event), KEY)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    now = time.time()
    ts, nonce = str(int(now)), "bench-nonce"
    requests = [(b, signature(ts, nonce, KEY, b)) for b in (body(n) for n in range(args.count))]
    started = time.perf_counter()
    plains = [
        open_callback(APP, b, signed=s, timestamp=ts, nonce=nonce, now=now, window=300.0)[0]
        for b, s in requests
    ]
    opened = time.perf_counter() - started
    received = datetime.now(UTC)
    started = time.perf_counter()
    for plain in plains:
        normalize(
            RawEnvelope(
                channel="feishu",
                tenant="bench",
                inbox="bench",
                body=plain,
                received_at=received,
                signature_verified=True,
            )
        )
    normalized = time.perf_counter() - started
    started = time.perf_counter()
    refused = 0
    for b, _ in requests:
        try:
            open_callback(APP, b, signed="0" * 64, timestamp=ts, nonce=nonce, now=now, window=300.0)
        except Refused:
            refused += 1
    forged = time.perf_counter() - started
    n = args.count
    print(f"events: {n}")
    print(f"verify + decrypt + parse: {opened / n * 1e6:.1f} us/event ({n / opened:,.0f}/s)")
    print(f"normalize:                {normalized / n * 1e6:.1f} us/event")
    print(f"forged, refused:          {forged / n * 1e6:.1f} us/request ({refused} of {n} refused)")


if __name__ == "__main__":
    main()

"""Send an encrypted (safe-mode) WeChat Official Account test callback to a running gateway.

    .venv/bin/python -m bench.wechat_send "我的订单在哪里？"

Defaults match the demo account of config/ticketgate.dev.toml (/wechat/demo, token devtoken,
EncodingAESKey abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG, app id wx0123456789abcdef) at
http://127.0.0.1:8080. The callback is built with wechatpy's own crypto, exactly as WeChat sends it.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import time
from html import escape
from urllib.parse import urlencode
from urllib.request import Request, urlopen

from wechatpy.crypto import WeChatCrypto

DEV_URL = "http://127.0.0.1:8080/wechat/demo"
DEV_TOKEN = "devtoken"
DEV_AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
DEV_APP_ID = "wx0123456789abcdef"


def text_xml(text: str, *, openid: str, msg_id: int, create_time: int | None = None) -> str:
    created = create_time if create_time is not None else int(time.time())
    content = text.replace("]]>", "]]]]><![CDATA[>")
    return (
        f"<xml><ToUserName><![CDATA[gh_demo]]></ToUserName><FromUserName><![CDATA[{escape(openid)}]]></FromUserName>"
        f"<CreateTime>{created}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[{content}]]></Content><MsgId>{msg_id}</MsgId></xml>"
    )


def build_callback(
    plaintext: str,
    *,
    token: str = DEV_TOKEN,
    aes_key: str = DEV_AES_KEY,
    app_id: str = DEV_APP_ID,
    timestamp: int | None = None,
) -> tuple[str, bytes]:
    """The query string and body of a safe-mode callback carrying ``plaintext``."""
    ts = str(timestamp if timestamp is not None else int(time.time()))
    nonce = secrets.token_hex(8)
    reply = WeChatCrypto(token, aes_key, app_id).encrypt_message(plaintext, nonce, ts)
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]>", reply)
    signature = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]>", reply)
    if encrypt is None or signature is None:
        raise RuntimeError("wechatpy produced no Encrypt / MsgSignature")
    body = (
        "<xml><ToUserName><![CDATA[gh_demo]]></ToUserName>"
        f"<Encrypt><![CDATA[{encrypt.group(1)}]]></Encrypt></xml>"
    )
    query = urlencode(
        {"timestamp": ts, "nonce": nonce, "encrypt_type": "aes", "msg_signature": signature.group(1)}
    )
    return query, body.encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("text", nargs="?", default="你好，我的订单还没有到。")
    parser.add_argument("--url", default=DEV_URL)
    parser.add_argument("--token", default=DEV_TOKEN)
    parser.add_argument("--aes-key", default=DEV_AES_KEY)
    parser.add_argument("--app-id", default=DEV_APP_ID)
    parser.add_argument("--openid", default="oDemoUser0001")
    parser.add_argument("--msg-id", type=int, default=None, help="MsgId (repeat one to see the dedupe)")
    args = parser.parse_args(argv)
    msg_id = args.msg_id if args.msg_id is not None else int(time.time() * 1000)
    plaintext = text_xml(args.text, openid=args.openid, msg_id=msg_id)
    query, body = build_callback(plaintext, token=args.token, aes_key=args.aes_key, app_id=args.app_id)
    request = Request(f"{args.url}?{query}", data=body, headers={"Content-Type": "text/xml"}, method="POST")
    started = time.perf_counter()
    try:
        with urlopen(request, timeout=10) as resp:
            status, answer = resp.status, resp.read().decode("utf-8", "replace")
    except OSError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    print(f"MsgId {msg_id}: HTTP {status} {answer!r} in {(time.perf_counter() - started) * 1000:.1f} ms")
    return 0 if status == 200 and answer == "success" else 1


if __name__ == "__main__":
    sys.exit(main())

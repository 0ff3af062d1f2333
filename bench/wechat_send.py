"""Send an encrypted (safe-mode) WeChat Official Account or WeCom test callback to a running gateway.

    .venv/bin/python -m bench.wechat_send "我的订单在哪里？"
    .venv/bin/python -m bench.wechat_send --wecom "报销单号 4711 还没批"
    .venv/bin/python -m bench.wechat_send --miniprogram "退款什么时候到账？"

Defaults match the demo account and the demo WeCom app of config/ticketgate.dev.toml
(/wechat/demo and /wecom/demo, token devtoken, EncodingAESKey
abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG, app id wx0123456789abcdef, corp id
ww0123456789abcdef, AgentID 1000002) at http://127.0.0.1:8080. The callback is built with
wechatpy's own crypto, exactly as WeChat (and WeCom, which signs and encrypts the same way with the
CorpID in place of the AppID) sends it.
"""

from __future__ import annotations

import argparse
import json
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
DEV_WECOM_URL = "http://127.0.0.1:8080/wecom/demo"
DEV_CORP_ID = "ww0123456789abcdef"
DEV_AGENT_ID = 1000002
DEV_MINIPROGRAM_URL = "http://127.0.0.1:8080/miniprogram/demo"


def text_xml(
    text: str, *, openid: str, msg_id: int, create_time: int | None = None, agent_id: int | None = None
) -> str:
    """A text message; with ``agent_id`` as a WeCom app receives it (the sender is a userid)."""
    created = create_time if create_time is not None else int(time.time())
    content = text.replace("]]>", "]]]]><![CDATA[>")
    agent = f"<AgentID>{agent_id}</AgentID>" if agent_id is not None else ""
    return (
        f"<xml><ToUserName><![CDATA[gh_demo]]></ToUserName><FromUserName><![CDATA[{escape(openid)}]]></FromUserName>"
        f"<CreateTime>{created}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[{content}]]></Content><MsgId>{msg_id}</MsgId>{agent}</xml>"
    )


def text_json(text: str, *, openid: str, msg_id: int, create_time: int | None = None) -> str:
    """A Mini Program text message in the JSON data format (数据格式 JSON)."""
    created = create_time if create_time is not None else int(time.time())
    return json.dumps({"ToUserName": "gh_demo_mini", "FromUserName": openid, "CreateTime": created,
                       "MsgType": "text", "Content": text, "MsgId": msg_id}, ensure_ascii=False)


def as_json_callback(body: bytes) -> bytes:
    """A safe-mode XML body as the JSON body a Mini Program in JSON format receives."""
    encrypt = re.search(rb"<Encrypt><!\[CDATA\[(.*?)\]\]>", body)
    if encrypt is None:
        raise RuntimeError("no Encrypt element")
    return json.dumps({"ToUserName": "gh_demo_mini", "Encrypt": encrypt.group(1).decode()}).encode()


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
    parser.add_argument("--wecom", action="store_true", help="a WeCom app callback (the dev app's defaults)")
    parser.add_argument("--miniprogram", action="store_true",
                        help="a Mini Program customer-service push in JSON format (the dev Mini Program)")
    parser.add_argument("--url", default=None, help=f"default {DEV_URL}, with --wecom {DEV_WECOM_URL}, "
                        f"with --miniprogram {DEV_MINIPROGRAM_URL}")
    parser.add_argument("--token", default=DEV_TOKEN)
    parser.add_argument("--aes-key", default=DEV_AES_KEY)
    parser.add_argument("--app-id", default=None, help=f"AppID, or with --wecom the CorpID ({DEV_CORP_ID})")
    parser.add_argument("--agent-id", type=int, default=DEV_AGENT_ID, help="with --wecom: the app's AgentID")
    parser.add_argument("--openid", default=None, help="the sender: an openid, or with --wecom a userid")
    parser.add_argument("--msg-id", type=int, default=None, help="MsgId (repeat one to see the dedupe)")
    args = parser.parse_args(argv)
    url = args.url or (DEV_WECOM_URL if args.wecom else DEV_MINIPROGRAM_URL if args.miniprogram else DEV_URL)
    app_id = args.app_id or (DEV_CORP_ID if args.wecom else DEV_APP_ID)
    sender = args.openid or ("zhangsan" if args.wecom else "oDemoUser0001")
    msg_id = args.msg_id if args.msg_id is not None else int(time.time() * 1000)
    agent_id = args.agent_id if args.wecom else None
    if args.miniprogram:
        plaintext = text_json(args.text, openid=sender, msg_id=msg_id)
    else:
        plaintext = text_xml(args.text, openid=sender, msg_id=msg_id, agent_id=agent_id)
    query, body = build_callback(plaintext, token=args.token, aes_key=args.aes_key, app_id=app_id)
    content_type = "text/xml"
    if args.miniprogram:
        body, content_type = as_json_callback(body), "application/json"
    request = Request(f"{url}?{query}", data=body, headers={"Content-Type": content_type}, method="POST")
    started = time.perf_counter()
    try:
        with urlopen(request, timeout=10) as resp:
            status, answer = resp.status, resp.read().decode("utf-8", "replace")
    except OSError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    print(f"MsgId {msg_id}: HTTP {status} {answer!r} in {(time.perf_counter() - started) * 1000:.1f} ms")
    # An Official Account callback is answered "success"; WeCom's with an empty 200.
    return 0 if status == 200 and (args.wecom or answer == "success") else 1


if __name__ == "__main__":
    sys.exit(main())

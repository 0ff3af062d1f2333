"""WeChat Mini Program customer-service messages (小程序客服消息) at ``/miniprogram/{app}``.

The protocol is the Official Account's (https://developers.weixin.qq.com/miniprogram/dev/framework/
server-ability/message-push.html): the same URL verification (``signature`` over the token,
timestamp and nonce; ``echostr`` echoed), the same ``msg_signature`` and AES in safe mode, the same
"answer ``success`` within 5 s or WeChat retries three times", and the same server API (tokens,
``/cgi-bin/media/get``, ``/cgi-bin/message/custom/send``). So this channel is the Official Account's
connector with two differences: the body may be JSON as well as XML (the console's 数据格式; in
safe mode the JSON body is ``{"ToUserName": ..., "Encrypt": ...}``), and the normalizer knows the
Mini Program's types (``miniprogrampage``, ``user_enter_tempsession``).

As for the Official Account, the signature is compared in constant time before anything of the body
is parsed (in safe mode the ``Encrypt`` value is found with a regular expression), XML goes only
through defusedxml (DTDs and entities refused), JSON through orjson with bounded size and depth, and
``success`` is answered only once the message is committed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Self

from aiohttp import web

from connectors.wechat.app import (
    CALLBACK,
    Endpoint,
    Handler,
    PlaintextRefused,
    _CallbackConnector,
    _credentials,
    _deliver,
    _endpoint,
    _envelope,
    _oa_handshake,
    _refusal,
    _table_options,
)
from connectors.wechat.security import CallbackSecurity, Clock, extract_encrypt, extract_json_encrypt
from connectors.wechat.sender import WINDOW_48H, MiniProgramSender
from connectors.wechat.settings import MiniProgramSettings
from core.errors import InvalidInput, VerificationError
from core.http import read_body
from core.settings import Settings, revealed_all
from normalizers.wechat_miniprogram import CHANNEL, looks_like_json, normalize, parse_document


class MiniProgramConnector(_CallbackConnector):
    """Mini Program message push, one route per ``[channels.miniprogram.apps.<name>]``."""

    name = CHANNEL
    flavor = "official_account"
    sender_class = MiniProgramSender
    # 48 hours after the user's last message (or entering the chat), as for an Official Account.
    reply_window = WINDOW_48H
    reply_rate = 5.0

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock = time.time) -> Self | None:
        table = settings.channel(CHANNEL, MiniProgramSettings)
        if table is None or not table.apps:
            return None
        endpoints: dict[str, Endpoint] = {}
        for name, app in table.apps.items():
            base = f"channels.{CHANNEL}.apps.{name}"
            token = settings.required(app.token, key=f"{base}.token", why=CALLBACK)
            if app.mode != "plaintext":
                settings.required(app.encoding_aes_key, key=f"{base}.encoding_aes_key", why=CALLBACK)
            endpoints[name] = Endpoint(
                name=name,
                tenant=settings.inbox(app.inbox, key=f"{base}.inbox").tenant,
                inbox=app.inbox,
                mode=app.mode,
                allow_plaintext=app.allow_plaintext,
                credentials=_credentials("official_account", app.api_base, app.app_id, app.app_secret),
                security=CallbackSecurity(
                    flavor="official_account",
                    receive_id=app.app_id,
                    tokens=(token, *revealed_all(app.previous_token)),
                    aes_keys=revealed_all(app.encoding_aes_key, app.previous_encoding_aes_key),
                    replay_window=app.replay_window,
                    clock=clock,
                ),
            )
        return cls(endpoints, clock=clock, **_table_options(table))

    def handlers(self) -> tuple[Handler, Handler]:
        return _oa_handshake, _callback


def _open_encrypted(endpoint: Endpoint, body: bytes, query: Mapping[str, str], max_bytes: int) -> str:
    """Safe mode: verify ``msg_signature`` over the Encrypt value found without a parser, then parse
    the outer document, check it carries that value, decrypt and parse the plaintext."""
    as_json = looks_like_json(body)
    encrypt = extract_json_encrypt(body) if as_json else extract_encrypt(body)
    endpoint.security.verify_msg(
        query.get("msg_signature", ""), query.get("timestamp", ""), query.get("nonce", ""), encrypt
    )
    outer = parse_document(body, max_bytes=max_bytes)
    if outer.get("Encrypt") != encrypt:
        raise InvalidInput("the parsed Encrypt is not the one that was verified")
    plaintext = endpoint.security.decrypt(encrypt)
    parse_document(plaintext, max_bytes=max_bytes)
    return plaintext


def _open_plaintext(endpoint: Endpoint, body: bytes, query: Mapping[str, str], max_bytes: int) -> str:
    """Plain mode (明文): the signature covers only timestamp and nonce, so it must be allowed."""
    if not endpoint.allow_plaintext:
        raise PlaintextRefused("plaintext delivery, but this Mini Program does not allow plaintext")
    endpoint.security.verify(query.get("signature", ""), query.get("timestamp", ""), query.get("nonce", ""))
    parse_document(body, max_bytes=max_bytes)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("body is not UTF-8") from None


async def _callback(request: web.Request) -> web.StreamResponse:
    runtime, endpoint = _endpoint(request)
    query = request.query
    encrypted = "msg_signature" in query or query.get("encrypt_type", "").lower() == "aes"
    try:
        body = await read_body(request, runtime.max_body_bytes)
        opened = _open_encrypted if encrypted else _open_plaintext
        plaintext = opened(endpoint, body, query, runtime.max_body_bytes)
    except (VerificationError, InvalidInput) as exc:
        return _refusal(runtime, endpoint, request, exc)
    meta = {
        "app_id": endpoint.security.receive_id,
        "mode": endpoint.mode if encrypted else "plaintext",
        "format": "json" if looks_like_json(plaintext) else "xml",
    }
    envelope = _envelope(runtime, endpoint, request, body, plaintext, meta, verified=encrypted)
    # WeChat documents "success" (or an empty body) as received; anything else is retried.
    return await _deliver(runtime, endpoint, envelope, ok_body="success", normalizer=normalize)

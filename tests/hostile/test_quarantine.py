"""Quarantine never fails on what a request carried: odd header names and bytes, NUL, surrogates.

A signed WeChat callback the normalizer cannot read is quarantined and answered ``success``; before,
its ``istr`` header names made orjson refuse the envelope, the answer was 503, and WeChat retried the
same callback for ever.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from multidict import CIMultiDict, istr

from core.model import RawEnvelope
from gateway.store.base import Store
from tests.hostile.kit import INBOX, TENANT, Gateway, wechat_callback

NO_MSGTYPE = (
    "<xml><ToUserName><![CDATA[gh_demo]]></ToUserName><FromUserName><![CDATA[oUser1]]></FromUserName>"
    f"<CreateTime>{int(time.time())}</CreateTime><Content><![CDATA[hello]]></Content>"
    "<MsgId>24600000000000001</MsgId></xml>"
)


async def test_a_signed_wechat_callback_without_msgtype_is_quarantined_and_answered_success(
    gateway: Gateway,
) -> None:
    path, body = wechat_callback(NO_MSGTYPE)
    head = f"POST {path} HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: text/xml\r\n".encode()
    head += b"X-Odd: \xc3\x28\r\nCookie: session=secret"
    status, answer = await gateway.raw_http(head, body)
    assert (status, answer) == (200, b"success")
    [record] = await gateway.store.quarantine_list()
    found = await gateway.store.quarantine_get(record.id)
    assert found is not None
    _, envelope = found
    assert envelope.body == body
    assert envelope.headers["x-odd"] == "\\xc3("
    assert "cookie" not in envelope.headers  # credentials are never kept
    [event] = await gateway.events(1)
    assert event["type"] == "message.quarantined"


async def test_the_store_quarantines_envelopes_whatever_their_text_holds(gateway: Gateway) -> None:
    store: Store = gateway.store
    hostile = "a\x00b\udcc3\ud800"
    envelope = RawEnvelope(
        channel="email",
        tenant=TENANT,
        inbox=INBOX,
        body=b"raw \x00 bytes",
        received_at=datetime.now(UTC),
        content_type=hostile,
        headers=CIMultiDict({istr("X-Name"): hostile}),
        remote=hostile,
        meta={"mail_from": hostile, "rcpt_tos": [hostile], istr("Odd-Key"): {hostile: hostile}},
    )
    record = await store.quarantine(envelope, f"normalizer error: ValueError: {hostile!s}")
    found = await store.quarantine_get(record.id)
    assert found is not None
    kept, back = found
    assert back.body == b"raw \x00 bytes"  # the raw bytes exactly
    assert "\x00" not in kept.reason
    assert "\\x00" in kept.reason
    assert back.headers == {"X-Name": "a\\x00b\\xc3\\ud800"}
    assert back.meta["mail_from"] == "a\\x00b\\xc3\\ud800"

"""WeChat Customer Service sync_msg items -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from core.errors import NormalizationError
from core.model import RawEnvelope
from normalizers.wechat_kf import normalize_kf

CORP = "ww0123456789abcdef"
USER = "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw"


def envelope(*items: dict[str, Any]) -> RawEnvelope:
    page = {"errcode": 0, "next_cursor": "4gw7", "has_more": 0, "msg_list": list(items)}
    return RawEnvelope(
        channel="wechat_kf",
        tenant="acme",
        inbox="kf",
        body=orjson.dumps(page),
        received_at=datetime(2025, 1, 1, tzinfo=UTC),
        signature_verified=True,
        meta={"corp_id": CORP, "account": "service", "open_kfid": "wkX"},
    )


def item(msgid: str, msgtype: str, origin: int = 3, **body: Any) -> dict[str, Any]:
    return {
        "msgid": msgid,
        "open_kfid": "wkX",
        "external_userid": USER,
        "send_time": 1615478585,
        "origin": origin,
        "msgtype": msgtype,
        msgtype: body,
    }


def test_every_item_of_a_page_in_order_with_types() -> None:
    messages = normalize_kf(
        envelope(
            item("1", "text", content="你好", menu_id="101"),
            item("2", "image", media_id="IMG"),
            item("3", "voice", media_id="VOC"),
            item("4", "video", media_id="VID"),
            item("5", "file", media_id="FIL"),
            item("6", "location", latitude=23.1, longitude=113.3, name="广州塔", address="海珠区"),
            item("7", "link", title="T", desc="D", url="https://x", pic_url="https://p"),
            item("8", "business_card", userid="zhangsan"),
            item("9", "miniprogram", title="Mini", appid="wxa", pagepath="p", thumb_media_id="TH"),
            item("10", "event", origin=4, event_type="msg_send_fail", fail_msgid="m", fail_type=4),
            item("11", "text", origin=5, content="agent reply"),
            item("12", "channels_shop_order", order_id="o1"),
        )
    )
    assert [m.external_id for m in messages] == [str(n) for n in range(1, 13)]
    assert messages[0].text == "你好"
    assert messages[0].extra["menu_id"] == "101"
    # What the way back (kf/send_msg) needs: the customer service account and the customer.
    assert (messages[0].extra["open_kfid"], messages[0].extra["external_userid"]) == ("wkX", USER)
    assert [(m.media[0].kind, m.media[0].ref) for m in messages[1:5]] == [
        ("image", "IMG"),
        ("voice", "VOC"),
        ("video", "VID"),
        ("file", "FIL"),
    ]
    assert messages[5].extra["latitude"] == 23.1
    assert messages[5].text == "广州塔\n海珠区"
    assert messages[6].text == "T\nD\nhttps://x"
    assert messages[7].extra["card_userid"] == "zhangsan"
    assert messages[8].extra["appid"] == "wxa"
    assert (messages[9].kind, messages[9].extra["event"], messages[9].extra["fail_msgid"]) == (
        "event",
        "msg_send_fail",
        "m",
    )
    assert messages[10].kind == "agent_message"
    assert messages[11].extra["item"]["channels_shop_order"] == {"order_id": "o1"}  # unknown: kept whole
    identity = messages[0].identities[0]
    assert (identity.kind, identity.value, identity.verified) == (
        "wecom_external_userid",
        f"{CORP}:{USER}",
        True,
    )
    assert messages[0].sent_at == datetime.fromtimestamp(1615478585, UTC)
    assert messages[0].idempotency_key() == "acme/wechat_kf/kf/id:1"


def test_enter_session_event_names_the_customer_from_the_event() -> None:
    event = {
        "msgid": "e1",
        "send_time": 1,
        "origin": 4,
        "msgtype": "event",
        "event": {
            "event_type": "enter_session",
            "open_kfid": "wkX",
            "external_userid": USER,
            "scene": "s",
            "scene_param": "p",
            "welcome_code": "W",
        },
    }
    [message] = normalize_kf(envelope(event))
    assert message.kind == "event"
    assert message.identities[0].value == f"{CORP}:{USER}"
    assert (message.extra["scene"], message.extra["welcome_code"]) == ("s", "W")


def test_a_broken_page_is_quarantined() -> None:
    bad = RawEnvelope(
        channel="wechat_kf",
        tenant="acme",
        inbox="kf",
        body=b"not json",
        received_at=datetime(2025, 1, 1, tzinfo=UTC),
    )
    with pytest.raises(NormalizationError):
        normalize_kf(bad)

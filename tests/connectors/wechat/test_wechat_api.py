"""The WeChat API client against a local server answering like WeChat: tokens, retries, media."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from fake_api import APP_ID, APP_SECRET, CORP_ID, CORP_SECRET, FakeMedia, FakeWeChatApi

from connectors.wechat.api import (
    REFRESH_MARGIN,
    ApiError,
    ApiUnavailable,
    Credentials,
    SharedTokens,
    TooLargeMedia,
    WeChatApi,
)


class Pauses:
    """Records the pauses the client asks for instead of sleeping."""

    def __init__(self) -> None:
        self.taken: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.taken.append(seconds)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeWeChatApi:
    api = FakeWeChatApi()
    server: TestServer = await aiohttp_server(api.app())
    api.base_url = str(server.make_url("")).rstrip("/")
    return api


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def client(
    fake: FakeWeChatApi, session: aiohttp.ClientSession, *, wecom: bool = False, **kw: Any
) -> WeChatApi:
    creds = (
        Credentials(flavor="wecom", api_base=fake.base_url, app_id=CORP_ID, secret=CORP_SECRET)
        if wecom
        else Credentials(flavor="official_account", api_base=fake.base_url, app_id=APP_ID, secret=APP_SECRET)
    )
    return WeChatApi(session, creds, **kw)


async def test_token_is_fetched_once_and_shared(fake: FakeWeChatApi, session: aiohttp.ClientSession) -> None:
    fake.media["m1"] = FakeMedia(b"one", "image/jpeg")
    fake.media["m2"] = FakeMedia(b"two", "image/jpeg")
    api = client(fake, session)
    first, second = await api.media("m1", max_bytes=100), await api.media("m2", max_bytes=100)
    assert (first.data, second.data) == (b"one", b"two")
    assert fake.token_fetches == 1
    assert [c[1]["access_token"] for c in fake.calls if c[0] == "media"] == ["ACCESS_TOKEN_1"] * 2
    assert "secret" not in repr(api.credentials)
    assert APP_SECRET not in repr(api.credentials)


async def test_wecom_token_uses_gettoken_with_the_corp_secret(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    api = client(fake, session, wecom=True)
    assert await api.token() == "ACCESS_TOKEN_1"
    [(name, query)] = fake.calls
    assert (name, query) == ("gettoken", {"corpid": CORP_ID, "corpsecret": CORP_SECRET})


async def test_token_is_refreshed_before_it_expires(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    api = client(fake, session, clock=clock)
    assert await api.token() == "ACCESS_TOKEN_1"
    clock.now += 7200 - REFRESH_MARGIN - 1
    assert await api.token() == "ACCESS_TOKEN_1"
    assert len(fake.stable_calls()) == 1
    clock.now += 2  # inside the margin: asked again although WeChat would still accept it
    await api.token()  # (stable_token hands out the next token in the last five minutes)
    assert len(fake.stable_calls()) == 2


async def test_expired_token_is_refreshed_once(fake: FakeWeChatApi, session: aiohttp.ClientSession) -> None:
    fake.media["m1"] = FakeMedia(b"bytes", "image/png")
    api = client(fake, session)
    await api.token()
    fake.expire_tokens()  # e.g. another process took a new token: the cached one answers 42001
    media = await api.media("m1", max_bytes=100)
    assert media.data == b"bytes"
    assert fake.token_fetches == 2
    assert [c[1]["access_token"] for c in fake.calls if c[0] == "media"] == [
        "ACCESS_TOKEN_1",
        "ACCESS_TOKEN_2",
    ]


async def test_a_token_refused_twice_is_an_error_not_a_loop(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    fake.media["m1"] = FakeMedia(b"bytes", "image/png")
    api = client(fake, session)
    fake.fail_next(
        "media",
        {"errcode": 40001, "errmsg": "invalid credential"},
        {"errcode": 40001, "errmsg": "invalid credential"},
    )
    with pytest.raises(ApiError) as raised:
        await api.media("m1", max_bytes=100)
    assert raised.value.errcode == 40001
    assert fake.token_fetches == 2


async def test_rate_limit_45009_backs_off_then_succeeds(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    fake.media["m1"] = FakeMedia(b"bytes", "image/png")
    pauses = Pauses()
    api = client(fake, session, sleep=pauses, backoff=2.0)
    fake.fail_next(
        "media",
        {"errcode": 45009, "errmsg": "reach max api daily quota limit"},
        {"errcode": -1, "errmsg": "system error"},
    )
    media = await api.media("m1", max_bytes=100)
    assert media.data == b"bytes"
    assert pauses.taken == [2.0, 4.0]


async def test_busy_beyond_the_retries_is_unavailable(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    pauses = Pauses()
    api = client(fake, session, sleep=pauses, retries=2)
    fake.fail_next("token", *[{"errcode": -1, "errmsg": "system error"}] * 3)
    with pytest.raises(ApiUnavailable):
        await api.token()
    assert pauses.taken == [1.0, 2.0]


async def test_media_download_keeps_type_and_file_name(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    fake.media["voice1"] = FakeMedia(b"#!AMR\n...", "audio/amr", filename="voice1.amr")
    media = await client(fake, session).media("voice1", max_bytes=100)
    assert (media.data, media.content_type, media.filename) == (b"#!AMR\n...", "audio/amr", "voice1.amr")


async def test_media_json_error_is_not_taken_for_the_file(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(ApiError) as raised:
        await client(fake, session).media("unknown", max_bytes=100)
    assert raised.value.errcode == 40007


async def test_media_over_the_bound_is_refused(fake: FakeWeChatApi, session: aiohttp.ClientSession) -> None:
    fake.media["big"] = FakeMedia(b"x" * 1000, "video/mp4")
    with pytest.raises(TooLargeMedia):
        await client(fake, session).media("big", max_bytes=999)


async def test_official_account_video_url_is_followed(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    fake.videos["vid1"] = b"\x00\x00\x00\x18ftypmp42"
    media = await client(fake, session).media("vid1", max_bytes=100)
    assert (media.data, media.content_type) == (b"\x00\x00\x00\x18ftypmp42", "video/mp4")


async def test_unreachable_api_is_unavailable(session: aiohttp.ClientSession) -> None:
    creds = Credentials(flavor="official_account", api_base="http://127.0.0.1:9", app_id=APP_ID, secret="s")
    pauses = Pauses()
    with pytest.raises(ApiUnavailable) as raised:
        await WeChatApi(session, creds, sleep=pauses, retries=1).token()
    assert "127.0.0.1" not in raised.value.reason  # URLs carry tokens and secrets: never in errors
    assert pauses.taken == [1.0]


class MemoryState:
    """The channel state's contract (get / put / compare_and_set) over a dict: one 'store'."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    async def put(self, key: str, value: bytes) -> None:
        self.values[key] = value

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes) -> bool:
        if self.values.get(key) != expected:
            return False
        self.values[key] = value
        return True


async def test_shared_token_is_fetched_by_one_instance_and_read_by_the_others(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    state = MemoryState()
    first, second = client(fake, session, state=state), client(fake, session, state=state)
    assert await first.token() == await second.token() == "ACCESS_TOKEN_1"
    assert len(fake.stable_calls()) == 1
    # The secret is never stored, only a hash that tells two secrets of one corp apart.
    [(key, record)] = state.values.items()
    assert APP_SECRET not in key
    assert APP_SECRET.encode() not in record


async def test_a_lease_left_by_a_dead_instance_is_taken_over(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    clock, state = Clock(), MemoryState()

    async def pass_time(seconds: float) -> None:
        clock.now += seconds

    dead = SharedTokens(state, clock=clock)
    key = dead.key(Credentials(flavor="official_account", api_base="", app_id=APP_ID, secret=APP_SECRET))
    state.values[key] = orjson.dumps({"lease_until": clock.now + 30, "lease": "dead"})
    api = client(fake, session, state=state, clock=clock, sleep=pass_time)
    assert await api.token() == "ACCESS_TOKEN_1"
    assert clock.now >= 1030  # it waited for the lease to run out, then refreshed itself
    assert orjson.loads(state.values[key])["token"] == "ACCESS_TOKEN_1"


async def test_a_failed_refresh_gives_the_lease_back(
    fake: FakeWeChatApi, session: aiohttp.ClientSession
) -> None:
    state = MemoryState()
    fake.fail_next("token", {"errcode": 40164, "errmsg": "invalid ip, not in whitelist"})
    api = client(fake, session, state=state)
    with pytest.raises(ApiError):
        await api.token()
    [record] = state.values.values()
    assert "lease_until" not in orjson.loads(record)
    assert await client(fake, session, state=state).token() == "ACCESS_TOKEN_1"  # no wait for a lease

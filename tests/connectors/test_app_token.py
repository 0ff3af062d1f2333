"""connectors.base.AppToken: one provider token, refreshed once by concurrent callers, before it lapses."""

from __future__ import annotations

import asyncio

from test_cached_lookup import Clock

from connectors.base import AppToken


async def test_concurrent_callers_of_an_expired_token_wait_for_one_fetch() -> None:
    fetched: list[int] = []
    gate = asyncio.Event()

    async def fetch() -> tuple[str, float]:
        fetched.append(1)
        await gate.wait()
        return f"t{len(fetched)}", 7200

    clock = Clock()
    token = AppToken(fetch, clock)
    waiting = [asyncio.ensure_future(token.get()) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiting) == ["t1"] * 5
    assert len(fetched) == 1

    clock.mono = 7200 - 300 - 1  # kept for its lifetime less five minutes
    assert await token.get() == "t1"
    clock.mono = 7200 - 300
    assert await token.get() == "t2"


async def test_a_forgotten_token_is_fetched_again_and_a_short_one_is_kept_30_s() -> None:
    fetched: list[int] = []

    async def fetch() -> tuple[str, float]:
        fetched.append(1)
        return f"t{len(fetched)}", 60

    clock = Clock()
    token = AppToken(fetch, clock)
    assert await token.get() == "t1"
    token.forget()
    assert await token.get() == "t2"
    clock.mono = 29.9
    assert await token.get() == "t2"
    clock.mono = 30
    assert await token.get() == "t3"

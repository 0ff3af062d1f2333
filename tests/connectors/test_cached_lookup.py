"""connectors.base.CachedLookup: the single-flight, TTL-bounded cache of directory lookups."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from connectors.base import CachedLookup


class Clock:
    def __init__(self) -> None:
        self.mono = 0.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def time(self) -> float:
        return 0.0

    def monotonic(self) -> float:
        return self.mono


class Down(Exception):
    pass


async def test_concurrent_lookups_of_one_key_make_one_call_and_the_answer_is_cached() -> None:
    calls: list[str] = []
    gate = asyncio.Event()

    async def fetch(key: str) -> str:
        calls.append(key)
        await gate.wait()
        return f"{key}@corp.example"

    clock = Clock()
    lookup = CachedLookup(fetch, ttl=60.0, clock=clock, failures=(Down,), what="test")
    waiting = [asyncio.ensure_future(lookup.get("ada")) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiting) == ["ada@corp.example"] * 5
    assert await lookup.get("ada") == "ada@corp.example"
    assert calls == ["ada"]
    clock.mono = 61.0  # past the TTL: asked again
    assert await lookup.get("ada") == "ada@corp.example"
    assert calls == ["ada", "ada"]


async def test_a_failed_lookup_is_none_for_the_failure_ttl_then_asked_again() -> None:
    answers: list[str | Exception] = [Down("directory unavailable"), "bo@corp.example"]

    async def fetch(key: str) -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = Clock()
    lookup = CachedLookup(fetch, ttl=3600.0, clock=clock, failures=(Down,), what="test", failure_ttl=300.0)
    assert await lookup.get("bo") is None
    clock.mono = 299.0
    assert await lookup.get("bo") is None  # not asked again while the directory is down
    clock.mono = 301.0
    assert await lookup.get("bo") == "bo@corp.example"
    assert answers == []


async def test_the_oldest_entry_goes_when_the_cache_is_full() -> None:
    calls: list[str] = []

    async def fetch(key: str) -> str:
        calls.append(key)
        return key

    lookup = CachedLookup(fetch, ttl=60.0, clock=Clock(), failures=(Down,), what="test", max_entries=2)
    for key in ("a", "b", "c", "a"):
        await lookup.get(key)
    assert calls == ["a", "b", "c", "a"]  # "a" was dropped to make room for "c"

"""Shared timeouts: what ``asyncio.timeout`` does, on one timer per duration."""

from __future__ import annotations

import asyncio

import pytest

from core.timeouts import SharedTimeout, shared_timeout


async def test_a_block_past_its_deadline_raises_timeout_error() -> None:
    timeout = SharedTimeout(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with timeout():
            await asyncio.sleep(10)
    assert 0.05 <= loop.time() - started < 1.0


async def test_a_block_that_ends_in_time_is_left_alone() -> None:
    timeout = SharedTimeout(1.0)
    async with timeout():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # no cancellation is left pending for the task
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_each_block_gets_its_own_deadline_from_when_it_began() -> None:
    timeout = SharedTimeout(0.2, resolution=0.01)
    loop = asyncio.get_running_loop()
    ended: dict[str, float] = {}

    async def block(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            async with timeout():
                await asyncio.sleep(10)
        except TimeoutError:
            ended[name] = loop.time() - started

    started = loop.time()
    await asyncio.gather(block("first", 0.0), block("later", 0.1), block("latest", 0.15))
    assert 0.2 <= ended["first"] < 0.27
    assert 0.3 <= ended["later"] < 0.37
    assert 0.35 <= ended["latest"] < 0.42


async def test_only_the_late_blocks_time_out() -> None:
    timeout = SharedTimeout(0.1, resolution=0.01)

    async def block(seconds: float) -> str:
        try:
            async with timeout():
                await asyncio.sleep(seconds)
        except TimeoutError:
            return "timeout"
        return "done"

    assert await asyncio.gather(block(0.01), block(1.0), block(0.02), block(1.0)) == [
        "done", "timeout", "done", "timeout",
    ]


async def test_a_cancellation_from_elsewhere_is_not_turned_into_a_timeout() -> None:
    timeout = SharedTimeout(10.0)
    entered = asyncio.Event()

    async def block() -> None:
        async with timeout():
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(block())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_timeout_error_raised_inside_is_passed_on() -> None:
    with pytest.raises(TimeoutError, match="from the store"):
        async with SharedTimeout(10.0)():
            raise TimeoutError("from the store")


async def test_one_shared_timeout_per_loop_and_duration() -> None:
    with pytest.raises(TimeoutError):
        async with shared_timeout(0.02):
            await asyncio.sleep(10)
    async with shared_timeout(0.02):
        await asyncio.sleep(0)


def test_a_duration_must_be_positive() -> None:
    with pytest.raises(ValueError, match="seconds > 0"):
        SharedTimeout(0)


async def test_a_plain_with_block_times_out_as_async_with_does() -> None:
    timeout = SharedTimeout(0.05)
    with pytest.raises(TimeoutError), timeout():
        await asyncio.sleep(10)
    with timeout():
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_plain_with_block_passes_on_a_cancellation_from_elsewhere() -> None:
    timeout = SharedTimeout(10.0)
    entered = asyncio.Event()

    async def block() -> None:
        with timeout():
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(block())
    async with asyncio.timeout(5):  # not forever if the block failed to start
        await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_block_after_an_idle_spell_gets_its_whole_duration() -> None:
    # The timer armed for the first block outlives it; the next block must neither be cut short
    # by it nor left without a timer.
    timeout = SharedTimeout(0.2, resolution=0.01)
    loop = asyncio.get_running_loop()
    async with timeout():
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with timeout():
            await asyncio.sleep(10)
    assert 0.2 <= loop.time() - started < 0.27


def test_a_shared_timeout_moves_to_a_new_loop_once_idle() -> None:
    # The first loop ends with the timer still armed (its block ended in time).
    timeout = SharedTimeout(0.05, resolution=0.01)

    async def once(seconds: float) -> str:
        try:
            async with timeout():
                await asyncio.sleep(seconds)
        except TimeoutError:
            return "timeout"
        return "done"

    assert asyncio.run(once(0)) == "done"
    assert asyncio.run(once(10)) == "timeout"
    assert asyncio.run(once(0)) == "done"

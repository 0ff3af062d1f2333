"""Durable IMAP watermarks, kept in the gateway's store through the channel's durable state.

Keeping them in the store rather than a side file gives them the messages' durability and backup
story, and lets instances sharing a PostgreSQL store share them too.
"""

from __future__ import annotations

from typing import Any

import orjson

from core.channel import ChannelState


class JsonState:
    """JSON values over the channel's state; ``set`` returns once the value is committed."""

    def __init__(self, state: ChannelState) -> None:
        self._state = state

    async def get(self, key: str) -> Any:
        raw = await self._state.get(key)
        return orjson.loads(raw) if raw is not None else None

    async def set(self, key: str, value: Any) -> None:
        await self._state.put(key, orjson.dumps(value, option=orjson.OPT_SORT_KEYS))

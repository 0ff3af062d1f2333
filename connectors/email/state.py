"""Durable IMAP watermarks, kept in the gateway's store (``Store.state_get`` / ``state_put``).

Keeping them in the store rather than a side file gives them the messages' durability and backup
story, and lets instances sharing a PostgreSQL store share them too.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.store.base import Store


class StoreState:
    """JSON values under a key prefix; ``set`` returns once the value is committed."""

    def __init__(self, store: Store, prefix: str) -> None:
        self._store = store
        self._prefix = prefix

    async def get(self, key: str) -> Any:
        raw = await self._store.state_get(self._prefix + key)
        return orjson.loads(raw) if raw is not None else None

    async def set(self, key: str, value: Any) -> None:
        await self._store.state_put(self._prefix + key, orjson.dumps(value, option=orjson.OPT_SORT_KEYS))

"""A small durable key/value state for the IMAP watermarks.

The Store protocol has no place for connector state yet; until it does, this JSON file beside the
store's database holds it. Writes are atomic and durable: temp file, fsync, rename, fsync of the
directory, so a crash leaves either the old or the new file, never a torn one. Writes run in a
thread and are serialized, so the event loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.errors import StoreError


class JsonState:
    """``get`` answers from memory; ``set`` returns once the new value is on disk."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._data: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self._path

    async def load(self) -> None:
        self._data = await asyncio.to_thread(self._read)

    def get(self, key: str) -> Any:
        return self._data.get(key)

    def snapshot(self) -> Mapping[str, Any]:
        return dict(self._data)

    async def set(self, key: str, value: Any) -> None:
        async with self._lock:
            data = {**self._data, key: value}
            try:
                await asyncio.to_thread(self._write, data)
            except OSError as exc:
                raise StoreError(f"cannot write {self._path}: {exc.strerror}") from exc
            self._data = data

    def _read(self) -> dict[str, Any]:
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{self._path} does not hold a JSON object")
        return data

    def _write(self, data: Mapping[str, Any]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)
        # The rename is durable only once the directory entry is.
        fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

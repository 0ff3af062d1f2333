"""A content-addressed blob directory: ``{root}/{sha256[:2]}/{sha256}``.

Writes are durable before they return (temp file, fsync, rename, directory fsync), so a database
commit that references a blob never points at a file a crash could lose. All methods block: call
them from a thread, never from the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

RAW_REF_PREFIX = "blob:sha256:"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_ref(sha256: str) -> str:
    """The reference events and records carry: ``blob:sha256:<hex>``."""
    return f"{RAW_REF_PREFIX}{sha256}"


def parse_raw_ref(ref: str) -> str | None:
    """The sha256 a ``blob:sha256:<hex>`` reference names, or ``None`` when it is not one."""
    if not ref.startswith(RAW_REF_PREFIX):
        return None
    digest = ref[len(RAW_REF_PREFIX) :]
    return digest if is_sha256(digest) else None


def is_sha256(value: str) -> bool:
    """True for 64 lowercase hex digits; anything else must never become a path."""
    return _SHA256.fullmatch(value) is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobDir:
    """Durable content-addressed files under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        """Create the root (and make its creation durable)."""
        self.root.mkdir(parents=True, exist_ok=True)
        _fsync_dir(self.root)
        _fsync_dir(self.root.parent)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its sha256; an existing blob is not rewritten."""
        digest = sha256_hex(data)
        target = self.path(digest)
        if target.exists():
            # Renames are atomic, so a file under its final name is always complete.
            return digest
        shard = target.parent
        if not shard.is_dir():
            shard.mkdir(exist_ok=True)
            _fsync_dir(self.root)
        fd, tmp = tempfile.mkstemp(dir=shard, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(shard)
        return digest

    def get(self, sha256: str) -> bytes | None:
        if not is_sha256(sha256):
            return None
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def free_bytes(self) -> int:
        """Free space for unprivileged writers on the file system holding the root."""
        return shutil.disk_usage(self.root).free

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
from collections.abc import Iterable
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
        try:
            # Renames are atomic, so a file under its final name is always complete. Touching it
            # makes it young again: an orphan sweep (:meth:`remove_stale`) leaves it to the commit
            # about to name it.
            os.utime(target)
            return digest
        except FileNotFoundError:
            pass
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

    def stale(self, shard: str, cutoff: float) -> tuple[list[str], int]:
        """Blobs of one shard (``"00"`` .. ``"ff"``) last written or touched before ``cutoff`` (epoch
        seconds), and how many temporary files a crashed write left there before it were removed."""
        names: list[str] = []
        leftovers = 0
        try:
            entries = list(os.scandir(self.root / shard))
        except FileNotFoundError:
            return names, leftovers
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            if entry.name.startswith(".tmp-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    leftovers += 1
            elif entry.name.startswith(".sweep-"):
                # A sweep that stopped half-way: the blob goes back under its name, swept (or not)
                # like any other next time.
                with contextlib.suppress(FileNotFoundError):
                    os.replace(entry.path, self.root / shard / entry.name.removeprefix(".sweep-"))
            elif is_sha256(entry.name) and entry.name.startswith(shard):
                names.append(entry.name)
        return names, leftovers

    def remove_stale(self, digests: Iterable[str], cutoff: float) -> int:
        """Remove the blobs ``digests`` that are still older than ``cutoff``; how many went.

        Another instance may :meth:`put` the same bytes meanwhile, finding the file and touching it
        instead of writing it. So the file is first renamed aside (a ``put`` after that writes it
        anew) and its age read again: touched in between, it is put back.
        """
        removed = 0
        shards: set[Path] = set()
        for digest in digests:
            target = self.path(digest)
            aside = target.with_name(f".sweep-{digest}")
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue
            try:
                if os.stat(aside).st_mtime >= cutoff:
                    os.replace(aside, target)  # the same bytes as any file a put wrote meanwhile
                    continue
                os.unlink(aside)
            except FileNotFoundError:
                continue  # another instance's sweep put it back (see stale)
            shards.add(target.parent)
            removed += 1
        for shard in shards:
            _fsync_dir(shard)
        return removed

    def free_bytes(self) -> int:
        """Free space for unprivileged writers on the file system holding the root."""
        return shutil.disk_usage(self.root).free

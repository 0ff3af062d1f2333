"""Event and record ids: UUIDv7 in canonical form, strictly increasing within a process."""

from __future__ import annotations

import re
import uuid

from core.events import new_event_id
from dedupe.engine import new_id


def test_event_ids_are_canonical_uuid7_and_increase_on_a_still_clock() -> None:
    ids = [new_event_id(now_ns=1_800_000_000_000_000_000) for _ in range(1000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(str(u) == i for u, i in zip(parsed, ids, strict=True))
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert all(u.int >> 80 == 1_800_000_000_000 for u in parsed)  # the millisecond timestamp
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_record_ids_are_prefixed_uuid7_hex() -> None:
    first, second = new_id("cus"), new_id("cus")
    assert re.fullmatch(r"cus_[0-9a-f]{32}", first)
    assert uuid.UUID(hex=first[4:]).version == 7
    assert first < second

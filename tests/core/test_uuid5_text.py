"""core.model.uuid5_text: the text of uuid.uuid5, which stored message ids are."""

from __future__ import annotations

import random
import uuid

import pytest

from core.model import MESSAGE_NAMESPACE, uuid5_text


def test_equals_the_standard_library_for_every_kind_of_name() -> None:
    rng = random.Random(5)
    names = ["", "a", "tenant/api/inbox/k-1", "租户/微信/消息", "emoji \U0001F600", "x" * 1000]
    for _ in range(2_000):
        names.append("".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(60))))
    for namespace in (MESSAGE_NAMESPACE, uuid.NAMESPACE_DNS, uuid.uuid4()):
        for name in names:
            assert uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name)), name


def test_a_lone_surrogate_is_refused_as_by_the_standard_library() -> None:
    with pytest.raises(UnicodeEncodeError):
        uuid.uuid5(MESSAGE_NAMESPACE, "\ud800")
    with pytest.raises(UnicodeEncodeError):
        uuid5_text(MESSAGE_NAMESPACE, "\ud800")

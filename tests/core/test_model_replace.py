"""core.model.replace: what dataclasses.replace makes, made faster for the canonical types."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from core.model import (
    Attachment,
    CanonicalMessage,
    Entity,
    Identity,
    IdentityKind,
    Routing,
    replace,
)

MESSAGE = CanonicalMessage(
    channel="api", tenant="acme", inbox="app", external_id="m-1",
    received_at=datetime(2026, 11, 22, tzinfo=UTC),
    identities=(Identity(kind="email", value="a@example.com"),), subject="Hello", text="Order 12345",
    attachments=(Attachment(name="a.txt", content_type="text/plain", data=b"hi"),), extra={"call": {"x": 1}},
)


@pytest.mark.parametrize("changes", [
    {},
    {"language": "en"},
    {"entities": (Entity(kind="order_number", value="12345"),), "routing": Routing(priority="high")},
    {"html": None, "text": "other", "language": None, "subject": None},
])
def test_the_copy_is_what_dataclasses_replace_makes(changes: dict[str, object]) -> None:
    copy = replace(MESSAGE, **changes)
    assert copy == dataclasses.replace(MESSAGE, **changes)
    assert copy is not MESSAGE
    assert type(copy) is CanonicalMessage
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.text = "changed"  # type: ignore[misc]


def test_an_unknown_field_is_refused() -> None:
    with pytest.raises(TypeError, match="no field 'colour'"):
        replace(MESSAGE, colour="red")


def test_a_type_with_post_init_work_runs_it_again() -> None:
    # Identity keeps an IdentityKind member as its plain str value, in __post_init__.
    copy = replace(Identity(kind="email", value="a@example.com"), kind=IdentityKind.PHONE, value="+86138")
    assert type(copy.kind) is str
    assert copy == Identity(kind="phone", value="+86138")


def test_a_one_field_dataclass_is_copied() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class One:
        values: tuple[int, ...]

    assert replace(One((1, 2))) == One((1, 2))
    assert replace(One((1, 2)), values=(3,)) == One((3,))

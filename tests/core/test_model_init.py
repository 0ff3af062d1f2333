"""The canonical types' __init__ (core.model._quick_init): what dataclasses' own would do, faster."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from core.model import (
    CanonicalMessage,
    Identity,
    IdentityKind,
    IngestResult,
    Outcome,
    RawEnvelope,
    Routing,
    _quick_init,
)

WHEN = datetime(2026, 12, 5, tzinfo=UTC)


def twins() -> tuple[type, type]:
    """The same dataclass twice, once with dataclasses' __init__ and once with _quick_init's."""

    def define() -> type:
        @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
        class Thing:
            name: str
            size: int = 3
            tags: tuple[str, ...] = ()
            extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
            seen: list[str] = dataclasses.field(default_factory=list)

            def __post_init__(self) -> None:
                object.__setattr__(self, "name", self.name.strip())

        return Thing

    return define(), _quick_init(define())


@pytest.mark.parametrize(
    "arguments",
    [
        {"name": " a "},
        {"name": "b", "size": 0, "tags": ("x",)},
        {"name": "c", "extra": {"k": 1}, "seen": ["s"]},
    ],
)
def test_an_instance_is_what_dataclasses_would_build(arguments: dict[str, Any]) -> None:
    plain, quick = twins()
    assert dataclasses.asdict(quick(**arguments)) == dataclasses.asdict(plain(**arguments))


def test_the_signature_is_the_same() -> None:
    plain, quick = twins()

    def shape(cls: type) -> list[tuple[str, object, str]]:
        return [(p.name, p.kind, repr(p.default)) for p in inspect.signature(cls).parameters.values()]

    assert shape(quick) == shape(plain)


def test_a_factory_gives_each_instance_its_own_value() -> None:
    _, quick = twins()
    first, second = quick(name="a"), quick(name="b")
    assert first.extra == {}
    assert first.seen == []
    assert first.extra is not second.extra
    assert first.seen is not second.seen


def test_wrong_arguments_are_refused_as_before() -> None:
    with pytest.raises(TypeError, match="channel"):
        CanonicalMessage(tenant="t", inbox="i", external_id=None, received_at=WHEN)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="colour"):
        Routing(colour="red")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Routing("high")  # type: ignore[misc]


def test_the_canonical_types_stay_frozen_and_run_their_post_init() -> None:
    message = CanonicalMessage(channel="api", tenant="t", inbox="i", external_id=None, received_at=WHEN)
    assert message.routing == Routing()
    assert message.extra == {}
    assert message.kind == "message"
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.text = "changed"  # type: ignore[misc]
    assert type(Identity(kind=IdentityKind.EMAIL, value="a@example.com").kind) is str
    envelope = RawEnvelope(
        channel="api", tenant="t", inbox="i", body=b"", received_at=WHEN, headers={"x-a": "\udcff"}
    )
    assert envelope.headers == {"x-a": "\\xff"}
    assert IngestResult(outcome=Outcome.ACCEPTED).placements == ()

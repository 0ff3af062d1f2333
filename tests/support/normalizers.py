"""Normalizers that misbehave on purpose, importable by a spawned normalizer process.

They are plain data (dataclasses), as gateway/offload.py needs, and opt in with ``offload``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, RawEnvelope


@dataclass(frozen=True)
class Refuses:
    """The sender's fault: a 4xx with this status."""

    status: int
    offload: ClassVar[bool] = True

    def __call__(self, envelope: RawEnvelope) -> list[CanonicalMessage]:
        raise InvalidInput(f"refused {envelope.body[:10]!r}", status=self.status)


@dataclass(frozen=True)
class CannotParse:
    """Verified but not understood: quarantined."""

    offload: ClassVar[bool] = True

    def __call__(self, envelope: RawEnvelope) -> list[CanonicalMessage]:
        raise NormalizationError("no idea what this is")


@dataclass(frozen=True)
class Unexpected:
    """A normalizer bug whose exception does not survive pickling as itself."""

    offload: ClassVar[bool] = True

    def __call__(self, envelope: RawEnvelope) -> list[CanonicalMessage]:
        raise _Awkward("a", "b")


class _Awkward(Exception):
    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first}/{second}")


@dataclass(frozen=True)
class Dies:
    """Takes the whole process down, as a crash in a C extension would."""

    offload: ClassVar[bool] = True

    def __call__(self, envelope: RawEnvelope) -> list[CanonicalMessage]:
        os._exit(3)


@dataclass(frozen=True)
class Unreadable:
    """Pickles, but cannot be unpickled (as a class the child cannot import would)."""

    offload: ClassVar[bool] = True

    def __call__(self, envelope: RawEnvelope) -> list[CanonicalMessage]:
        return []

    def __reduce__(self) -> tuple[object, ...]:
        return (_refuse_to_load, ())


def _refuse_to_load() -> Unreadable:
    raise ImportError("no such normalizer here")

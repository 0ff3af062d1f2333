"""JSON columns built from request data (reply routes, quarantine headers): the one-call fast path
gives exactly what walking the value and making each text safe gives."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import pytest

from gateway.store.engine import _json_text, _safe_json, _safe_json_text


class _Kind(enum.StrEnum):
    EMAIL = "email"


@pytest.mark.parametrize(
    "value",
    [
        [["email", "ada@example.com", True], ["phone", "+41446681800", False]],
        {"app": "bench", "n": 3, "ratio": 0.5, "none": None, "list": (1, "two", [3.0])},
        {"nul": "a\x00b"},  # PostgreSQL refuses \u0000 in JSON
        {"surrogate": "bad \udcff byte"},
        {"\ud800key": 1},
        {1: "a non-string key"},
        {"nested": MappingProxyType({"k": "v"})},
        {"escaped": "a literal \\u0000 is not a NUL"},
        {"set": {1}, "bytes": b"xy", "when": datetime(2026, 12, 5, tzinfo=UTC)},
        {_Kind.EMAIL: _Kind.EMAIL},
        {"nan": float("nan")},
    ],
)
def test_the_fast_path_writes_what_the_safe_walk_writes(value: Any) -> None:
    assert _safe_json_text(value) == _json_text(_safe_json(value))

"""Validating event bodies against the published JSON Schema (docs/schema/event.json)."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import orjson
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schema"


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    # jsonschema checks date-time only with an extra package; RFC 3339 with an offset is what we emit.
    if not isinstance(value, str):
        return True
    if "T" not in value or not (value.endswith("Z") or value[-6] in "+-"):
        raise ValueError("RFC 3339 date-time with a 'T' and an offset")
    datetime.fromisoformat(value)
    return True


@_FORMATS.checks("uri", raises=ValueError)
def _uri(value: object) -> bool:
    if isinstance(value, str) and not urlsplit(value).scheme:
        raise ValueError("absolute URI")
    return True


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        resources.append((document["$id"], Resource.from_contents(document)))
    registry: Registry[Any] = Registry().with_resources(resources)
    root = json.loads((SCHEMA_DIR / "event.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(root)
    return jsonschema.Draft202012Validator(
        root, registry=registry, format_checker=_FORMATS
    )


def validate_event(body: bytes) -> dict[str, Any]:
    """Parse an event body and validate it; raises ``jsonschema.ValidationError`` on a broken contract."""
    event = orjson.loads(body)
    if not isinstance(event, dict):
        raise jsonschema.ValidationError("an event is a JSON object")
    _validator().validate(event)
    return event

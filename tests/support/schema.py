"""Validating event bodies against the published JSON Schema (docs/schema/event.json)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import orjson
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schema"


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
        root, registry=registry, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def validate_event(body: bytes) -> dict[str, Any]:
    """Parse an event body and validate it; raises ``jsonschema.ValidationError`` on a broken contract."""
    event = orjson.loads(body)
    if not isinstance(event, dict):
        raise jsonschema.ValidationError("an event is a JSON object")
    _validator().validate(event)
    return event

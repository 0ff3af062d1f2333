"""The documents a desk developer reads say what the gateway does: strict schemas, real id shapes,
every message kind the API accepts."""

from __future__ import annotations

import json
import re
import typing
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from core.model import CanonicalMessage
from dedupe.engine import new_id
from normalizers.api import ApiMessage
from tests.support.schema import SCHEMA_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
SCHEMAS = sorted(SCHEMA_DIR.glob("*.json"))
# Keywords that constrain objects only: strict validators (ajv strictTypes) want "type": "object" with them.
_OBJECT_KEYWORDS = {"properties", "required", "additionalProperties", "unevaluatedProperties"}
PREFIXED_ID = re.compile(r"\b(cus|thr|mrg|lnk|qua|msg|evt)_[^\s\"'/,)\]]*")


def _subschemas(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            if key in ("properties", "$defs", "patternProperties"):
                for name, child in value.items():
                    yield from _subschemas(child, f"{where}/{key}/{name}")
            elif key in ("items", "not", "additionalProperties", "unevaluatedProperties", "contains"):
                yield from _subschemas(value, f"{where}/{key}")
            elif key in ("allOf", "anyOf", "oneOf", "prefixItems"):
                for index, child in enumerate(value):
                    yield from _subschemas(child, f"{where}/{key}/{index}")


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_every_schema_passes_the_meta_schema_and_strict_types(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.validators.validator_for(schema).check_schema(schema)
    loose = [
        where for where, node in _subschemas(schema, path.name)
        if _OBJECT_KEYWORDS & node.keys() and node.get("type") != "object"
    ]
    assert loose == [], "object keywords without \"type\": \"object\""


def test_the_schema_and_events_md_name_every_kind_the_api_accepts() -> None:
    kinds = typing.get_args(ApiMessage.model_fields["kind"].annotation)
    assert "voicemail_transcript" in kinds
    events_md = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    for name in ("message.received.json", "message.edited.json"):
        described = json.loads((SCHEMA_DIR / name).read_text())["properties"]["message"]["properties"]["kind"]
        for kind in kinds:
            assert re.search(rf"\b{kind}\b", described["description"]), (name, kind)
            assert f"`{kind}`" in events_md, kind
    assert "`extra.call`" in events_md


def test_example_ids_in_the_docs_have_the_real_shape() -> None:
    real = re.compile(r"(cus|thr|mrg|lnk|qua)_[0-9a-f]{32}")
    assert real.fullmatch(new_id("cus"))  # the shape the stores hand out
    wrong = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        found = (m.group(0) for m in PREFIXED_ID.finditer(text))
        wrong += [(path.name, value) for value in found if not real.fullmatch(value)]
        for value in re.findall(r'"(?:message_id|edit_of)": "([^"]+)"', text):
            try:
                uuid.UUID(value)
            except ValueError:
                wrong.append((path.name, value))
    assert wrong == []
    now = datetime(2026, 1, 1, tzinfo=UTC)
    message = CanonicalMessage(channel="api", tenant="t", inbox="i", external_id="1", received_at=now)
    assert str(uuid.UUID(message.message_id())) == message.message_id()  # message ids are UUIDs

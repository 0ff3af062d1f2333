"""Conformance of the WhatsApp channel against the pywa corpus (figures, not pass/fail).

Runs every webhook body of ``<corpora>/pywa/whatsapp_cloud_updates_pywa/*.json`` through the channel
as the gateway does: ``connectors.meta.whatsapp`` sorts the body's statuses into delivery receipts
and ``normalizers.whatsapp.normalize`` makes the messages (with echoes ignored, the default, and
recorded). Each of pywa's own test predicates (``whatsapp_cloud_updates_pywa.expected_predicates.json``,
over pywa's parsed objects) is read as the semantic expectation it states and checked on our
output by the rule in ``CHECKS`` (the same meaning, in our field names); a body pywa states nothing
about is expected to parse (messages) or to be "not a ticket" (statuses, templates, calls,
account and preference updates). Every signature vector of ``signature_vectors.json`` is checked
with ``connectors.meta.hub.MetaApp.signed``: the valid one accepted, the tampered one refused.

Prints agreement per predicate and per file, and lists every disagreement.

Usage: ``python bench/conformance_whatsapp.py [CORPORA_DIR]`` (default ``shared/corpora`` beside the
checkout).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.meta.channel import Receipt  # noqa: E402
from connectors.meta.hub import MetaApp  # noqa: E402
from connectors.meta.whatsapp import receipts  # noqa: E402
from core.model import CanonicalMessage, RawEnvelope  # noqa: E402
from normalizers.whatsapp import normalize  # noqa: E402

# Files whose updates are not customer messages: they must yield no ticket.
NOT_TICKETS = frozenset(
    {
        "message_status",
        "template_status_update",
        "template_quality_update",
        "template_category_update",
        "template_components_update",
        "call_connect",
        "call_terminate",
        "call_status",
        "user_marketing_preferences",
        "account_update",
    }
)


@dataclass(frozen=True, slots=True)
class Result:
    messages: Sequence[CanonicalMessage]  # echoes ignored (the default)
    recorded: Sequence[CanonicalMessage]  # echoes recorded as agent messages
    receipts: Sequence[Receipt]

    @property
    def m(self) -> CanonicalMessage:
        return self.messages[0]

    def extra(self, *path: str) -> Any:
        value: Any = self.m.extra
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value


Check = Callable[[Result], bool]


def _media(kind: str) -> Check:
    return lambda r: bool(r.messages) and [m.kind for m in r.m.media] == [kind]


def _receipt(status: str) -> Check:
    return lambda r: [x.status for x in r.receipts] == [status] and not r.messages


# pywa predicate -> the same expectation on our output.
CHECKS: dict[str, Check] = {
    "lambda m: m.text is not None": lambda r: r.m.text is not None,
    "lambda m: m.image is not None": _media("image"),
    "lambda m: m.video is not None": _media("video"),
    "lambda m: m.document is not None": _media("file"),
    "lambda m: m.has_media": lambda r: len(r.m.media) == 1,
    "lambda m: isinstance(m.media, Image)": _media("image"),
    "lambda m: isinstance(m.media, Video)": _media("video"),
    "lambda m: isinstance(m.media, Document)": _media("file"),
    "lambda m: isinstance(m.media, Audio)": lambda r: [m.kind for m in r.m.media] in (["audio"], ["voice"]),
    "lambda m: not m.audio.voice": _media("audio"),
    "lambda m: m.audio.voice": _media("voice"),
    "lambda m: not m.sticker.animated": lambda r: (
        _media("sticker")(r) and r.extra("media", "animated") is False
    ),
    "lambda m: m.sticker.animated": lambda r: _media("sticker")(r) and r.extra("media", "animated") is True,
    "lambda m: m.reaction.emoji is not None": lambda r: r.extra("event") == "reaction" and bool(r.m.text),
    "lambda m: m.id != m.message_id_to_reply": lambda r: r.m.in_reply_to not in (None, r.m.external_id),
    "lambda m: m.reaction.emoji is None": lambda r: (
        r.extra("event") == "reaction_removed" and r.m.text is None
    ),
    "lambda m: m.location.current_location": lambda r: bool(r.extra("location")) and r.m.text is None,
    "lambda m: not m.location.current_location": lambda r: (
        bool(r.extra("location", "name")) and bool(r.m.text)
    ),
    "lambda m: m.contacts is not None": lambda r: bool(r.extra("contacts")) and bool(r.m.text),
    "lambda m: m.order is not None": lambda r: bool(r.extra("order", "product_items")),
    "lambda m: m.error is not None": lambda r: bool(r.extra("errors")) and r.extra("event") == "unsupported",
    "lambda m: m.unsupported is not None": lambda r: r.extra("unsupported", "type") == "pool",
    "lambda m: m.is_reply": lambda r: r.m.in_reply_to is not None,
    "lambda m: m.forwarded": lambda r: r.extra("context", "forwarded") is True,
    "lambda m: m.forwarded_many_times": lambda r: r.extra("context", "frequently_forwarded") is True,
    "lambda m: m.type == MessageType.INTERACTIVE and m.error is not None": lambda r: (
        r.extra("type") == "interactive" and bool(r.extra("errors"))
    ),
    "lambda m: m.referral is not None": lambda r: bool(r.extra("referral")),
    "lambda m: m.media.url is not None": lambda r: len(r.m.media) == 1 and bool(r.extra("media", "url")),
    "lambda b: b.type == MessageType.INTERACTIVE": lambda r: (
        r.extra("type") == "interactive" and bool(r.m.text)
    ),
    "lambda b: b.reply_to_message is not None": lambda r: r.m.in_reply_to is not None,
    "lambda b: b.type == MessageType.BUTTON": lambda r: (
        r.extra("type") == "button" and bool(r.extra("button"))
    ),
    "lambda b: b.reply_to_message is None": lambda r: r.m.in_reply_to is None,
    "lambda s: s.data is not None": lambda r: r.extra("interactive", "list_reply", "id") == "callback_data",
    "lambda s: s.description is not None": lambda r: (
        r.m.text is not None and r.m.text.endswith("description")
    ),
    "lambda s: s.status == MessageStatusType.SENT": lambda r: not r.receipts and not r.messages,
    "lambda s: s.status == MessageStatusType.DELIVERED": _receipt("delivered"),
    "lambda s: s.status == MessageStatusType.READ": _receipt("read"),
    "lambda s: s.status == MessageStatusType.PLAYED": _receipt("read"),
    "lambda s: s.error is not None": lambda r: _receipt("failed")(r) and r.receipts[0].detail is not None,
    # The tracker rides on a "sent" status, which is no receipt (reply.sent said it): nothing to keep.
    "lambda s: s.tracker is not None": lambda r: not r.receipts and not r.messages,
    "lambda s: s.group_id is not None": _receipt("read"),
    "lambda m: m.message.image is not None": lambda r: _media("image")(r) and r.m.edit_of is not None,
    "lambda m: m.original_message_id == m.message.id": lambda r: (
        bool(r.recorded or r.messages) and (r.recorded or r.messages)[0].edit_of is not None
    ),
    "lambda m: m.original_message_id is not None": lambda r: (
        bool(r.recorded or r.messages)
        and (r.recorded or r.messages)[0].extra.get("event") == "message_deleted"
    ),
    "lambda m: m.to_user == m.from_user": lambda r: (
        not r.messages and [m.kind for m in r.recorded] == ["agent_message"]
    ),
    "lambda f: f.token is not None": lambda r: bool(r.extra("flow_token")),
    "lambda f: 'flow_token' not in f.response": lambda r: (
        "flow_token" not in (r.extra("flow_response") or {})
    ),
    "lambda f: f.token is None": lambda r: r.extra("flow_token") is None and bool(r.extra("flow_response")),
    "lambda s: s.sys_type == SystemType.USER_CHANGED_NUMBER": lambda r: (
        r.extra("event") == "user_changed_number"
    ),
    "lambda s: s.from_user.wa_id == s.old_wa_id": lambda r: (
        {"972987654321", "972912345678"} <= {i.value for i in r.m.identities if i.kind == "whatsapp"}
    ),
    "lambda s: s.sys_type == SystemType.CUSTOMER_IDENTITY_CHANGED": lambda r: (
        r.extra("event") == "customer_identity_changed"
    ),
    "lambda c: c.response == CallPermissionResponse.ACCEPT and c.response_source == "
    "CallPermissionResponseSource.USER_ACTION and (c.expiration_timestamp is not None)": lambda r: (
        r.extra("event") == "call_permission_reply"
        and r.extra("call_permission", "response") == "accept"
        and r.extra("call_permission", "response_source") == "user_action"
        and r.extra("call_permission", "expiration_timestamp") is not None
    ),
    "lambda c: c.response == CallPermissionResponse.REJECT and c.response_source == "
    "CallPermissionResponseSource.USER_ACTION and (c.expiration_timestamp is None)": lambda r: (
        r.extra("event") == "call_permission_reply"
        and r.extra("call_permission", "response") == "reject"
        and r.extra("call_permission", "expiration_timestamp") is None
    ),
}
# Predicates over updates that are not tickets: they hold on pywa's object; ours must make no ticket.
NOT_A_TICKET: Check = lambda r: not r.messages  # noqa: E731


def run(body: dict[str, Any]) -> Result:
    raw = json.dumps(body).encode()
    envelope = RawEnvelope(
        channel="whatsapp",
        tenant="bench",
        inbox="bench",
        body=raw,
        received_at=datetime.now(UTC),
        signature_verified=True,
    )
    found: list[Receipt] = []
    for entry in body.get("entry") or []:
        for change in entry.get("changes") or []:
            found += receipts((change.get("value") or {}).get("statuses"))
    return Result(normalize(envelope), normalize(envelope, echoes="record"), found)


def main(corpora: Path) -> int:
    root = corpora / "pywa"
    if not root.is_dir():
        print(f"no pywa corpus at {root}")
        return 1
    expectations = json.loads((root / "whatsapp_cloud_updates_pywa.expected_predicates.json").read_text())[
        "expectations"
    ]
    per_predicate: Counter[tuple[str, bool]] = Counter()
    per_file: Counter[tuple[str, bool]] = Counter()
    problems: list[str] = []
    bodies = 0
    for path in sorted((root / "whatsapp_cloud_updates_pywa").glob("*.json")):
        samples = json.loads(path.read_text())
        for key, body in samples.items():
            bodies += 1
            try:
                result = run(body)
            except Exception as exc:  # a crash is a disagreement with every predicate
                problems.append(f"{path.stem}[{key}]: {type(exc).__name__}: {exc}")
                per_file[(path.stem, False)] += 1
                continue
            predicates = expectations.get(path.stem, {}).get(key, [])
            checks: list[tuple[str, Check]] = []
            if path.stem in NOT_TICKETS:
                checks.append(("not a ticket", NOT_A_TICKET))
            for predicate in predicates:
                check = CHECKS.get(predicate)
                if check is None and path.stem in NOT_TICKETS:
                    continue  # stated on pywa's object; ours is "not a ticket", checked above
                if check is None:
                    problems.append(f"{path.stem}[{key}]: no rule for {predicate!r}")
                    per_predicate[(predicate, False)] += 1
                    continue
                checks.append((predicate, check))
            if not checks:
                checks.append(("parses into a message", lambda r: bool(r.messages or r.recorded)))
            for name, check in checks:
                try:
                    ok = bool(check(result))
                except (IndexError, KeyError, TypeError, AttributeError):
                    ok = False
                per_predicate[(name, ok)] += 1
                per_file[(path.stem, ok)] += 1
                if not ok:
                    problems.append(f"{path.stem}[{key}]: {name}")
    vectors = json.loads((root / "signature_vectors.json").read_text())["vectors"]
    signature_ok = 0
    for vector in vectors:
        app = MetaApp(
            name="bench",
            secrets=(vector["app_secret"].encode(),),
            verify_digest=hashlib.sha256(b"x").digest(),
        )
        accepted = app.signed(vector["expected_signature"], vector["raw_body"].encode())
        if accepted == (vector["expect"] == "valid"):
            signature_ok += 1
        else:
            problems.append(
                f"signature vector {vector['id']}: accepted={accepted}, expected {vector['expect']}"
            )
    print(f"pywa WhatsApp corpus: {bodies} webhook bodies")
    print("\nagreement per predicate (pywa's expectation, checked on our output):")
    names = sorted({name for name, _ in per_predicate})
    for name in names:
        good, bad = per_predicate[(name, True)], per_predicate[(name, False)]
        print(f"  {good:3d}/{good + bad:<3d} {name}")
    print("\nagreement per file:")
    for stem in sorted({stem for stem, _ in per_file}):
        good, bad = per_file[(stem, True)], per_file[(stem, False)]
        print(f"  {good:3d}/{good + bad:<3d} {stem}")
    total_good = sum(v for (_, ok), v in per_predicate.items() if ok)
    total = sum(per_predicate.values())
    print(f"\nchecks agreeing: {total_good}/{total}")
    print(f"signature vectors: {signature_ok}/{len(vectors)} (valid accepted, tampered refused)")
    if problems:
        print("\ndisagreements:")
        for problem in problems:
            print(f"  {problem}")
    return 0


if __name__ == "__main__":
    default = ROOT.parent / "shared" / "corpora"
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default))

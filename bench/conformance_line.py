"""Conformance of the LINE channel against line-bot-sdk-python's webhook set (figures, not pass/fail).

- Every event of ``webhook_v3.json`` goes through ``normalizers.line.normalize`` (each event in a
  delivery of its own, so that an event maps to at most one message), and every assertion of
  ``expected_webhook_v3.json`` (the SDK's own ``test_parse``) is checked against our output, read
  back through the SDK's snake_case paths (``source.user_id`` is our ``extra.source.userId``,
  ``message.text`` our ``text`` ...; see ``resolve``). Event types we do not make tickets of
  (beacon, accountLink, videoPlayComplete, and the forward-compatibility ``undefined``) are
  counted as "not a ticket" per assertion, not as agreement.
- The whole v3 body and the legacy v2 body as one delivery each: how many events became messages,
  how many were understood as not tickets, and that nothing was refused or quarantined.
- Every signature vector of ``signature_vectors.json`` through the connector's verifier, plus two
  tampered copies of each valid one (a body byte flipped, a signature character changed): each
  valid vector must be accepted and everything else refused.

Usage: ``python bench/conformance_line.py [CORPORA_DIR]`` (default ``shared/corpora`` beside the checkout).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.line.connector import Account  # noqa: E402
from core.errors import InvalidInput, NormalizationError  # noqa: E402
from core.model import CanonicalMessage, RawEnvelope  # noqa: E402
from normalizers.line import normalize  # noqa: E402

MISSING = object()
# SDK event classes of event types that are not tickets here (answered 200, counted, not stored).
NOT_TICKETS = {"BeaconEvent", "AccountLinkEvent", "VideoPlayCompleteEvent", "UnknownEvent"}
# SDK class -> what our output says instead: (where, value).
CLASSES: dict[str, tuple[str, Any]] = {
    "MessageEvent": ("extra.event", "message"), "MessageEditedEvent": ("extra.event", "messageEdited"),
    "FollowEvent": ("extra.event", "follow"), "UnfollowEvent": ("extra.event", "unfollow"),
    "JoinEvent": ("extra.event", "join"), "LeaveEvent": ("extra.event", "leave"),
    "PostbackEvent": ("extra.event", "postback"), "UnsendEvent": ("extra.event", "unsend"),
    "MemberJoinedEvent": ("extra.event", "memberJoined"), "MemberLeftEvent": ("extra.event", "memberLeft"),
    "UserSource": ("source.type", "user"), "GroupSource": ("source.type", "group"),
    "RoomSource": ("source.type", "room"),
    "TextMessageContent": ("message.type", "text"), "ImageMessageContent": ("message.type", "image"),
    "VideoMessageContent": ("message.type", "video"), "AudioMessageContent": ("message.type", "audio"),
    "FileMessageContent": ("message.type", "file"), "LocationMessageContent": ("message.type", "location"),
    "StickerMessageContent": ("message.type", "sticker"),
    "DeliveryContext": ("extra.redelivery", bool), "UnsendDetail": ("extra.unsend", dict),
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _dig(value: Any, steps: list[str | int]) -> Any:
    for step in steps:
        if isinstance(step, int):
            if not isinstance(value, list) or step >= len(value):
                return MISSING
            value = value[step]
        else:
            if not isinstance(value, dict) or step not in value:
                return MISSING
            value = value[step]
    return value


def _steps(path: str) -> list[str | int]:
    """``joined.members[0].user_id`` -> ``["joined", "members", 0, "user_id"]``."""
    steps: list[str | int] = []
    for part in path.split("."):
        for name, index, key in re.findall(r"([A-Za-z_]+)|\[(\d+)\]|\['([^']+)'\]", part):
            steps.append(name or (int(index) if index else key))
    return steps


def resolve(message: CanonicalMessage, path: str) -> Any:
    """The SDK's attribute ``path`` read from our message (``MISSING`` when we do not keep it)."""
    extra: dict[str, Any] = dict(message.extra)
    direct: dict[str, Any] = {
        "reply_token": extra.get("reply_token"), "type": extra.get("event"), "mode": extra.get("mode"),
        "timestamp": extra.get("timestamp"), "webhook_event_id": extra.get("webhook_event_id"),
        "delivery_context.is_redelivery": extra.get("redelivery"),
        "message.id": message.external_id, "message.type": extra.get("message_type"),
        "message.duration": extra.get("duration_ms"), "message.file_name": extra.get("file_name"),
        "message.file_size": extra.get("file_size"),
        "unsend.message_id": _dig(extra, ["unsend", "message_id"]),
        "follow.is_unblocked": _dig(extra, ["follow", "is_unblocked"]),
    }
    if path in direct:
        return direct[path]
    steps = _steps(path)
    head = steps[0]
    if head == "source":
        # The SDK gives None for an id the source does not have.
        found = _dig(extra.get("source"), [_camel(str(s)) for s in steps[1:]])
        return None if found is MISSING else found
    if head == "message":
        return _message_field(message, extra, [s if isinstance(s, int) else _camel(s) for s in steps[1:]])
    if head == "postback":
        return _dig(extra.get("postback"), steps[1:])
    if head in ("joined", "left") and steps[1:2] == ["members"] and len(steps) >= 3:
        found = _dig(extra.get("members"), steps[2:3])
        return found if len(steps) == 4 and steps[3] == "user_id" else MISSING
    return MISSING


def _message_field(message: CanonicalMessage, extra: dict[str, Any], steps: list[str | int]) -> Any:
    name = steps[0]
    if name == "text":
        if extra.get("message_type") == "sticker":
            return _dig(extra.get("sticker"), ["text"])
        return message.text
    if name == "contentProvider":
        external = extra.get("external_content")
        if steps[1:] == ["type"]:
            return "external" if external is not None else "line"
        return _dig(external, steps[1:])
    if name == "imageSet":
        return _dig(extra.get("image_set"), steps[1:])
    if name in ("title", "address", "latitude", "longitude"):
        return _dig(extra.get("location"), steps)
    if name in ("packageId", "stickerId", "stickerResourceType", "keywords"):
        return _dig(extra.get("sticker"), steps)
    if name == "quoteToken":
        return extra.get("quote_token", MISSING)
    return MISSING


@dataclass
class Report:
    fields: Counter[tuple[str, str]] = field(default_factory=Counter)  # (field, outcome)
    disagreements: list[str] = field(default_factory=list)
    batches: dict[str, Counter[str]] = field(default_factory=dict)
    signatures: Counter[str] = field(default_factory=Counter)

    @property
    def agreed(self) -> int:
        return sum(n for (_, outcome), n in self.fields.items() if outcome == "agree")

    @property
    def compared(self) -> int:
        return sum(n for (_, outcome), n in self.fields.items() if outcome in ("agree", "disagree"))


def _envelope(body: bytes) -> RawEnvelope:
    return RawEnvelope(channel="line", tenant="conformance", inbox="sdk", body=body,
                       received_at=datetime(2026, 12, 5, tzinfo=UTC), signature_verified=True)


def _field_name(path: str) -> str:
    return re.sub(r"\[\d+\]|\['[^']+'\]", "[]", path) or "(event class)"


def check_events(corpus: Path, report: Report) -> None:
    body = json.loads((corpus / "webhook_v3.json").read_text(encoding="utf-8"))
    expected = json.loads((corpus / "expected_webhook_v3.json").read_text(encoding="utf-8"))
    expectations = expected["expectations"]
    outputs: list[CanonicalMessage | None] = []
    classes: dict[int, str] = {}
    for event in body["events"]:
        single = json.dumps({"destination": body["destination"], "events": [event]}).encode()
        produced = normalize(_envelope(single))
        outputs.append(produced[0] if produced else None)
    for expectation in expectations:
        if "event_count" in expectation:
            whole = normalize(_envelope(json.dumps(body).encode()))
            understood = len(whole) + sum(1 for o in outputs if o is None)
            counted = understood == expectation["event_count"] == len(body["events"])
            outcome = "agree" if counted else "disagree"
            report.fields[("event_count", outcome)] += 1
            continue
        index, path = expectation["event_index"], expectation["path"]
        if path == "" and "is_instance_of" in expectation:
            classes[index] = expectation["is_instance_of"]
    for expectation in expectations:
        if "event_count" in expectation:
            continue
        index, path = expectation["event_index"], expectation["path"]
        name = _field_name(path)
        ours = outputs[index]
        if classes.get(index) in NOT_TICKETS:
            report.fields[(name, "not a ticket")] += 1
            continue
        if ours is None:
            report.fields[(name, "disagree")] += 1
            report.disagreements.append(f"event {index} ({classes.get(index)}): no message for {path!r}")
            continue
        agree, got, wanted = _check(ours, path, expectation)
        report.fields[(name, "agree" if agree else "disagree")] += 1
        if not agree:
            report.disagreements.append(f"event {index} {path!r}: ours {got!r}, the SDK's {wanted!r}")


def _check(message: CanonicalMessage, path: str, expectation: dict[str, Any]) -> tuple[bool, Any, Any]:
    if "is_instance_of" in expectation:
        cls = expectation["is_instance_of"]
        where, value = CLASSES.get(cls, ("?", MISSING))
        if path in ("joined.members[0]", "left.members[0]"):
            got = resolve(message, f"{path}.user_id")
            return isinstance(got, str) and got.startswith("U"), got, cls
        if path == "" or where == "extra.event":
            got = message.extra.get("event")
        elif where.startswith("extra."):
            got = message.extra.get(where[6:], MISSING)
            return (isinstance(got, value) if isinstance(value, type) else got == value), got, cls
        else:
            got = resolve(message, where)
        return got == value, got, cls
    got = resolve(message, path)
    if "assert" in expectation:
        wanted = expectation["assert"] == "assertTrue"
        return got is wanted, got, wanted
    wanted = expectation["equals"]
    return got == wanted, got, wanted


def check_batches(corpus: Path, report: Report) -> None:
    for name in ("webhook_v3.json", "webhook_legacy_v2.json"):
        path = corpus / name
        if not path.exists():
            continue
        raw = path.read_bytes()
        counts: Counter[str] = Counter()
        try:
            messages = normalize(_envelope(raw))
        except InvalidInput as exc:
            counts[f"refused: {exc}"] += 1
        except NormalizationError as exc:
            counts[f"quarantined: {exc}"] += 1
        else:
            total = len(json.loads(raw)["events"])
            counts["events"] = total
            counts["messages"] = sum(1 for m in messages if m.kind == "message")
            counts["kind=event"] = sum(1 for m in messages if m.kind == "event")
            counts["of which edits"] = sum(1 for m in messages if m.edit_of is not None)
            counts["deletions"] = sum(1 for m in messages if m.delete_of is not None)
            counts["not tickets"] = total - len(messages)
        report.batches[name] = counts


def check_signatures(corpus: Path, report: Report) -> None:
    vectors = json.loads((corpus / "signature_vectors.json").read_text(encoding="utf-8"))["vectors"]
    for vector in vectors:
        account = Account(inbox="sdk", tenant="t", fetch_media=False, reply_with_token=False,
                          secrets=(vector["channel_secret"].encode(),))
        body, offered = vector["raw_body"].encode(), vector["expected_signature"]
        valid = vector["expect"] == "valid"
        accepted = account.verifies(body, offered)
        report.signatures["vectors agree" if accepted == valid else "vectors DISAGREE"] += 1
        if not valid:
            continue
        tampered_body = bytes([body[0] ^ 0x01]) + body[1:]
        tampered_sig = ("A" if offered[0] != "A" else "B") + offered[1:]
        for what, (b, s) in {"body": (tampered_body, offered), "signature": (body, tampered_sig)}.items():
            refused = not account.verifies(b, s)
            report.signatures[f"tampered {what} refused" if refused else f"tampered {what} ACCEPTED"] += 1


def run(corpora: Path) -> Report:
    corpus = corpora / "line_bot_sdk_python"
    report = Report()
    check_events(corpus, report)
    check_batches(corpus, report)
    check_signatures(corpus, report)
    return report


def main() -> int:
    corpora = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "corpora"
    if not (corpora / "line_bot_sdk_python").is_dir():
        print(f"no line_bot_sdk_python corpus under {corpora}")
        return 1
    report = run(corpora)
    print("line-bot-sdk-python webhook_v3 assertions, per field (agree / disagree / not a ticket):")
    names = sorted({name for name, _ in report.fields})
    for name in names:
        row = [report.fields[(name, o)] for o in ("agree", "disagree", "not a ticket")]
        print(f"  {name:48} {row[0]:4} {row[1]:4} {row[2]:4}")
    not_tickets = sum(n for (_, o), n in report.fields.items() if o == "not a ticket")
    share = 100.0 * report.agreed / max(report.compared, 1)
    print(f"assertions: {report.agreed}/{report.compared} agree ({share:.1f} %),"
          f" {not_tickets} on events that are not tickets")
    for line in report.disagreements:
        print(f"  DISAGREE {line}")
    for name, counts in report.batches.items():
        print(f"{name} as one delivery: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("signatures: " + ", ".join(f"{k} {v}" for k, v in sorted(report.signatures.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Conformance of the X channel against the X samples (figures, not pass/fail).

- ``twitterdev_gist/crc_vectors.json``: each CRC vector through the connector's CRC answer (the
  ``response_token`` and the JSON body X expects).
- ``zammad/social/twitter/webhook_events/*.json`` (real Account Activity deliveries kept by Zammad's
  test suite): each through ``normalizers.x.normalize``. What each must give is stated from the
  payload itself and Zammad's spec (twitter_spec.rb): an incoming DM is one message (id, sender,
  name, handle, time, text with t.co expanded, media); our own outgoing DM is an echo (nothing);
  tweets, favorites, follows, typing and read receipts are not direct messages (nothing). Counted
  per field. Two more properties: the same delivery normalized twice claims the same keys, and
  ``direct_message-incoming_2`` names the same customer as ``direct_message-incoming`` (Zammad
  threads it into the same ticket).
- Signatures: every sample body signed with the vector's consumer secret is accepted by the
  connector's verifier; a body byte flipped, a signature character changed, or another secret are
  refused.

Usage: ``python bench/conformance_x.py [CORPORA_DIR]`` (default ``shared/corpora`` beside the checkout).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.x.connector import App, signature  # noqa: E402
from core.model import CanonicalMessage, RawEnvelope  # noqa: E402
from normalizers.x import normalize  # noqa: E402

SAMPLES = Path("zammad") / "social" / "twitter" / "webhook_events"
# What Zammad's spec says about the t.co link of this sample.
EXPANDED = {"direct_message-incoming_with_url": "https://en.wikipedia.org/wiki/Frankenstein#Composition"}


@dataclass
class Report:
    fields: Counter[tuple[str, bool]] = field(default_factory=Counter)
    disagreements: list[str] = field(default_factory=list)
    samples: Counter[str] = field(default_factory=Counter)
    crc: Counter[str] = field(default_factory=Counter)
    signatures: Counter[str] = field(default_factory=Counter)

    def check(self, where: str, name: str, ours: Any, wanted: Any) -> None:
        agree = ours == wanted
        self.fields[(name, agree)] += 1
        if not agree:
            self.disagreements.append(f"{where} {name}: ours {ours!r}, expected {wanted!r}")

    @property
    def agreed(self) -> int:
        return sum(n for (_, ok), n in self.fields.items() if ok)

    @property
    def compared(self) -> int:
        return sum(self.fields.values())


def _envelope(body: bytes) -> RawEnvelope:
    return RawEnvelope(channel="x", tenant="conformance", inbox="zammad", body=body,
                       received_at=datetime(2026, 12, 5, tzinfo=UTC), signature_verified=True)


def _expected_text(data: dict[str, Any], sample: str) -> str | None:
    text: str = data.get("text", "")
    media_link = ((data.get("attachment") or {}).get("media") or {}).get("url")
    for url in (data.get("entities") or {}).get("urls") or []:
        replacement = "" if url["url"] == media_link else url["expanded_url"]
        text = text.replace(url["url"], replacement)
    if sample in EXPANDED:
        assert EXPANDED[sample] in text
    return text.strip() or None


def check_samples(corpora: Path, report: Report) -> dict[str, list[CanonicalMessage]]:
    produced: dict[str, list[CanonicalMessage]] = {}
    for path in sorted((corpora / SAMPLES).glob("*.json")):
        sample = path.stem
        raw = path.read_bytes()
        body = json.loads(raw)
        messages = list(normalize(_envelope(raw)))
        produced[sample] = messages
        account = body["for_user_id"]
        wanted = [
            e for e in body.get("direct_message_events", [])
            if e.get("type") == "message_create" and e["message_create"]["sender_id"] != account
        ]
        kind = ("incoming DM" if wanted else "our own DM (echo)" if "direct_message_events" in body
                else "not a DM")
        report.samples[kind] += 1
        report.check(sample, "messages", len(messages), len(wanted))
        again = [m.idempotency_key() for m in normalize(_envelope(raw))]
        report.check(sample, "same keys when redelivered", again, [m.idempotency_key() for m in messages])
        for ours, event in zip(messages, wanted, strict=False):
            create, users = event["message_create"], body.get("users", {})
            sender = create["sender_id"]
            data = create["message_data"]
            report.check(sample, "external_id", ours.external_id, event["id"])
            report.check(sample, "identity", [(i.kind, i.value, i.verified) for i in ours.identities],
                         [("x", sender, True)])
            report.check(sample, "display_name", ours.display_name, users.get(sender, {}).get("name"))
            report.check(sample, "screen_name", ours.extra.get("screen_name"),
                         users.get(sender, {}).get("screen_name"))
            report.check(sample, "sent_at", ours.sent_at,
                         datetime.fromtimestamp(int(event["created_timestamp"]) / 1000, UTC))
            report.check(sample, "text (t.co expanded)", ours.text, _expected_text(data, sample))
            media = (data.get("attachment") or {}).get("media")
            if media is not None:
                variants = [v for v in media.get("video_info", {}).get("variants", [])
                            if v.get("content_type") == "video/mp4"]
                url = (max(variants, key=lambda v: v.get("bitrate", 0))["url"] if variants
                       else media["media_url_https"])
                report.check(sample, "media", [m.ref for m in ours.media], [url])
    first, second = produced.get("direct_message-incoming"), produced.get("direct_message-incoming_2")
    if first and second:
        report.check("incoming / incoming_2", "same customer", second[0].identities, first[0].identities)
    return produced


def check_crc(corpora: Path, report: Report) -> None:
    vectors = json.loads((corpora / "twitterdev_gist" / "crc_vectors.json").read_text(encoding="utf-8"))
    for vector in vectors["vectors"]:
        app = App(name="gist", secrets=(vector["consumer_secret"].encode(),))
        token = app.crc(vector["crc_token"])
        report.crc["response_token agrees" if token == vector["expected_response_token"]
                   else "response_token DISAGREES"] += 1
        body = json.dumps({"response_token": token})
        same = json.loads(body) == json.loads(vector["expected_json_body"])
        report.crc["json body agrees" if same else "json body DISAGREES"] += 1


def check_signatures(corpora: Path, report: Report) -> None:
    vectors = json.loads((corpora / "twitterdev_gist" / "crc_vectors.json").read_text(encoding="utf-8"))
    secret = vectors["vectors"][0]["consumer_secret"].encode()
    app = App(name="gist", secrets=(secret,))
    for path in sorted((corpora / SAMPLES).glob("*.json")):
        body = path.read_bytes()
        signed = signature(secret, body).decode()
        report.signatures["signed accepted" if app.verifies(body, signed) else "signed REFUSED"] += 1
        tampered = {
            "body byte flipped": (bytes([body[0] ^ 0x01]) + body[1:], signed),
            "signature changed": (body, signed[:7] + ("A" if signed[7] != "A" else "B") + signed[8:]),
            "another secret": (body, signature(b"not-the-consumer-secret", body).decode()),
        }
        for what, (b, s) in tampered.items():
            report.signatures[f"{what}: refused" if not app.verifies(b, s) else f"{what}: ACCEPTED"] += 1


def run(corpora: Path) -> Report:
    report = Report()
    check_crc(corpora, report)
    check_samples(corpora, report)
    check_signatures(corpora, report)
    return report


def main() -> int:
    corpora = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "corpora"
    if not (corpora / SAMPLES).is_dir() or not (corpora / "twitterdev_gist").is_dir():
        print(f"no X samples (zammad/social/twitter, twitterdev_gist) under {corpora}")
        return 1
    report = run(corpora)
    print("CRC: " + ", ".join(f"{k} {v}" for k, v in sorted(report.crc.items())))
    print("samples: " + ", ".join(f"{k} {v}" for k, v in sorted(report.samples.items())))
    print("per field (agree / disagree):")
    for name in sorted({name for name, _ in report.fields}):
        print(f"  {name:32} {report.fields[(name, True)]:4} {report.fields[(name, False)]:4}")
    share = 100.0 * report.agreed / max(report.compared, 1)
    print(f"fields: {report.agreed}/{report.compared} agree ({share:.1f} %)")
    for line in report.disagreements:
        print(f"  DISAGREE {line}")
    print("signatures: " + ", ".join(f"{k} {v}" for k, v in sorted(report.signatures.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

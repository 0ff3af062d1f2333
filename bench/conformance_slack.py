"""Conformance of the Slack channel against the slackapi corpus (figures, not pass/fail).

Every signing vector and every event payload of ``<corpora>/slackapi`` goes through the channel
itself: an HTTP request to ``POST /slack/<inbox>/events`` on the real connector, pipeline and a
SQLite store in a temporary directory (the verifier on a clock the runner sets), and what the
gateway answered and put into the outbox is compared with what the corpus says should happen.

- Signing vectors (python-slack-sdk, Slack's own documentation values): the request is signed
  with the vector's timestamp and signature, the gateway's clock set to ``now_for_validity`` (the
  real time for the stale vector). Expected: ``valid`` passes verification (the body is a slash
  command's form, which the Events API endpoint then refuses as not JSON: 400, not 401);
  ``invalid`` and a stale timestamp are 401 with nothing parsed.
- ``url_verification``: the challenge is echoed.
- Event payloads (bolt-python, python-slack-events-api), each signed and sent on its own inbox (the
  corpus reuses ``Ev111``, ``C111`` and timestamps across unrelated payloads): a person's
  ``message`` (plain, ``file_share``, ``thread_broadcast``) or ``app_mention`` is one
  ``message.received`` with the author and text of the event, a ``message_changed`` one
  ``message.edited`` acting as ``event.message.user`` (not ``previous_message.user``) with our
  team from ``authorizations[0]``, a ``message_deleted`` one ``message.deleted``; bot messages
  (``bot_message``, ``bot_id``: another app's bot too, unlike bolt, which hands those to listeners:
  a ticket gateway must not answer bots) and every other event type (reactions, joins,
  ``tokens_revoked``, ``app_home_opened`` ...) make nothing and are answered 200.
- java-slack-sdk's samples are schema skeletons (every string ``""``): answered without a 5xx, and
  nothing with an empty id is published (a verified message that cannot be understood is
  quarantined).

Usage: ``python bench/conformance_slack.py [CORPORA_DIR]`` (default ``shared/corpora`` beside the checkout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from slack_sdk.signature import SignatureVerifier  # noqa: E402

from connectors.slack import DESCRIPTOR  # noqa: E402
from core.settings import Settings  # noqa: E402
from gateway.channels import GatewayContext  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.pipeline import Pipeline  # noqa: E402
from gateway.store import build_store  # noqa: E402
from gateway.store.base import Store  # noqa: E402

SECRET = "conformance-signing-secret"
CUSTOMER_SUBTYPES = (None, "file_share", "thread_broadcast", "me_message")


class Clock:
    """The gateway's clock, set by the runner (signing vectors carry a fixed timestamp)."""

    def __init__(self) -> None:
        self.fixed: float | None = None

    def time(self) -> float:
        return self.fixed if self.fixed is not None else time.time()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass
class Report:
    agree: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    disagreements: list[str] = field(default_factory=list)

    def check(self, category: str, name: str, ok: bool, why: str) -> None:
        self.total[category] += 1
        if ok:
            self.agree[category] += 1
        else:
            self.disagreements.append(f"{category}: {name}: {why}")

    @property
    def all_agree(self) -> bool:
        return not self.disagreements and sum(self.total.values()) > 0


def corpus_payloads(corpora: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(category, name, payload) for every event payload of the corpus."""
    base = corpora / "slackapi"
    found: list[tuple[str, str, dict[str, Any]]] = []
    for path in sorted((base / "bolt_python_events").glob("*.json")):
        found.append(("bolt", path.name, json.loads(path.read_text(encoding="utf-8"))))
    for path in sorted((base / "python_slack_events_api").glob("*.json")):
        found.append(("events_api", path.name, json.loads(path.read_text(encoding="utf-8"))))
    for path in sorted((base / "java_slack_sdk_event_shapes").glob("*.json")):
        found.append(("java_skeleton", path.name, json.loads(path.read_text(encoding="utf-8"))))
    return found


def expected(payload: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The event type the corpus calls for (None: nothing), and facts the event must carry."""
    if payload.get("type") != "event_callback" or not isinstance(payload.get("event"), dict):
        return None, {}
    event = payload["event"]
    kind, subtype = event.get("type"), event.get("subtype")
    if kind not in ("message", "app_mention"):
        return None, {}
    if event.get("bot_id") or subtype == "bot_message":
        return None, {}
    if subtype == "message_changed":
        inner = event.get("message") or {}
        if inner.get("bot_id"):
            return None, {}
        auth = (payload.get("authorizations") or [{}])[0]
        return "message.edited", {"user": inner.get("user"), "text": inner.get("text"),
                                  "our_team": auth.get("team_id") or payload.get("team_id")}
    if subtype == "message_deleted":
        previous = event.get("previous_message") or {}
        if previous.get("bot_id"):
            return None, {}
        return "message.deleted", {"user": previous.get("user")}
    if subtype not in CUSTOMER_SUBTYPES:
        return None, {}
    return "message.received", {"user": event.get("user"), "text": event.get("text"),
                                "thread_ts": event.get("thread_ts")}


class Channel:
    """The Slack channel on the real pipeline and a SQLite store, one inbox per payload."""

    def __init__(self, workdir: Path, secrets: dict[str, str]) -> None:
        self.clock = Clock()
        inboxes = list(secrets)
        installation = {"bot_token": "xoxb-conformance", "channels": ["*"], "fetch_files": False,
                        "profile_emails": False}
        self.settings = Settings.model_validate({
            "server": {"normalizer_process": False},
            "store": {"path": str(workdir / "slack.db"), "blob_dir": str(workdir / "blobs")},
            "tenants": {"bench": {}},
            "inboxes": {inbox: {"tenant": "bench"} for inbox in inboxes},
            "channels": {"slack": {"api_base": "http://127.0.0.1:9",
                                   "inboxes": {inbox: {**installation, "signing_secret": secret}
                                               for inbox, secret in secrets.items()}}},
        })
        self.store: Store = build_store(self.settings)
        self.app = web.Application()
        pipeline = Pipeline(self.settings, self.store, Metrics())
        connector = DESCRIPTOR.connector.from_settings(self.settings)
        assert connector is not None
        ctx = GatewayContext(self.app, DESCRIPTOR, settings=self.settings, ingest=pipeline.ingest,
                             store=self.store, metrics=Metrics(), clock=self.clock)  # type: ignore[arg-type]
        connector.setup(ctx)
        self.client: TestClient[web.Request, web.Application] = TestClient(TestServer(self.app))

    async def __aenter__(self) -> Channel:
        await self.store.open()
        await self.client.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.store.close()

    async def post(self, inbox: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        async with self.client.post(f"/slack/{inbox}/events", data=body, headers=headers) as response:
            return response.status, await response.text()

    async def events(self, inbox: str) -> list[dict[str, Any]]:
        rows = await self.store.outbox_fetch(100_000)
        bodies = [json.loads(row.body) for row in rows]
        return [b for b in bodies if (b.get("message") or {}).get("inbox") == inbox]


def sign(body: bytes, *, at: float) -> dict[str, str]:
    timestamp = str(int(at))
    signature = SignatureVerifier(SECRET).generate_signature(timestamp=timestamp, body=body)
    return {"Content-Type": "application/json", "X-Slack-Request-Timestamp": timestamp,
            "X-Slack-Signature": signature or ""}


async def run(corpora: Path) -> Report:
    report = Report()
    payloads = corpus_payloads(corpora)
    vectors_file = corpora / "slackapi" / "python_slack_sdk" / "signing_vectors.json"
    vectors = json.loads(vectors_file.read_text(encoding="utf-8"))["vectors"] if vectors_file.exists() else []
    # Each signing vector has its own secret: its inbox is configured with it.
    secrets = {f"p{i}": SECRET for i in range(len(payloads))}
    secrets.update({f"v{i}": vector["signing_secret"] for i, vector in enumerate(vectors)})
    with tempfile.TemporaryDirectory(prefix="slack-conformance-") as workdir:
        async with Channel(Path(workdir), secrets) as channel:
            for index, vector in enumerate(vectors):
                await _vector(channel, report, f"v{index}", vector)
            for index, (category, name, payload) in enumerate(payloads):
                await _payload(channel, report, f"p{index}", category, name, payload)
    return report


async def _vector(channel: Channel, report: Report, inbox: str, vector: dict[str, Any]) -> None:
    now = vector.get("now_for_validity")
    channel.clock.fixed = float(now) if isinstance(now, int | float) else None
    headers = {
        "Content-Type": vector.get("content_type", "application/x-www-form-urlencoded"),
        "X-Slack-Request-Timestamp": vector["timestamp"],
        "X-Slack-Signature": vector["expected_signature"],
    }
    status, _ = await channel.post(inbox, vector["body"].encode("utf-8"), headers)
    channel.clock.fixed = None
    wants_valid = vector["expect"] == "valid"
    published = await channel.events(inbox)
    ok = (status != 401) if wants_valid else (status == 401)
    report.check("signing vector", vector["id"], ok and not published,
                 f"expected {'verified' if wants_valid else '401'}, got {status}")


async def _payload(channel: Channel, report: Report, inbox: str, category: str, name: str,
                   payload: dict[str, Any]) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    now = time.time()
    # Forged and stale copies first: 401, and nothing of them reaches the store.
    forged = dict(sign(body, at=now))
    forged["X-Slack-Signature"] = "v0=" + "0" * 64
    stale_status, _ = await channel.post(inbox, body, sign(body, at=now - 301))
    forged_status, _ = await channel.post(inbox, body, forged)
    refused = stale_status == forged_status == 401 and not await channel.events(inbox)
    report.check("forged/stale refused", name, refused, f"forged {forged_status}, stale {stale_status}")
    status, text = await channel.post(inbox, body, sign(body, at=now))
    events = await channel.events(inbox)
    if payload.get("type") == "url_verification":
        ok = status == 200 and json.loads(text or "{}").get("challenge") == payload.get("challenge")
        report.check("url_verification", name, ok, f"status {status}, answer {text!r}")
        return
    if category == "java_skeleton":
        ids = [(e.get("message") or {}).get("external_id") for e in events]
        ok = status < 500 and all(i not in ("", ":") for i in ids)
        report.check("skeleton tolerated", name, ok, f"status {status}, {len(events)} events")
        return
    want, facts = expected(payload)
    label = f"{category} {want or 'nothing'}"
    if want is None:
        report.check(label, name, status == 200 and not events, f"status {status}, {len(events)} events")
        return
    if status != 200 or len(events) != 1 or events[0]["type"] != want:
        report.check(label, name, False, f"status {status}, events {[e['type'] for e in events]}")
        return
    message = events[0]["message"]
    problems = []
    if facts.get("user") and message["extra"].get("user") != facts["user"]:
        problems.append(f"user {message['extra'].get('user')} != {facts['user']}")
    if want != "message.deleted" and facts.get("text") is not None and not (message["text"] or "").strip():
        problems.append("no text")
    if facts.get("our_team") and message["extra"].get("our_team") != facts["our_team"]:
        problems.append(f"our team {message['extra'].get('our_team')} != {facts['our_team']}")
    if facts.get("thread_ts") and message["extra"].get("thread_ts") != facts["thread_ts"]:
        problems.append("thread_ts lost")
    identities = events[0]["customer"]["identities"]
    if not any(i["kind"] == "slack" and i["verified"] for i in identities):
        problems.append("no verified slack identity")
    # A redelivery (Slack's retry of the same event_id) makes nothing new.
    again, _ = await channel.post(inbox, body, {**sign(body, at=time.time()), "X-Slack-Retry-Num": "1",
                                                "X-Slack-Retry-Reason": "http_timeout"})
    if again != 200 or len(await channel.events(inbox)) != 1:
        problems.append(f"redelivery answered {again} or made a second event")
    report.check(label, name, not problems, "; ".join(problems))


def main(argv: list[str]) -> int:
    corpora = Path(argv[1]) if len(argv) > 1 else ROOT.parent / "shared" / "corpora"
    if not (corpora / "slackapi").is_dir():
        print(f"no slackapi corpus under {corpora}")
        return 2
    logging.basicConfig(level=logging.ERROR)  # the refusals this runner provokes are logged as warnings
    started = time.perf_counter()
    report = asyncio.run(run(corpora))
    elapsed = time.perf_counter() - started
    print(f"Slack channel conformance against {corpora / 'slackapi'} ({elapsed:.1f} s)")
    for category in sorted(report.total):
        print(f"  {category:32} {report.agree[category]:3d} / {report.total[category]:3d} agree")
    total, agreed = sum(report.total.values()), sum(report.agree.values())
    print(f"  {'all checks':32} {agreed:3d} / {total:3d} agree")
    for line in report.disagreements:
        print(f"  DISAGREE {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

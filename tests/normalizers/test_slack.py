"""Golden tests for the Slack normalizer: Events API callbacks -> canonical messages."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.slack import Policy, normalize_with, read, to_plain
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slack"
RECEIVED = datetime(2025, 12, 5, 8, 0, tzinfo=UTC)
POLICY = Policy(channels=frozenset({"C0SUPPORT", "C0SHARED"}))
normalize = normalize_with(lambda inbox: POLICY)


def envelope(body: bytes, *, verified: bool = True, **meta: Any) -> RawEnvelope:
    return RawEnvelope(
        channel="slack", tenant="acme", inbox="workspace", body=body, received_at=RECEIVED,
        signature_verified=verified, meta={"transport": "events_api", **meta},
    )


def golden(message: CanonicalMessage) -> dict[str, Any]:
    return {
        **as_golden(message),
        "media": [[m.kind, m.ref, m.name, m.content_type] for m in message.media],
        "in_reply_to": message.in_reply_to,
        "thread_ref": message.thread_ref,
        "edit_of": message.edit_of,
        "delete_of": message.delete_of,
    }


def fixtures() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".expected.json"))


def load(name: str, **meta: Any) -> list[CanonicalMessage]:
    return list(normalize(envelope((FIXTURES / f"{name}.json").read_bytes(), **meta)))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    meta = {"transport": "socket"} if path.stem.startswith("socket") else {}
    messages = normalize(envelope(path.read_bytes(), **meta))
    check_golden([golden(m) for m in messages], path.with_name(f"{path.stem}.expected.json"))


def test_every_fixture_has_a_golden() -> None:
    assert len(fixtures()) >= 20
    assert all(p.with_name(f"{p.stem}.expected.json").exists() for p in fixtures())


@pytest.mark.parametrize(
    "name", ["bot_message", "own_reply", "reaction_added", "channel_join", "unfollowed_channel",
             "message_changed_unfurl", "tokens_revoked", "app_home_opened"],
)
def test_what_is_not_a_customer_message_yields_nothing(name: str) -> None:
    assert load(name) == []


def test_the_mention_and_the_message_of_one_post_are_one_ticket() -> None:
    # Slack sends both (two event_ids) for a mention in a channel the app follows.
    mention: dict[str, Any] = orjson.loads((FIXTURES / "app_mention.json").read_bytes())
    as_message = {**mention, "event_id": "Ev0OTHER", "event": {**mention["event"], "type": "message",
                                                             "channel_type": "channel"}}
    follows_all = normalize_with(lambda inbox: Policy(all_channels=True))
    [a] = follows_all(envelope(orjson.dumps(mention)))
    [b] = follows_all(envelope(orjson.dumps(as_message)))
    assert a.idempotency_key() == b.idempotency_key()
    assert a.fingerprint() == b.fingerprint()  # no "key reused" quarantine for the pair


def test_a_redelivery_is_the_same_message_whatever_the_retry_headers() -> None:
    first = load("dm_text")[0]
    again = load("dm_text", retry_reason="http_timeout")[0]
    assert first.idempotency_key() == again.idempotency_key()
    assert first.fingerprint() == again.fingerprint()


def test_slack_connect_keeps_the_external_users_own_team() -> None:
    [message] = load("slack_connect")
    [identity] = message.identities
    assert identity.value == "T0PARTNER:U0PARTNER7"
    assert message.extra["external"] is True
    assert message.extra["our_team"] == "T0TICKETS"


def test_an_edit_names_the_original_and_each_edit_is_keyed_by_its_time() -> None:
    [original] = load("dm_text")
    [edit] = load("message_changed")
    assert edit.edit_of == original.message_id()
    assert edit.external_id == original.external_id
    assert edit.idempotency_key() != original.idempotency_key()
    assert edit.text == "Hi, my order #1234 hasn't arrived yet"


def test_a_deletion_names_the_deleted_message_and_carries_no_text() -> None:
    [deletion] = load("message_deleted")
    deleted = CanonicalMessage(channel="slack", tenant="acme", inbox="workspace",
                               external_id="D0CUSTOMER:1764922500.001000", received_at=RECEIVED)
    assert deletion.delete_of == deleted.message_id()
    assert deletion.text is None
    assert "wrong account number" not in orjson.dumps(dict(deletion.extra)).decode()


def test_the_profile_email_is_a_claimed_identity_and_the_name_is_kept() -> None:
    profiles = {"T0TICKETS:U0CUSTOMER": {"email": "ana@customer.example", "real_name": "Ana Lima"}}
    [message] = load("dm_text", profiles=profiles)
    assert [(i.kind, i.value, i.verified) for i in message.identities] == [
        (IdentityKind.SLACK, "T0TICKETS:U0CUSTOMER", True),
        (IdentityKind.EMAIL, "ana@customer.example", False),
    ]
    assert message.display_name == "Ana Lima"


def test_an_unverified_envelope_gives_an_unverified_slack_identity() -> None:
    body = (FIXTURES / "dm_text.json").read_bytes()
    [message] = normalize(envelope(body, verified=False))
    assert not message.identities[0].verified


def test_threads_a_channel_post_starts_one_and_a_reply_joins_it() -> None:
    [post] = load("channel_message")
    [reply] = load("thread_reply")
    [broadcast] = load("thread_broadcast")
    assert post.thread_ref == reply.thread_ref == broadcast.thread_ref == "C0SUPPORT:1764921700.000200"
    assert reply.in_reply_to == post.external_id
    [direct] = load("dm_text")
    assert direct.thread_ref is None  # a DM outside a Slack thread joins the open thread by the window


def test_policy_switches() -> None:
    body = (FIXTURES / "dm_text.json").read_bytes()
    no_dms = normalize_with(lambda inbox: Policy(direct_messages=False))
    assert list(no_dms(envelope(body))) == []
    mention = (FIXTURES / "app_mention.json").read_bytes()
    no_mentions = normalize_with(lambda inbox: Policy(mentions=False))
    assert list(no_mentions(envelope(mention))) == []


@pytest.mark.parametrize(
    ("mrkdwn", "plain"),
    [
        ("<@U1> hi", "@U1 hi"),
        ("<@U1|ana> hi", "@ana hi"),
        ("see <#C1|general>", "see #general"),
        ("<!here> down", "@here down"),
        ("<!subteam^S1|@oncall> help", "@@oncall help"),
        ("<https://x.example|docs>", "docs (https://x.example)"),
        ("<https://x.example>", "https://x.example"),
        ("a &amp;lt; b &lt; c &gt; d", "a &lt; b < c > d"),
        ("plain &quot;typed&quot;", "plain &quot;typed&quot;"),
    ],
)
def test_mrkdwn_to_plain_text(mrkdwn: str, plain: str) -> None:
    assert to_plain(mrkdwn) == plain


def test_broken_bodies() -> None:
    with pytest.raises(InvalidInput):
        normalize(envelope(b"{not json"))
    with pytest.raises(InvalidInput):
        normalize(envelope(b"[1, 2]"))
    broken: dict[str, Any] = orjson.loads((FIXTURES / "dm_text.json").read_bytes())
    del broken["event"]["ts"]
    with pytest.raises(NormalizationError):
        normalize(envelope(orjson.dumps(broken)))
    broken["event"] = "not an object"
    with pytest.raises(NormalizationError):
        normalize(envelope(orjson.dumps(broken)))


def test_read_says_who_to_look_up_without_building_anything() -> None:
    callback = orjson.loads((FIXTURES / "slack_connect.json").read_bytes())
    reading = read(callback, POLICY)
    assert reading.kind == "message"
    assert reading.author is not None
    assert (reading.author.team, reading.author.user) == ("T0PARTNER", "U0PARTNER7")
    assert read(orjson.loads((FIXTURES / "bot_message.json").read_bytes()), POLICY).kind == "ignored:bot"


def test_the_socket_envelope_is_the_same_message_as_the_request() -> None:
    [from_socket] = load("socket_envelope", transport="socket")
    [from_request] = load("dm_text")
    assert replace(from_socket, extra={}) == replace(from_request, extra={})


@pytest.mark.parametrize(
    "change",
    [
        {"subtype": ["not", "a", "string"]},
        {"channel": 42},
        {"ts": "not-a-number"},
        {"files": 7, "subtype": "file_share"},
        {"files": [{"id": "F1", "mode": ["x"]}], "subtype": "file_share"},
    ],
)
def test_odd_shapes_are_quarantined_or_tolerated_never_a_crash(change: dict[str, Any]) -> None:
    callback: dict[str, Any] = orjson.loads((FIXTURES / "channel_message.json").read_bytes())
    callback["event"].update(change)
    try:
        messages = normalize(envelope(orjson.dumps(callback)))
    except NormalizationError:
        return
    assert len(messages) <= 1

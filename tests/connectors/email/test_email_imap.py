"""IMAP pollers against a real Dovecot that each test configures and starts in a temporary directory."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.model import IngestResult, Outcome, RawEnvelope
from tests.connectors.email.dovecot_kit import PASSWORD, USER, Dovecot, dovecot
from tests.connectors.email.email_kit import RETRY, FakeIngest, mail, read_state, running, self_signed

pytestmark = pytest.mark.integration


@pytest.fixture
def server() -> Iterator[Dovecot]:
    with dovecot() as running_server:
        yield running_server


def config(server: Dovecot, **account: Any) -> dict[str, Any]:
    return {
        "inboxes": {"support": {}},
        "imap": {
            "helpdesk": {
                "host": "127.0.0.1",
                "port": server.port,
                "tls": False,
                "username": USER,
                "password": PASSWORD,
                "inbox": "support",
                "reconnect_min": 0.05,
                "reconnect_max": 0.5,
                "poll_interval": 0.1,
                **account,
            }
        },
    }


class Progress:
    """The pollers' observer: tests wait on it instead of sleeping."""

    def __init__(self) -> None:
        self.done: list[tuple[str, int, Outcome]] = []
        self._changed = asyncio.Condition()
        self._pending: list[asyncio.Task[None]] = []

    def __call__(self, account: str, folder: str, uid: int, result: IngestResult) -> None:
        self.done.append((folder, uid, result.outcome))
        self._pending.append(asyncio.get_running_loop().create_task(self._notify()))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(
        self, predicate: Callable[[list[tuple[str, int, Outcome]]], bool], within: float = 20
    ) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: predicate(self.done))


class FlagRecordingIngest(FakeIngest):
    """Also records the message's flags on the server at the moment ingest is called."""

    def __init__(self, server: Dovecot, folder: str = "INBOX") -> None:
        super().__init__()
        self.server = server
        self.folder = folder
        self.flags_at_call: list[tuple[int, str]] = []

    async def __call__(self, envelope: RawEnvelope, normalize: Any) -> IngestResult:
        uid = int(envelope.meta["uid"])
        flags = await asyncio.to_thread(self.server.flags, self.folder)
        self.flags_at_call.append((uid, flags.get(uid, "")))
        return await super().__call__(envelope, normalize)


async def test_every_message_is_fetched_and_flagged_seen_only_after_it_was_stored(
    server: Dovecot, tmp_path: Path
) -> None:
    for n in range(3):
        server.append(mail(message_id=f"<early-{n}@customer.example>"))
    ingest = FlagRecordingIngest(server)
    progress = Progress()
    async with running(config(server), tmp_path, ingest=ingest, observer=progress) as gw:
        await progress.until(lambda done: len(done) == 3)
        # Mail arriving while the poller runs: IDLE pushes it, or the catch-up that bounds IDLE finds it.
        await asyncio.to_thread(server.append, mail(message_id="<live@customer.example>"))
        await progress.until(lambda done: len(done) == 4)
        assert gw.connector.imap is not None
    assert ingest.flags_at_call == [(1, ""), (2, ""), (3, ""), (4, "")]  # not seen while being stored
    assert all("\\Seen" in flags for flags in server.flags().values())
    assert sorted(ingest.keys) == sorted(
        [f"support/<early-{n}@customer.example>" for n in range(3)] + ["support/<live@customer.example>"]
    )
    envelope = ingest.envelopes[0]
    assert envelope.body == mail(message_id="<early-0@customer.example>")
    assert envelope.meta["transport"] == "imap"
    assert envelope.meta["folder"] == "INBOX"
    assert envelope.meta["uidvalidity"] == server.uidvalidity("INBOX")


async def test_a_retry_leaves_the_message_unseen_and_it_is_fetched_again(
    server: Dovecot, tmp_path: Path
) -> None:
    server.append(mail(message_id="<one@customer.example>"))
    server.append(mail(message_id="<two@customer.example>"))
    ingest = FlagRecordingIngest(server)
    failures = {"<two@customer.example>": 2}

    def script(envelope: RawEnvelope) -> IngestResult | None:
        key = "<two@customer.example>"
        if key.encode() in envelope.body and failures[key]:
            failures[key] -= 1
            return RETRY
        return None

    ingest.script = script
    progress = Progress()
    async with running(config(server, use_idle=False), tmp_path, ingest=ingest, observer=progress):
        await progress.until(lambda done: len(done) == 2)
    assert [uid for uid, _ in ingest.flags_at_call] == [1, 2, 2, 2]
    # At the 2nd and 3rd attempt the message was still unseen: RETRY flagged nothing.
    assert [flags for uid, flags in ingest.flags_at_call if uid == 2] == ["", "", ""]
    assert [r.outcome for r in ingest.results] == [
        Outcome.ACCEPTED,
        Outcome.RETRY,
        Outcome.RETRY,
        Outcome.ACCEPTED,
    ]
    assert all("\\Seen" in flags for flags in server.flags().values())


async def test_the_watermark_survives_a_restart_and_mail_sent_meanwhile_is_fetched_once(
    server: Dovecot, tmp_path: Path
) -> None:
    server.append(mail(message_id="<before-1@customer.example>"))
    server.append(mail(message_id="<before-2@customer.example>"))
    ingest = FakeIngest()
    progress = Progress()
    async with running(config(server), tmp_path, ingest=ingest, observer=progress):
        await progress.until(lambda done: len(done) == 2)
    # The gateway is down: mail keeps arriving, one of it even read by a person in a mail client.
    server.append(mail(message_id="<during-1@customer.example>"))
    server.append(mail(message_id="<during-2@customer.example>"), flags="(\\Seen)")
    state = await read_state(tmp_path, "imap/helpdesk/INBOX")
    assert state == {"uidvalidity": server.uidvalidity("INBOX"), "uid": 2}
    progress = Progress()
    async with running(config(server), tmp_path, ingest=ingest, observer=progress):
        await progress.until(lambda done: len(done) == 2)
    assert [message for message in ingest.keys] == [
        "support/<before-1@customer.example>",
        "support/<before-2@customer.example>",
        "support/<during-1@customer.example>",
        "support/<during-2@customer.example>",
    ]
    assert len(ingest.envelopes) == 4  # nothing fetched twice
    assert [r.outcome for r in ingest.results] == [Outcome.ACCEPTED] * 4


async def test_a_uidvalidity_change_rescans_without_duplicates(server: Dovecot, tmp_path: Path) -> None:
    from normalizers.email import normalize_email

    server.create("Support")
    originals = [mail(message_id=f"<kept-{n}@customer.example>") for n in range(2)]
    for raw in originals:
        server.append(raw, folder="Support")
    ingest = FakeIngest()
    account = {"folders": ["Support"], "rescan": "all"}
    progress = Progress()
    async with running(
        config(server, **account), tmp_path, ingest=ingest, observer=progress, normalize=normalize_email
    ):
        await progress.until(lambda done: len(done) == 2)
    before = server.uidvalidity("Support")
    # The folder is rebuilt (a restore, a server migration): same mails, new UIDs, new UIDVALIDITY.
    server.delete("Support")
    server.create("Support")
    for raw in originals:
        server.append(raw, folder="Support")
    server.append(mail(message_id="<new@customer.example>"), folder="Support")
    after = server.uidvalidity("Support")
    assert after != before
    progress = Progress()
    async with running(
        config(server, **account), tmp_path, ingest=ingest, observer=progress, normalize=normalize_email
    ):
        await progress.until(lambda done: len(done) == 3)
    assert [r.outcome for r in ingest.results] == [
        Outcome.ACCEPTED,
        Outcome.ACCEPTED,
        Outcome.DUPLICATE,
        Outcome.DUPLICATE,
        Outcome.ACCEPTED,
    ]
    # The real normalizer derives the same idempotency key for the refetched copies: the store's
    # unique constraint would make them duplicates too.
    keys = [messages[0].idempotency_key() for messages in ingest.messages]
    assert keys[2:4] == keys[0:2]
    assert len(set(keys)) == 3
    state = await read_state(tmp_path, "imap/helpdesk/Support")
    assert state["uidvalidity"] == after


async def test_processed_mail_is_moved_after_it_was_stored(server: Dovecot, tmp_path: Path) -> None:
    server.create("Processed")
    server.append(mail(message_id="<move-me@customer.example>"))
    ingest = FlagRecordingIngest(server)
    progress = Progress()
    account = {"processed_action": "move", "processed_folder": "Processed"}
    async with running(config(server, **account), tmp_path, ingest=ingest, observer=progress):
        await progress.until(lambda done: len(done) == 1)
    assert ingest.flags_at_call == [(1, "")]  # still in INBOX when it was being stored
    assert server.flags("INBOX") == {}
    assert len(server.flags("Processed")) == 1


async def test_a_wrong_password_is_retried_with_backoff_and_stops_cleanly(
    server: Dovecot, tmp_path: Path
) -> None:
    server.append(mail())
    ingest = FakeIngest()
    async with running(config(server, password="wrong"), tmp_path, ingest=ingest) as gw:
        assert gw.connector.imap is not None
    # Stopped cleanly (the context manager returned) without ever storing anything.
    assert ingest.envelopes == []


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[Dovecot, Path]]:
    """A Dovecot with a self-signed certificate for "localhost"; yields it and the certificate."""
    cert, key = self_signed(tmp_path)
    with dovecot(tls=(cert, key)) as running_server:
        yield running_server, cert


def tls_config(server: Dovecot, mode: str, ca_file: Path) -> dict[str, Any]:
    """The account over IMAPS (its own port) or over STARTTLS on the plain port, trusting ``ca_file``."""
    assert server.tls_port is not None
    if mode == "imaps":
        return config(server, host="localhost", ca_file=str(ca_file), tls=True, port=server.tls_port)
    return config(server, host="localhost", ca_file=str(ca_file), tls=False, starttls=True)


@pytest.mark.parametrize("mode", ["imaps", "starttls"])
async def test_mail_is_fetched_over_implicit_tls_and_over_starttls(
    tls_server: tuple[Dovecot, Path], tmp_path: Path, mode: str
) -> None:
    server, cert = tls_server
    server.append(mail(message_id="<over-tls@customer.example>"))
    ingest = FakeIngest()
    progress = Progress()
    async with running(tls_config(server, mode, cert), tmp_path, ingest=ingest, observer=progress):
        await progress.until(lambda done: len(done) == 1)
    assert ingest.keys == {"support/<over-tls@customer.example>": 1}
    assert all("\\Seen" in flags for flags in server.flags().values())


@pytest.mark.parametrize("mode", ["imaps", "starttls"])
async def test_a_certificate_the_account_does_not_trust_stops_before_the_password_is_sent(
    tls_server: tuple[Dovecot, Path], tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, _cert = tls_server
    server.append(mail())
    (tmp_path / "other").mkdir()
    other_ca, _key = self_signed(tmp_path / "other")
    ingest = FakeIngest()
    async with running(tls_config(server, mode, other_ca), tmp_path, ingest=ingest):
        await asyncio.sleep(0.5)  # several connection attempts at reconnect_min 0.05 s
    assert ingest.envelopes == []
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert PASSWORD not in caplog.text
    assert all("\\Seen" not in flags for flags in server.flags().values())


class Introspection:
    """An OAuth2 token-introspection endpoint (RFC 7662) for Dovecot: one valid token for USER."""

    TOKEN = "ya29.test-access-token"

    def __init__(self) -> None:
        self.asked: list[str] = []
        introspection = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                token = urllib.parse.parse_qs(self.rfile.read(length).decode()).get("token", [""])[0]
                introspection.asked.append(token)
                answer = {"active": "false"}
                if token == Introspection.TOKEN:
                    answer = {"active": "true", "username": USER}
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads ``asked``, not the request log."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/introspect"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def oauth2_server() -> Iterator[tuple[Dovecot, Introspection]]:
    introspection = Introspection()
    try:
        with dovecot(oauth2_url=introspection.url) as running_server:
            yield running_server, introspection
    finally:
        introspection.close()


async def test_an_account_with_an_oauth2_token_logs_in_with_xoauth2(
    oauth2_server: tuple[Dovecot, Introspection], tmp_path: Path
) -> None:
    server, introspection = oauth2_server
    server.append(mail(message_id="<oauth@customer.example>"))
    account = {"password": None, "oauth2_token": Introspection.TOKEN}
    ingest = FakeIngest()
    progress = Progress()
    async with running(config(server, **account), tmp_path, ingest=ingest, observer=progress):
        await progress.until(lambda done: len(done) == 1)
    assert ingest.keys == {"support/<oauth@customer.example>": 1}
    assert Introspection.TOKEN in introspection.asked  # the server checked our token, not a password


async def test_a_token_the_provider_rejects_fetches_nothing(
    oauth2_server: tuple[Dovecot, Introspection], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, introspection = oauth2_server
    server.append(mail())
    ingest = FakeIngest()
    async with running(config(server, password=None, oauth2_token="revoked"), tmp_path, ingest=ingest):
        await asyncio.sleep(0.5)
    assert ingest.envelopes == []
    assert "revoked" in introspection.asked
    assert "revoked" not in caplog.text  # a token is a secret: never logged
    assert all("\\Seen" not in flags for flags in server.flags().values())

"""IMAP mailboxes: one task per (account, folder), IDLE when offered, polling otherwise.

Per folder a durable watermark (UIDVALIDITY, last UID) says what has been stored. A message is
fetched with ``BODY.PEEK[]`` (which, unlike ``RFC822``, does not set ``\\Seen``), ingested, and only
once the store committed it is it flagged seen or moved, and the watermark advanced. A crash in
between refetches the message; its idempotency key makes that a duplicate, not a second ticket.

Without a watermark for the current UIDVALIDITY (first start, or the server renumbered the folder)
the folder is rescanned: its unseen messages (or all of them, ``rescan = "all"``), and only when
that rescan finished is the watermark written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aioimaplib import aioimaplib  # type: ignore[import-untyped]

from connectors.base import ChannelContext, Ingest
from connectors.email.envelope import EnvelopeFactory
from connectors.email.settings import EmailSettings, ImapAccountSettings
from connectors.email.state import JsonState
from core.model import IngestResult, Outcome
from normalizers.base import Normalizer

logger = logging.getLogger(__name__)

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
_FETCH = re.compile(rb"^\d+ FETCH ", re.IGNORECASE)

# Called after a message is stored and flagged: (account, folder, uid, result). For metrics and tests.
Observer = Callable[[str, str, int, IngestResult], None]


class ImapError(ConnectionError):
    """The server refused a command or answered something we cannot use; the session restarts."""


class _Retry(Exception):
    """Not stored now; try the same message again after ``delay``."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay


@dataclass(frozen=True, slots=True)
class Watermark:
    uidvalidity: int
    uid: int

    def to_json(self) -> dict[str, int]:
        return {"uidvalidity": self.uidvalidity, "uid": self.uid}

    @classmethod
    def from_json(cls, value: Any) -> Watermark | None:
        if (
            isinstance(value, dict)
            and isinstance(value.get("uidvalidity"), int)
            and isinstance(value.get("uid"), int)
        ):
            return cls(uidvalidity=value["uidvalidity"], uid=value["uid"])
        return None


def _quote(mailbox: str) -> str:
    """A mailbox name as an IMAP quoted string."""
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check(response: aioimaplib.Response, what: str) -> aioimaplib.Response:
    if response.result != "OK":
        last = response.lines[-1] if response.lines else b""
        text = last.decode("utf-8", "replace") if isinstance(last, bytes | bytearray) else str(last)
        raise ImapError(f"{what}: {response.result} {text[:200]}")
    return response


def _cafile(account: ImapAccountSettings) -> str | None:
    return str(account.ca_file) if account.ca_file else None


def _search_uids(response: aioimaplib.Response) -> list[int]:
    """UIDs of a ``UID SEARCH`` answer; aioimaplib hands the untagged line with or without "SEARCH"."""
    for line in response.lines[:-1]:  # the last line is the tagged status text
        if not isinstance(line, bytes):
            continue
        words = line.split()
        if words and words[0].upper() == b"SEARCH":
            words = words[1:]
        if all(word.isdigit() for word in words):
            return sorted(int(word) for word in words)
    return []


class FolderPoller:
    """Fetches one folder of one account into one inbox, until stopped."""

    def __init__(
        self,
        name: str,
        account: ImapAccountSettings,
        folder: str,
        *,
        email: EmailSettings,
        factory: EnvelopeFactory,
        state: JsonState,
        ingest: Ingest,
        normalize: Normalizer,
        observer: Observer | None = None,
    ) -> None:
        self.name = name
        self.folder = folder
        self._account = account
        self._factory = factory
        self._state = state
        self._ingest = ingest
        self._normalize = normalize
        self._observer = observer
        self._authserv_id = account.trusted_authserv_id or email.authserv_id_for(account.inbox)
        self._key = f"imap/{name}/{folder}"
        self._stopping = asyncio.Event()
        self._healthy = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, catch up, wait for mail; on any error reconnect with jittered exponential backoff."""
        delay = self._account.reconnect_min
        while not self._stopping.is_set():
            self._healthy = False
            try:
                await self._session()
                return
            except _Retry as retry:
                wait = retry.delay if retry.delay is not None else self._account.reconnect_min
            except (OSError, TimeoutError, ImapError, aioimaplib.AioImapException) as exc:
                if self._healthy:  # the connection worked for a while: start the backoff afresh
                    delay = self._account.reconnect_min
                logger.warning(
                    "IMAP %s/%s: %s: %s; reconnecting in %.1fs",
                    self.name,
                    self.folder,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                wait = delay
                delay = min(delay * 2, self._account.reconnect_max)
            if await self._wait(wait * random.uniform(0.8, 1.2)):  # noqa: S311 - jitter, not crypto
                return

    def stop(self) -> None:
        self._stopping.set()

    async def _wait(self, seconds: float) -> bool:
        """Sleep unless stopped first; True when stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()

    # -- one connection ----------------------------------------------------------------------

    async def _session(self) -> None:
        client = await self._connect()
        try:
            response = _check(await client.select(_quote(self.folder)), f"SELECT {self.folder}")
            uidvalidity = self._uidvalidity(response)
            idle = self._account.use_idle and client.has_capability("IDLE")
            while not self._stopping.is_set():
                await self._catch_up(client, uidvalidity)
                self._healthy = True
                if idle:
                    await self._idle(client)
                elif await self._wait(self._account.poll_interval):
                    break
        finally:
            await self._close(client)

    @staticmethod
    async def _close(client: aioimaplib.IMAP4) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await client.logout()
        # aioimaplib leaves the socket to the server's close; a dead or slow server never closes it.
        transport = client.protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    async def _connect(self) -> aioimaplib.IMAP4:
        account = self._account
        if account.tls:
            client: aioimaplib.IMAP4 = aioimaplib.IMAP4_SSL(
                account.host,
                account.effective_port,
                timeout=account.timeout,
                ssl_context=ssl.create_default_context(cafile=_cafile(account)),
            )
        else:
            client = aioimaplib.IMAP4(account.host, account.effective_port, timeout=account.timeout)
        try:
            await self._open(client)
        except BaseException:
            await self._close(client)
            raise
        return client

    async def _open(self, client: aioimaplib.IMAP4) -> None:
        account = self._account
        await client.wait_hello_from_server()
        if account.starttls:
            await self._starttls(client, ssl.create_default_context(cafile=_cafile(account)))
        if account.oauth2_token is not None:
            response = await client.xoauth2(account.username, account.oauth2_token.get_secret_value())
        else:
            assert account.password is not None
            response = await client.login(account.username, account.password.get_secret_value())
        # The server's own text may echo the user name; never the password.
        _check(response, f"login as {account.username}")
        # Servers announce more after login (MOVE, UIDPLUS); the pre-login list would hide them.
        await asyncio.wait_for(client.protocol.capability(), account.timeout)

    async def _starttls(self, client: aioimaplib.IMAP4, context: ssl.SSLContext) -> None:
        """aioimaplib has no STARTTLS; the upgrade is asyncio's own ``loop.start_tls``."""
        protocol = client.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ImapError("server does not offer STARTTLS (and starttls = true)")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        _check(await asyncio.wait_for(protocol.execute(command), self._account.timeout), "STARTTLS")
        loop = asyncio.get_running_loop()
        protocol.transport = await loop.start_tls(
            protocol.transport, protocol, context, server_hostname=self._account.host
        )
        # RFC 3501 6.2.1: capabilities learnt before TLS must be discarded.
        await asyncio.wait_for(protocol.capability(), self._account.timeout)

    def _uidvalidity(self, response: aioimaplib.Response) -> int:
        for line in response.lines:
            if isinstance(line, bytes) and (match := _UIDVALIDITY.search(line)):
                return int(match.group(1))
        raise ImapError(f"SELECT {self.folder} gave no UIDVALIDITY")

    async def _idle(self, client: aioimaplib.IMAP4) -> None:
        """Wait in IDLE until the server pushes something, ``poll_interval`` passes, or we stop.

        An EXISTS the server sends between our last fetch and the start of IDLE is dropped by
        aioimaplib (it only reports pushes during IDLE), so IDLE never waits longer than
        ``poll_interval``: such a mail is then picked up by the next catch-up.
        """
        account = self._account
        idle = await client.idle_start(timeout=account.idle_interval)
        push = asyncio.ensure_future(client.wait_server_push(timeout=account.idle_interval + 60))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait(
                {push, stop}, timeout=min(account.poll_interval, account.idle_interval),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            push.cancel()
            stop.cancel()
            client.idle_done()
        _check(await asyncio.wait_for(idle, self._account.timeout), "IDLE")

    # -- fetching ----------------------------------------------------------------------------

    async def _catch_up(self, client: aioimaplib.IMAP4, uidvalidity: int) -> None:
        mark = Watermark.from_json(await self._state.get(self._key))
        if mark is None or mark.uidvalidity != uidvalidity:
            await self._rescan(client, uidvalidity, previous=mark)
            return
        # "n:*" always includes the highest UID, even when it is <= n; filter below.
        response = _check(
            await client.uid("fetch", f"{mark.uid + 1}:*", "(UID RFC822.SIZE)"), "UID FETCH sizes"
        )
        for uid, size in self._sizes(response):
            if uid <= mark.uid or self._stopping.is_set():
                continue
            if await self._process(client, uid, size, uidvalidity):
                await self._state.set(self._key, Watermark(uidvalidity, uid).to_json())

    async def _rescan(self, client: aioimaplib.IMAP4, uidvalidity: int, previous: Watermark | None) -> None:
        if previous is not None:
            logger.warning(
                "IMAP %s/%s: UIDVALIDITY changed (%d -> %d); rescanning (%s)",
                self.name,
                self.folder,
                previous.uidvalidity,
                uidvalidity,
                self._account.rescan,
            )
        everything = _search_uids(_check(await client.uid_search("ALL", charset=None), "UID SEARCH ALL"))
        if self._account.rescan == "unseen":
            wanted = set(
                _search_uids(_check(await client.uid_search("UNSEEN", charset=None), "UID SEARCH UNSEEN"))
            )
        else:
            wanted = set(everything)
        if wanted:
            sizes = dict(
                self._sizes(
                    _check(
                        await client.uid(
                            "fetch", ",".join(str(u) for u in sorted(wanted)), "(UID RFC822.SIZE)"
                        ),
                        "UID FETCH sizes",
                    )
                )
            )
            for uid in sorted(wanted):
                if self._stopping.is_set():
                    return
                # A failure raises out of here; the watermark is then still unwritten, so the rescan
                # is redone (what was stored meanwhile comes back as a duplicate).
                await self._process(client, uid, sizes.get(uid, 0), uidvalidity)
        # Anything that arrives after the search has a larger UID than every UID seen by it.
        await self._state.set(self._key, Watermark(uidvalidity, max(everything, default=0)).to_json())

    @staticmethod
    def _sizes(response: aioimaplib.Response) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        for line in response.lines:
            if isinstance(line, bytes) and _FETCH.match(line):
                uid, size = _UID.search(line), _SIZE.search(line)
                if uid is not None:
                    found.append((int(uid.group(1)), int(size.group(1)) if size else 0))
        return sorted(found)

    async def _process(self, client: aioimaplib.IMAP4, uid: int, size: int, uidvalidity: int) -> bool:
        """Fetch, ingest and flag one message. True when done with it (the watermark may pass it)."""
        if size > self._account.max_message_size:
            # Left in the mailbox, unflagged, for a person to see; we do not fetch what we must not hold.
            logger.error(
                "IMAP %s/%s: UID %d is %d bytes, over max_message_size; left unprocessed in the mailbox",
                self.name,
                self.folder,
                uid,
                size,
            )
            return True
        raw = await self._fetch(client, uid)
        if raw is None:
            # Expunged by someone else between the listing and the fetch: nothing to do.
            return True
        envelope = await self._factory.build(
            raw,
            inbox=self._account.inbox,
            authserv_id=self._authserv_id,
            remote=self._account.host,
            transport={
                "transport": "imap",
                "account": self.name,
                "folder": self.folder,
                "uid": uid,
                "uidvalidity": uidvalidity,
                "mail_from": None,
                "rcpt_to": [],
            },
        )
        try:
            result = await self._ingest(envelope, self._normalize)
        except Exception:
            logger.exception("IMAP %s/%s: ingest of UID %d failed; will retry", self.name, self.folder, uid)
            raise _Retry(None) from None
        if result.outcome == Outcome.RETRY or (not result.stored and result.outcome != Outcome.REJECTED):
            logger.info(
                "IMAP %s/%s: UID %d not stored now (%s); will retry",
                self.name,
                self.folder,
                uid,
                result.reason,
            )
            raise _Retry(result.retry_after)
        if result.outcome == Outcome.REJECTED:
            logger.warning(
                "IMAP %s/%s: UID %d rejected (%s); left unflagged in the mailbox",
                self.name,
                self.folder,
                uid,
                result.reason,
            )
        else:
            await self._mark_processed(client, uid)
        if self._observer is not None:
            self._observer(self.name, self.folder, uid, result)
        return True

    async def _fetch(self, client: aioimaplib.IMAP4, uid: int) -> bytes | None:
        response = _check(await client.uid("fetch", str(uid), "(UID BODY.PEEK[])"), f"UID FETCH {uid}")
        lines = response.lines
        for index, line in enumerate(lines):
            if isinstance(line, bytearray) and index > 0:
                head = lines[index - 1]
                match = _UID.search(head) if isinstance(head, bytes) else None
                if match is None or int(match.group(1)) == uid:
                    return bytes(line)
        return None

    async def _mark_processed(self, client: aioimaplib.IMAP4, uid: int) -> None:
        account = self._account
        if account.processed_action == "seen":
            _check(await client.uid("store", str(uid), "+FLAGS.SILENT", r"(\Seen)"), f"flag UID {uid} seen")
            return
        assert account.processed_folder is not None
        target = _quote(account.processed_folder)
        if client.has_capability("MOVE"):
            _check(await client.uid("move", str(uid), target), f"UID MOVE {uid}")
            return
        _check(await client.uid("copy", str(uid), target), f"UID COPY {uid}")
        _check(
            await client.uid("store", str(uid), "+FLAGS.SILENT", r"(\Seen \Deleted)"),
            f"flag UID {uid} deleted",
        )
        if client.has_capability("UIDPLUS"):
            _check(await client.uid("expunge", str(uid)), f"UID EXPUNGE {uid}")
        # Without UIDPLUS a plain EXPUNGE could remove others' \Deleted mail; leave it to the server's policy.


def pollers_for(
    email: EmailSettings,
    factory: EnvelopeFactory,
    state: JsonState,
    ingest: Ingest,
    normalize: Normalizer,
    observer: Observer | None = None,
) -> list[FolderPoller]:
    return [
        FolderPoller(
            name,
            account,
            folder,
            email=email,
            factory=factory,
            state=state,
            ingest=ingest,
            normalize=normalize,
            observer=observer,
        )
        for name, account in email.imap.items()
        for folder in account.folders
    ]


class ImapPollers:
    """Runs every poller as a task; ``stop`` lets the current message finish, then ends them."""

    def __init__(self, pollers: list[FolderPoller]) -> None:
        self.pollers = pollers
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(p.run(), name=f"ticketgate-imap-{p.name}-{p.folder}") for p in self.pollers
        ]

    async def stop(self, grace: float) -> None:
        for poller in self.pollers:
            poller.stop()
        if not self._tasks:
            return
        done, pending = await asyncio.wait(self._tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                logger.error("IMAP poller ended with %s", type(exc).__name__, exc_info=exc)
        self._tasks = []


def setup_imap(ctx: ChannelContext, pollers: ImapPollers, shutdown_timeout: float) -> None:
    """The pollers, polling while the gateway runs."""

    @contextlib.asynccontextmanager
    async def polling() -> AsyncIterator[None]:
        await pollers.start()
        try:
            yield
        finally:
            await pollers.stop(shutdown_timeout)

    ctx.add_lifecycle(polling)


__all__ = ["FolderPoller", "ImapError", "ImapPollers", "Observer", "Watermark", "pollers_for", "setup_imap"]

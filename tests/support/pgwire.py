"""A TCP proxy in front of PostgreSQL that reads what clients send, to count statements and round trips.

The count is taken on the wire, so it holds whatever the client library does: a *statement* is an
``Execute`` (extended protocol) or a ``Query`` (simple protocol) message; a *round trip* is a message
after which the client waits for the server: ``Sync`` (end of a pipeline section, or of any
statement outside pipeline mode), ``Flush`` (psycopg asks for a pipelined read's results with one)
or ``Query``. Connect through it with ``sslmode=disable`` (encrypted bytes cannot be read).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.support.tcpproxy import TcpProxy

# What the client waits on (see the module docstring).
WAITS = frozenset("SHQ")


@dataclass(slots=True)
class Sent:
    """One message a client sent: its type byte and, for a statement, the SQL it runs."""

    kind: str
    sql: str = ""


@dataclass(slots=True)
class Session:
    """Everything one client connection sent, in order, after its start-up packet."""

    sent: list[Sent] = field(default_factory=list)
    _prepared: dict[str, str] = field(default_factory=dict)  # statement name -> SQL
    _bound: str = ""  # the SQL of the last Bind
    _buffer: bytes = b""
    _started: bool = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if not self._started:
                if len(self._buffer) < 4:
                    return
                (length,) = struct.unpack("!i", self._buffer[:4])
                if len(self._buffer) < length:
                    return
                self._buffer = self._buffer[length:]
                self._started = True
                continue
            if len(self._buffer) < 5:
                return
            kind = chr(self._buffer[0])
            (length,) = struct.unpack("!i", self._buffer[1:5])
            if len(self._buffer) < 1 + length:
                return
            body, self._buffer = self._buffer[5 : 1 + length], self._buffer[1 + length :]
            self._message(kind, body)

    def _message(self, kind: str, body: bytes) -> None:
        if kind == "P":  # Parse: name, query
            name, query = body.split(b"\0", 2)[:2]
            self._prepared[name.decode()] = query.decode()
            return
        if kind == "B":  # Bind: portal, statement
            statement = body.split(b"\0", 2)[1].decode()
            self._bound = self._prepared.get(statement, "")
            return
        if kind == "E":
            self.sent.append(Sent("E", self._bound))
        elif kind == "Q":
            self.sent.append(Sent("Q", body.rstrip(b"\0").decode()))
        elif kind in WAITS:
            self.sent.append(Sent(kind))


class PgWireRecorder:
    """Forwards ``127.0.0.1:<port>`` to a PostgreSQL server (a :class:`TcpProxy`) and keeps a
    :class:`Session` per connection."""

    def __init__(self, upstream_dsn: str) -> None:
        parts = conninfo_to_dict(upstream_dsn)
        self._upstream_dsn = upstream_dsn
        self.sessions: list[Session] = []
        self._proxy = TcpProxy(
            str(parts.get("host") or "127.0.0.1"), int(parts.get("port") or 5432), tap=self._new_session
        )

    async def start(self) -> PgWireRecorder:
        await self._proxy.start()
        return self

    def forget(self) -> None:
        """Drop what was recorded so far (connections stay open)."""
        for session in self.sessions:
            session.sent.clear()

    def dsn(self) -> str:
        """The upstream DSN, through this proxy, unencrypted."""
        return make_conninfo(
            self._upstream_dsn,
            host="127.0.0.1",
            port=str(self._proxy.port),
            sslmode="disable",
            gssencmode="disable",
        )

    async def close(self) -> None:
        await self._proxy.close()

    def _new_session(self) -> Callable[[bytes], None]:
        session = Session()
        self.sessions.append(session)
        return session.feed


def between(sent: list[Sent], start: str, end: str) -> list[list[Sent]]:
    """Every stretch of ``sent`` from a statement whose SQL is ``start`` to the next one whose SQL is
    ``end`` (both left out)."""
    stretches: list[list[Sent]] = []
    current: list[Sent] | None = None
    for message in sent:
        if message.kind in "EQ" and message.sql == start:
            current = []
        elif message.kind in "EQ" and message.sql == end and current is not None:
            stretches.append(current)
            current = None
        elif current is not None:
            current.append(message)
    return stretches

"""SMTP DATA read in bulk, with aiosmtpd's semantics.

aiosmtpd 1.4 reads DATA with one ``readuntil(b"\\r\\n")`` per line plus a few joins: ~60 awaits for
a 5 KB mail, ~2,500 for 200 KB, which was the largest single cost of the listener at 200 KB. This
reads up to each ``.\\r\\n`` instead (usually once, at the terminator) and gives the same answer:

- the data ends at the first ``CRLF . CRLF`` of the stream, where the first CRLF may be the DATA
  command's own line end (an empty mail is a lone ``.`` line). Lines are split on CRLF only, so a
  bare LF or CR before the dot ends nothing, and whatever follows the terminator stays unread for
  the command loop;
- a line's leading dot is removed (RFC 5321 4.5.2);
- more than ``size_limit`` bytes (counted before dot-removal, as aiosmtpd counts) give
  :attr:`DataState.TOO_MUCH`, a line longer than ``line_limit`` (with its CRLF) gives
  :attr:`DataState.TOO_LONG`; either way the rest is read and dropped, so memory stays bounded by
  about twice ``size_limit`` plus one read;
- bare LFs are line ends, as Postfix 3.9 reads them (``smtpd_forbid_bare_newline = normalize``):
  only ``CRLF . CRLF`` ends the data (``LF . LF`` and ``LF . CRLF`` never do, so SMTP smuggling
  cannot hide a second mail behind them), and inside the content every bare LF becomes CRLF before
  the line length is measured and dots are unstuffed. Clients that write LF line ends (Python's own
  ``smtplib.sendmail(..., msg.as_bytes())``) are then accepted instead of bounced;
- a mail within both limits but with a bare CR anywhere gives :attr:`DataState.BARE_CR`
  (RFC 5321 2.3.8): no client writes CR line ends, and a bare CR is what smuggling against MTAs that
  honour ``CR . CR`` uses, so the listener refuses the whole mail.

One nuance: aiosmtpd answers for whichever of "too much" and "too long" it notices first, line by
line; here a too-long line counts as first when it lies wholly within the bytes read before the
size limit was crossed. Both are refusals; only the reply code can differ, and only for a mail that
is both too big and has an over-long line.
"""

from __future__ import annotations

import asyncio
import enum
import re

_DOT_CRLF = b".\r\n"
_CRLF = b"\r\n"


class DataState(enum.Enum):
    """How a DATA read ended (aiosmtpd's ``_DataState``)."""

    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()
    BARE_CR = enum.auto()  # ours: a lone CR, refused after the data is read


_LONG_LINE_PATTERNS: dict[int, re.Pattern[bytes]] = {}


_BARE_LF = re.compile(rb"(?<!\r)\n")


def crlf_line_ends(raw: bytes) -> bytes:
    """``raw`` with every bare LF turned into CRLF."""
    return _BARE_LF.sub(_CRLF, raw)


def has_long_line(raw: bytes, line_limit: int) -> bool:
    """Whether a line of ``raw`` (bare LFs end lines too) is longer than ``line_limit`` bytes with
    its CRLF."""
    if raw.count(b"\n") != raw.count(_CRLF):
        raw = crlf_line_ends(raw)
    return _has_long_line(raw, line_limit)


def _has_long_line(raw: bytes, line_limit: int) -> bool:
    """:func:`has_long_line` for ``raw`` whose every LF is part of a CRLF."""
    # A line is too long when the text between two LFs (its CR included) reaches ``line_limit``
    # bytes. One regex pass in C; the first line has no LF before it.
    first = raw.find(b"\n")
    if (first if first >= 0 else len(raw)) >= line_limit:
        return True
    pattern = _LONG_LINE_PATTERNS.get(line_limit)
    if pattern is None:
        pattern = _LONG_LINE_PATTERNS[line_limit] = re.compile(rb"\n[^\n]{%d}" % line_limit)
    return pattern.search(raw) is not None


def unstuff(raw: bytes) -> bytes:
    """RFC 5321 4.5.2: remove the dot a sender put before every line starting with a dot."""
    if b"\r\n." in raw:
        raw = raw.replace(b"\r\n.", _CRLF)
    return raw[1:] if raw[:1] == b"." else raw


async def read_data(
    reader: asyncio.StreamReader, *, size_limit: int | None, line_limit: int
) -> tuple[DataState, bytes]:
    """Read one mail's DATA up to and including its terminator; (state, unstuffed content).

    The content is empty unless the state is :attr:`DataState.NOMINAL`. Raises what the reader
    raises (``IncompleteReadError`` at end of stream, ``CancelledError`` when the session goes).
    """
    pieces: list[bytes] = []
    size = 0
    state = DataState.NOMINAL
    # The last two bytes read. The DATA command ended a line, so ".\r\n" first thing ends the data.
    tail = _CRLF
    while True:
        try:
            piece = await reader.readuntil(_DOT_CRLF)
        except asyncio.LimitOverrunError as overrun:
            # No ".\r\n" starts within the first ``consumed`` buffered bytes: they are ours, and
            # nothing past the terminator is taken from the command loop.
            piece = await reader.read(overrun.consumed)
            ended = False
        else:
            # It ends the data when a line end comes right before the dot (maybe read earlier).
            before = piece[-5:-3] if len(piece) >= 5 else (tail + piece[:-3])[-2:]
            ended = before == _CRLF
            if ended:
                piece = piece[:-3]
        if piece:
            size += len(piece)
            tail = piece[-2:] if len(piece) >= 2 else (tail + piece)[-2:]
            if state is DataState.NOMINAL:
                pieces.append(piece)
                if size_limit and size > size_limit:
                    # Drop what was read at once; only the line-length verdict, for the bytes
                    # within the limit, needs it first.
                    within = b"".join(pieces)[:size_limit]
                    pieces.clear()
                    state = DataState.TOO_LONG if has_long_line(within, line_limit) else DataState.TOO_MUCH
        if ended:
            break
    if state is not DataState.NOMINAL:
        return state, b""
    raw = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    # Each count is a pass over the mail (~60-170 us at 200 KB): the checks share them. Every CRLF
    # pair holds one CR and one LF, so a bare LF or CR is there exactly when the counts differ
    # (three counts in C; a regex took a third of the listener's CPU at 200 KB). Bare LFs are rare
    # and only then is the mail rewritten.
    pairs = raw.count(_CRLF)
    if raw.count(b"\n") != pairs:
        raw = crlf_line_ends(raw)
        pairs = raw.count(_CRLF)
    if _has_long_line(raw, line_limit):
        return DataState.TOO_LONG, b""
    if raw.count(b"\r") != pairs:
        return DataState.BARE_CR, b""
    return state, unstuff(raw)

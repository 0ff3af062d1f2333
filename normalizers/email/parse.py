"""The email normalizer: one RFC 5322 mail (bytes) -> one :class:`CanonicalMessage`.

``envelope.meta`` keys read here (all optional):

- ``mail_from``: the SMTP envelope sender (``""`` for a null reverse path ``<>``);
- ``rcpt_to``: the SMTP envelope recipients (list of str), copied to ``extra``;
- ``authentication``: the trusted upstream verdict for this mail, see
  :func:`normalizers.email.addresses.sender_verified` (``{"dmarc": "pass", "header_from": "x.com"}``
  and/or ``{"dkim": [{"result": "pass", "domain": "x.com"}]}``); without it the sender is *claimed*;
- ``ticket_ref_pattern``: regex finding a ticket reference in the subject (default
  ``\\[#TG-(?P<number>\\d+)\\]``); ``thread_ref`` becomes ``ticket:<number>``;
- ``loop_marker``: our ``X-Loop`` marker (default ``ticketgate``).

Parsing uses ``compat32``, not ``policy.default``: measured on the three corpora (215 mails) the
modern policy costs 2.4 ms per parse against 0.87 ms, 3.9 ms against 0.94 ms with the headers read,
2.4 s against 0.2 s for 10,000 parts, and its header parser takes ~46 s on a 1 MB header of short
words. Everything the modern policy adds (RFC 2047/2231, address parsing) is done in ``headers.py``
and ``addresses.py`` more tolerantly, on raw values, after the bounds are checked.

``text`` is the plain alternative, the sender's own text; it comes from the HTML alternative only
when the plain one is missing or blank, or was decoded lossily while the HTML decoded cleanly
(``extra["text_source"] = "html"`` then; see :func:`_html_gives_text`). Text parts that follow one
another in a multipart/mixed are one message, kept in order in both fields (see :func:`_render`).
Only the root of a multipart/related is body text (RFC 2387); its other members are attachments.
Nameless parts get made-up names that are unique within the mail (see :func:`_attachment_name`),
and damaged base64 is decoded as RFC 2045 reads it (see :func:`_tolerant_b64decode`).
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import parsedate_to_datetime
from html import escape
from typing import Any, ClassVar

from core.errors import ConfigError, NormalizationError
from core.model import Attachment, CanonicalMessage, Identity, IdentityKind, RawEnvelope
from normalizers.base import Normalizer
from normalizers.email import autoreply, headers
from normalizers.email.addresses import Address, parse_addresses, parse_sender, sender_verified
from normalizers.email.charsets import decode
from normalizers.email.reply import extract_reply
from normalizers.html import to_text as html_to_text

DEFAULT_TICKET_REF = r"\[#TG-(?P<number>\d+)\]"
DEFAULT_LOOP_MARKER = "ticketgate"
# The header every reply ticketgate sends carries (connectors/email/sender.py), with the reply id.
# Such a mail coming in is our own reply looped back (a smarthost or a forward that delivers it to
# us): it is quarantined with that reason, never made a customer's message.
REPLY_HEADER = "X-Ticketgate-Reply"

_BOUNDARY_OR_DELIMITER = re.compile(
    rb"""boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))|^--([^\r\n]{1,202})""",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EmailLimits:
    """Bounds on one mail; crossing one is a NormalizationError (the mail is quarantined)."""

    max_bytes: int = 64 * 1024 * 1024
    max_depth: int = 32
    max_parts: int = 1000
    max_headers: int = 1000  # per part
    max_header_length: int = 64 * 1024  # one header field, folded lines included
    max_decoded_bytes: int = 128 * 1024 * 1024  # every decoded part together
    max_text_chars: int = 4 * 1024 * 1024  # text and html fields each


# The multipart ancestors of a part, outermost first: (serial number in the walk, is alternative).
_Path = tuple[tuple[int, bool], ...]


@dataclass(frozen=True, slots=True)
class _TextPart:
    """One text/plain or text/html body part, decoded, with where it sits in the MIME tree."""

    html: bool
    text: str
    path: _Path


@dataclass(slots=True)
class _Body:
    """What the walk over the MIME tree collects."""

    texts: list[_TextPart] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    lossy: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    charsets: list[str] = field(default_factory=list)
    decoded_bytes: int = 0
    parts: int = 0


def make_email_normalizer(limits: EmailLimits) -> Normalizer:
    """A normalizer with the given bounds (settings pass theirs; ``normalize_email`` uses defaults)."""
    return EmailNormalizer(limits)


@dataclass(frozen=True, slots=True)
class EmailNormalizer:
    """Parses one mail within ``limits``. Plain data, so it pickles: the gateway parses mail in a
    worker process (``offload``; see gateway/offload.py)."""

    limits: EmailLimits
    offload: ClassVar[bool] = True

    def __call__(self, envelope: RawEnvelope) -> list[CanonicalMessage]:
        try:
            return [_normalize(envelope, self.limits)]
        except (NormalizationError, ConfigError):
            raise
        except RecursionError as exc:
            raise NormalizationError("MIME structure nested too deeply to parse") from exc
        except Exception as exc:
            # Guarantee 7: a mail we cannot understand is quarantined with a reason, never lost.
            raise NormalizationError(f"unexpected {type(exc).__name__} while normalizing: {exc}") from exc


def _prescan(raw: bytes, limits: EmailLimits) -> None:
    """Bound depth and part count on the raw bytes, before the parser spends time on them.

    One linear pass over boundary declarations and delimiter lines. The parser checks every line
    against every open boundary, so depth must be refused before parsing, not after.
    """
    open_boundaries: list[bytes] = []
    declared: set[bytes] = set()
    delimiters = 0
    for match in _boundaries_and_delimiters(raw):
        if match.group(3) is None:
            boundary = (match.group(1) or match.group(2) or b"").rstrip()
            if boundary and boundary not in open_boundaries:
                declared.add(boundary)
                if len(declared) > limits.max_parts:
                    raise NormalizationError(f"more than {limits.max_parts} MIME boundaries declared")
                open_boundaries.append(boundary)
                if len(open_boundaries) > limits.max_depth:
                    raise NormalizationError(f"MIME nesting deeper than {limits.max_depth} levels")
            continue
        line = match.group(3).rstrip()
        closing = line.endswith(b"--") and line[:-2] in open_boundaries
        boundary = line[:-2] if closing else line
        if boundary not in open_boundaries:
            continue
        del open_boundaries[open_boundaries.index(boundary) + (0 if closing else 1) :]
        if not closing:
            delimiters += 1
            if delimiters > limits.max_parts:
                raise NormalizationError(f"more than {limits.max_parts} MIME parts")


def _boundaries_and_delimiters(raw: bytes) -> Iterator[re.Match[bytes]]:
    """What ``_BOUNDARY_OR_DELIMITER.finditer(raw)`` yields, found at C speed.

    A match can only start where ``boundary`` is (in any case) or where a line starts with ``--``;
    ``bytes.find`` locates those, and the pattern is tried there only. Scanning with the pattern
    itself tried it at every byte: 58 us for a 5 KB plain mail, 2.3 ms for 200 KB.
    """
    lowered = raw.lower()  # bytes: ASCII case only, as the pattern's IGNORECASE on bytes
    starts: list[int] = []
    for needle, offset in ((b"boundary", 0), (b"\n--", 1)):
        found = lowered.find(needle)
        while found >= 0:
            starts.append(found + offset)
            found = lowered.find(needle, found + 1)
    if raw.startswith(b"--"):
        starts.append(0)
    end = 0
    for start in sorted(starts):
        if start < end:
            continue  # inside the previous match, which finditer would have consumed
        match = _BOUNDARY_OR_DELIMITER.match(raw, start)
        if match is not None:
            end = match.end()
            yield match


_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")


def _header_end(raw: bytes) -> int:
    """Index of the line end before the first blank line (CRLF or bare LF), or ``len(raw)``."""
    end = raw.find(b"\n\r\n")
    # A bare-LF blank line matters only before the CRLF one: don't scan a 200 KB body for it.
    end2 = raw.find(b"\n\n", 0, end + 2) if end >= 0 else raw.find(b"\n\n")
    return min(e for e in (end, end2, len(raw)) if e >= 0)


def _repair_header_block(raw: bytes) -> tuple[bytes, int]:
    """Keep garbage lines inside the header block from ending it early.

    The parser ends the headers at the first line that is neither a field nor a continuation, so a
    broken fold (a base64 tracker header without indentation) or a stray line ("---- Original email
    message ----", "quite Delivered-To: x") would push every later header into the body. Such a
    line, when real fields still follow it before the blank line, becomes a continuation of the
    field above (or is dropped before the first field). Returns the bytes and the number of repairs.
    """
    end = _header_end(raw)
    head = raw[: end + 1]
    lines = head.splitlines(keepends=True)
    if all(_HEADER_LINE.match(line) or line[:1] in b" \t" for line in lines[1:]):
        return raw, 0  # the common case: nothing to repair (line 0 may be an mbox "From " line)
    last_field = max(i for i, line in enumerate(lines) if _HEADER_LINE.match(line)) if lines else -1
    repaired: list[bytes] = []
    repairs = 0
    for index, line in enumerate(lines):
        is_field = _HEADER_LINE.match(line) is not None
        if is_field or line[:1] in b" \t" or index > last_field or (index == 0 and line.startswith(b"From ")):
            repaired.append(line)
        elif repaired and any(_HEADER_LINE.match(r) for r in repaired):
            repaired.append(b" " + line)
            repairs += 1
        else:
            repairs += 1  # garbage before the first field
    return b"".join(repaired) + raw[end + 1 :], repairs


def _parse(raw: bytes) -> Message:
    """``BytesParser(policy=compat32).parsebytes(raw)``, without the line-by-line walk over the body
    of a single-part mail.

    For a mail that is neither multipart nor message/*, the parser's payload is the rest of the
    input after the blank line, verbatim. So the header block alone is parsed, and the body is
    set as that payload; the result is the same object the full parse builds. Whenever the parser
    would see the headers end anywhere but at that blank line (a stray line, an odd line end), or
    the type needs the body parsed, the full parse runs.
    """
    crlf = raw.find(b"\r\n\r\n")
    # A bare-LF blank line matters only before the CRLF one: don't scan a 200 KB body for it.
    lf = raw.find(b"\n\n", 0, crlf + 4) if crlf >= 0 else raw.find(b"\n\n")
    ends = [end for end in (crlf + 4 if crlf >= 0 else -1, lf + 2 if lf >= 0 else -1) if end >= 0]
    if ends:
        end = min(ends)
        message = _parse_header_block(raw[:end].decode("ascii", "surrogateescape"))
        if message is None:
            message = BytesParser(policy=compat32).parsebytes(raw[:end], headersonly=True)
        if message.get_payload() == "" and message.get_content_maintype() not in {"multipart", "message"}:
            message.set_payload(raw[end:].decode("ascii", "surrogateescape"))
            return message
    return BytesParser(policy=compat32).parsebytes(raw)


# A field line as the stdlib's feedparser reads one (headerRE, minus the "From " envelope line and
# a line starting with the colon, which it reads with a defect): a name of printable characters
# other than the colon, then the colon.
_FIELD_LINE = re.compile(r"[\041-\071\073-\176]+:")


def _parse_header_block(head: str) -> Message | None:
    """What ``Parser(policy=compat32).parsestr(head, headersonly=True)`` builds from a header block
    that ends with its blank line, for a block whose every line is a field or its continuation and
    ends with CRLF; ``None`` for any other block (the parser then reads it).

    The stdlib's feedparser reads it through a generator, a line buffer and a regex per line:
    ~35 us of a 5 KB mail's ~260 us. For such a block its result is the fields in order, each
    value as ``compat32.header_source_parse`` makes it, and an empty payload; no defects.
    """
    if head.count("\r") != head.count("\n") or head.count("\r\n") != head.count("\n"):
        return None  # a lone CR or LF ends a line too
    lines = head.split("\r\n")
    if lines[-2:] != ["", ""] or len(lines) < 3:
        return None
    message = Message(policy=compat32)
    field: list[str] = []
    for line in lines[:-2]:
        if line[:1] in {" ", "\t"} and field:
            field.append(line + "\r\n")
            continue
        if line.startswith("From ") or _FIELD_LINE.match(line) is None:
            return None
        if field:
            message.set_raw(*compat32.header_source_parse(field))
        field = [line + "\r\n"]
    if field:
        message.set_raw(*compat32.header_source_parse(field))
    message.set_payload("")
    return message


def _check_headers(part: Message, limits: EmailLimits) -> None:
    for count, (name, value) in enumerate(part.raw_items(), start=1):
        if count > limits.max_headers:
            raise NormalizationError(f"more than {limits.max_headers} header fields in one part")
        if len(value) > limits.max_header_length:
            raise NormalizationError(
                f"header {name[:40]!r} is {len(value)} characters, limit {limits.max_header_length}"
            )


def _content_type(part: Message) -> str:
    ctype = part.get_content_type()
    return ctype if ctype.count("/") == 1 and " " not in ctype else "application/octet-stream"


def _is_attachment(part: Message, name: str | None) -> bool:
    disposition = str(part.get("Content-Disposition", "")).split(";")[0].strip().lower()
    return disposition == "attachment" or name is not None


def _payload_bytes(part: Message, body: _Body, limits: EmailLimits) -> bytes:
    # Unknown or identity encodings ("7-bit", "8bit;", "spam") come back as the bytes that were sent;
    # broken base64 is decoded as far as it goes (the defect is recorded below).
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        data = b""
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    defects = getattr(part, "defects", ())
    if cte == "base64" and any(type(d).__name__.startswith("InvalidBase64") for d in defects):
        data = _tolerant_b64decode(part.get_payload())
    if cte in {"x-uuencode", "uuencode", "uue", "x-uue"} and not data.lstrip().startswith(b"begin"):
        data = _uudecode(data)
    for defect in defects:
        body.defects.append(type(defect).__name__)
    body.decoded_bytes += len(data)
    if body.decoded_bytes > limits.max_decoded_bytes:
        raise NormalizationError(f"decoded parts exceed {limits.max_decoded_bytes} bytes")
    return data


_GENERATED_NAMES = {
    "message/delivery-status": ("delivery-status", ".txt"),
    "text/plain": ("document", ".txt"),
    "text/html": ("document", ".html"),
    "text/calendar": ("invite", ".ics"),
    "video/quicktime": ("video", ".mov"),
    "image/jpeg": ("image", ".jpg"),
    "image/jpg": ("image", ".jpg"),
    "image/png": ("image", ".png"),
    "image/gif": ("image", ".gif"),
}
# A Content-ID that carries a file name ("image001.png@01D...") names its part; the extension needs
# a letter, so a sequence number ("32497.1617621278.2@host") is not taken for one.
_CID_NAME = re.compile(r"^([^@<>\s/\\]+\.(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{1,10})@")
_CID_LOCAL = re.compile(r"^([^@<>\s/\\]{1,100})@")


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]+")


def _tolerant_b64decode(payload: object) -> bytes:
    """Damaged base64 decoded as far as it goes, as RFC 2045 section 6.8 reads it (and Ruby's mail
    gem, and so Zammad, does).

    Characters outside the alphabet are ignored, the first ``=`` ends the data (so a footer a list
    server appended after the padding is not decoded into junk bytes), missing padding is supplied,
    and a last group of one character (which cannot hold a byte) is dropped. The stdlib instead
    hands back such a payload still *encoded* when its length is one more than a multiple of four.
    Used only when the stdlib reported a base64 defect; valid base64 is the stdlib's.
    """
    if not isinstance(payload, str):
        return b""
    cleaned = _NOT_BASE64.sub(b"", payload.encode("ascii", errors="ignore")).split(b"=", 1)[0]
    cleaned = cleaned[: len(cleaned) - (len(cleaned) % 4 == 1)]
    return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))


def _uudecode(raw: bytes) -> bytes:
    """uuencode without the "begin" line (the stdlib then returns it undecoded); line by line."""
    out = bytearray()
    for line in raw.splitlines():
        line = line.strip()
        if not line or line in {b"`", b"end"} or line.startswith(b"begin "):
            continue
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Some encoders pad lines with garbage: keep the length the line declares.
            length = (((line[0] - 32) & 63) * 4 + 5) // 3
            with contextlib.suppress(binascii.Error):
                out += binascii.a2b_uu(line[:length])
    return bytes(out)


def _attachment_name(part: Message, ctype: str, name: str | None, hint: str | None, taken: set[str]) -> str:
    """The sender's file name; else a name made from what the part says about itself.

    For a part without a name, in order: a file name in its Content-ID, a name for its content type
    (image.jpg, document.html), the local part of its Content-ID, "file". Made-up names (never the
    sender's own) are unique within the mail: a taken one gets a counter (document.html,
    document1.html; two parts sharing one Content-ID get cid, cid1), so the names depend only on
    the mail and the order of its parts.
    """
    if name:
        return name
    descriptions = headers.raw_values(part, "Content-Description")
    description = headers.decode_text(descriptions[0], hint=hint).strip() if descriptions else ""
    description = description if "/" not in description and len(description) <= 100 else ""
    stem, extension = "file", ""
    if ctype in {"message/rfc822", "message/global"}:
        inner = part.get_payload()
        subject = ""
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            subjects = headers.raw_values(inner[0], "Subject")
            subject = headers.decode_text(subjects[0], hint=hint).strip() if subjects else ""
        stem, extension = (subject.replace("/", "_") or description or "forwarded-message"), ".eml"
    else:
        content_ids = headers.raw_values(part, "Content-ID")
        cid = headers.unfold(content_ids[0]).strip().strip("<>") if content_ids else ""
        by_cid = _CID_NAME.match(cid)
        cid_local = _CID_LOCAL.match(cid)
        if by_cid:
            stem, dot, extension = by_cid.group(1).rpartition(".")
            extension = dot + extension
        elif ctype == "message/delivery-status" and description:
            stem, extension = description, ".txt"
        elif ctype in _GENERATED_NAMES:
            stem, extension = _GENERATED_NAMES[ctype]
        elif cid_local:
            stem = cid_local.group(1)
    candidate, counter = stem + extension, 0
    while candidate in taken:
        counter += 1
        candidate = f"{stem}{counter}{extension}"
    return candidate


def _related_root(related: Message, children: list[Message]) -> int:
    """The index of the root of a multipart/related: the part its ``start`` names, else the first."""
    start = related.get_param("start")
    if isinstance(start, str) and start.strip():
        wanted = start.strip().strip("<>")
        for index, child in enumerate(children):
            if str(child.get("Content-ID", "")).strip().strip("<>") == wanted:
                return index
    return 0


def _serialize(message: Message, linesep: str) -> bytes:
    # max_line_length=0: write the headers as they came, never refolded. An embedded message with
    # no headers and no body (a bounce whose original was left out) is empty: the line end before
    # the next boundary belongs to the boundary (RFC 2046), not to the part.
    data = message.as_bytes(policy=compat32.clone(max_line_length=0, linesep=linesep))
    return b"" if not data.strip(b"\r\n") else data


# The usual Content-Type of a text part: "type/subtype; charset=token", the token maybe quoted
# (RFC 2045 token characters, the word here: no space, control or tspecial).
_MIME_WORD = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
_PLAIN_CHARSET = re.compile(
    rf"{_MIME_WORD}/{_MIME_WORD};[ \t]*(?ai:charset)=(?:\"({_MIME_WORD})\"|({_MIME_WORD}))"
)


def _charset_param(part: Message) -> object:
    """``part.get_param("charset")``; read straight from a Content-Type of the usual shape, as the
    stdlib's parameter parser (~8 us a call, RFC 2231 included) reads it; any other to that parser."""
    value = part.get("Content-Type")
    if type(value) is str:
        match = _PLAIN_CHARSET.fullmatch(value)
        if match is not None:
            return match.group(1) or match.group(2)
    return part.get_param("charset")


def _content_charset(charset: object) -> str | None:
    """``part.get_content_charset()`` from ``charset``, what ``part.get_param("charset")`` returned
    (the stdlib's steps: an RFC 2231 value decoded, ASCII only, lowercased)."""
    if charset is None:
        return None
    if isinstance(charset, tuple):
        try:
            charset = str(charset[2].encode("raw-unicode-escape"), charset[0] or "us-ascii")
        except (LookupError, UnicodeError):
            charset = charset[2]
    if not isinstance(charset, str) or not charset.isascii():
        return None
    return charset.lower()


def _walk(root: Message, limits: EmailLimits, linesep: str) -> _Body:
    """Collect text, HTML and attachments with an explicit stack (no recursion, bounded)."""
    body = _Body()
    # The root's charset is read once, for both uses.
    root_charset = _charset_param(root)
    hint = _content_charset(root_charset) or None
    # (part, depth, content: its text is ours to read, resource: a non-root member of a
    # multipart/related, which RFC 2387 makes a resource of the root, not body text, path: the
    # multiparts above it, for _render)
    stack: list[tuple[Message, int, bool, bool, _Path]] = [(root, 0, True, False, ())]
    while stack:
        part, depth, content, resource, path = stack.pop()
        body.parts += 1
        if body.parts > limits.max_parts:
            raise NormalizationError(f"more than {limits.max_parts} MIME parts")
        if depth > limits.max_depth:
            raise NormalizationError(f"MIME nesting deeper than {limits.max_depth} levels")
        _check_headers(part, limits)
        ctype = _content_type(part)
        payload = part.get_payload()
        if part.is_multipart() and isinstance(payload, list):
            children = [p for p in payload if isinstance(p, Message)]
            if ctype in {"message/rfc822", "message/global"}:
                if content:
                    name = headers.filename(part, hint=hint)
                    inline = str(part.get("Content-Disposition", "")).lower().startswith("inline")
                    body.attachments.append(
                        Attachment(
                            name=_attachment_name(
                                part, ctype, name, hint, {a.name for a in body.attachments}
                            ),
                            content_type=ctype,
                            data=_serialize(children[0], linesep) if children else b"",
                            inline=inline and name is None,
                        )
                    )
                # The forwarded mail is bounded and checked, but its content is not ours to read.
                stack.extend((child, depth + 1, False, False, ()) for child in reversed(children))
                continue
            if ctype == "message/delivery-status":
                children = []
            root_index = _related_root(part, children) if ctype == "multipart/related" else -1
            inner = (*path, (body.parts, ctype == "multipart/alternative"))
            stack.extend(
                (child, depth + 1, content, root_index >= 0 and index != root_index, inner)
                for index, child in reversed(list(enumerate(children)))
            )
            if ctype != "message/delivery-status":
                continue
        if not content:
            continue
        name = headers.filename(part, hint=hint)
        charset = root_charset if part is root else _charset_param(part)
        declared = charset if isinstance(charset, str) else None
        if ctype == "message/delivery-status" and isinstance(payload, list):
            # The parser split the report into header blocks; the part's own body is what was sent.
            serialized = _serialize(part, linesep)
            data = serialized.split((linesep * 2).encode(), 1)[-1]
        else:
            data = _payload_bytes(part, body, limits)
        if ctype.startswith("multipart/"):
            ctype = "text/plain"  # a multipart without any part: its text is the body (mail071, mail105)
        if ctype in {"text/plain", "text/html"} and not resource and not _is_attachment(part, name):
            decoded = decode(data, declared, hint=hint)
            if decoded.lossy:
                body.lossy.append(f"{ctype} as {decoded.charset}")
            body.charsets.append(decoded.charset)
            body.texts.append(_TextPart(html=ctype == "text/html", text=decoded.text, path=path))
            if hint is None and declared:
                hint = declared
            continue
        content_id = part.get("Content-ID")
        cid = autoreply.message_id([str(content_id)]) if content_id is not None else None
        if cid is None and content_id is not None:
            cid = headers.unfold(str(content_id)).strip().strip("<>") or None
        disposition = str(part.get("Content-Disposition", "")).split(";")[0].strip().lower()
        body.attachments.append(
            Attachment(
                name=_attachment_name(part, ctype, name, hint, {a.name for a in body.attachments}),
                content_type=ctype,
                data=data,
                inline=disposition == "inline" or (disposition != "attachment" and cid is not None),
                content_id=cid,
            )
        )
    return body


@functools.lru_cache(maxsize=32)
def _ticket_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"invalid ticket reference pattern: {exc}", key="ticket_ref_pattern") from exc


def _thread_ref(subject: str | None, meta: Mapping[str, Any]) -> str | None:
    if not subject:
        return None
    match = _ticket_pattern(str(meta.get("ticket_ref_pattern") or DEFAULT_TICKET_REF)).search(subject)
    if match is None:
        return None
    number = match.groupdict().get("number") or (match.group(1) if match.re.groups else match.group(0))
    return f"ticket:{number}"


def _sent_at(values: list[str]) -> datetime | None:
    if not values:
        return None
    try:
        moment = parsedate_to_datetime(headers.unfold(values[0]).strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _synthetic_id(raw: bytes, date: list[str], sender: list[str], subject: list[str]) -> str:
    """A stable id for a mail without Message-ID: the same mail delivered twice gets the same id.

    Relays prepend Received headers and may rewrite line endings, so only Date, From, Subject and
    the body (with CRLF normalized) go into it.
    """
    split = raw.find(b"\r\n\r\n")
    split = raw.find(b"\n\n") if split < 0 else split
    raw_body = raw[split:] if split >= 0 else b""
    digest = hashlib.sha256()
    for value in (*date[:1], *sender[:1], *subject[:1]):
        digest.update(headers.unfold(value).strip().encode("utf-8", "surrogateescape"))
        digest.update(b"\x00")
    digest.update(raw_body.replace(b"\r\n", b"\n").rstrip())
    return f"synthetic-{digest.hexdigest()[:40]}@ticketgate.invalid"


def _normalize(envelope: RawEnvelope, limits: EmailLimits) -> CanonicalMessage:
    raw = envelope.body
    meta = envelope.meta
    if len(raw) > limits.max_bytes:
        raise NormalizationError(f"mail is {len(raw)} bytes, limit {limits.max_bytes}")
    _prescan(raw, limits)
    repaired, repairs = _repair_header_block(raw)
    message = _parse(repaired)
    _check_headers(message, limits)
    linesep = "\r\n" if b"\r\n" in raw[:4096] else "\n"
    body = _walk(message, limits, linesep)

    # The top-level headers are read some twenty times: index them once.
    index = headers.index(message)

    def raw_values(name: str) -> list[str]:
        return list(index.get(name.lower(), ()))

    own = raw_values(REPLY_HEADER)
    if own:
        reply_id = headers.unfold(own[0]).strip()[:100]
        raise NormalizationError(f"loop: ticketgate's own reply {reply_id} came back; not a customer's mail")

    hint = next((c for c in body.charsets if c not in {"ascii", "utf-8"}), None)
    subject_values = raw_values("Subject")
    subject = headers.decode_text(subject_values[0], hint=hint) if subject_values else None
    if subject is not None:
        subject = subject.replace("\t", " ").strip("\r\n")
    sender = parse_sender(raw_values("From"), hint=hint)
    flags = list(sender.flags)
    address, name = sender.address, sender.name
    source: str | None = "from" if address is not None else None
    if address is None:
        fallback = _fallback_sender(raw_values, meta, hint)
        if fallback is not None:
            source, found = fallback
            address, name = found.address, name or found.name or None
            flags.append("from_fallback")
        else:
            flags.append("no_usable_sender")  # nobody to answer: the desk sees why
    verified = address == sender.address and sender_verified(sender, _mapping(meta.get("authentication")))

    plain_source, html_source = _render(body.texts, limits.max_text_chars)
    # One line-ending convention for consumers; the raw bytes keep the original.
    text = plain_source.replace("\r\n", "\n") if plain_source is not None else None
    # Sanitized, like every channel's HTML, by normalizers.content.finish after normalizing.
    html = html_source[: limits.max_text_chars] if html_source else None
    text_from_html = html_source is not None and _html_gives_text(text, body)
    if html_source is not None and text_from_html:
        text = html_to_text(html_source[: limits.max_text_chars])
    if text is not None:
        text = text[: limits.max_text_chars]
    reply_text = extract_reply(text) if text else None

    is_dsn = autoreply.is_delivery_report(message)
    dsn: dict[str, object] = {}
    bounced_id: str | None = None
    if is_dsn:
        dsn, bounced_id = autoreply.parse_dsn(message)
    mail_from = meta.get("mail_from")
    return_path = raw_values("Return-Path")
    return_path_empty = mail_from == "" or (
        bool(return_path) and headers.unfold(return_path[-1]).strip() in {"<>", ""}
    )
    auto = autoreply.auto_generated(
        raw_values,
        subject=subject,
        sender=address,
        return_path_empty=return_path_empty,
        loop_marker=str(meta.get("loop_marker") or DEFAULT_LOOP_MARKER),
        is_dsn=is_dsn,
    )
    if auto is not None and auto[0] == "bounce" and bounced_id is None:
        # A non-standard bounce that still carries the original mail.
        for attachment in body.attachments:
            if attachment.content_type == "message/rfc822":
                inner = BytesParser(policy=compat32).parsebytes(attachment.data, headersonly=True)
                bounced_id = autoreply.message_id(headers.raw_values(inner, "Message-ID"))
                break

    message_id = autoreply.message_id(raw_values("Message-ID"))
    in_reply_to = bounced_id or autoreply.message_id(raw_values("In-Reply-To"))
    extra: dict[str, Any] = {
        "to": [a.address for a in parse_addresses(raw_values("To"), hint=hint)],
        "cc": [a.address for a in parse_addresses(raw_values("Cc"), hint=hint)],
    }
    reply_to = parse_addresses(raw_values("Reply-To"), hint=hint)
    if reply_to:
        extra["reply_to"] = [a.address for a in reply_to]
    if flags:
        extra["sender_flags"] = flags
    if source is not None and source != "from":
        extra["sender_source"] = source  # which header (or the envelope) the claimed sender is from
    if message_id is None:
        extra["synthetic_message_id"] = True
    if mail_from is not None:
        extra["mail_from"] = str(mail_from)
    if meta.get("rcpt_to"):
        extra["rcpt_to"] = [str(r) for r in meta["rcpt_to"]]
    if repairs:
        extra["header_lines_repaired"] = repairs
    if body.lossy:
        extra["lossy_decoding"] = body.lossy
    if text_from_html and any(not t.html for t in body.texts):
        extra["text_source"] = "html"  # the plain alternative was there but blank or lossy
    if body.defects:
        extra["mime_defects"] = sorted(set(body.defects))
    if auto is not None:
        extra["auto_generated_by"] = auto[1]
    if dsn:
        extra["dsn"] = dsn
    return CanonicalMessage(
        channel=envelope.channel,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=message_id or _synthetic_id(raw, raw_values("Date"), raw_values("From"), subject_values),
        received_at=envelope.received_at,
        sent_at=_sent_at(raw_values("Date")),
        identities=(Identity(kind=IdentityKind.EMAIL, value=address, verified=verified),) if address else (),
        display_name=name,
        subject=subject,
        text=text,
        html=html,
        reply_text=reply_text,
        attachments=tuple(body.attachments),
        in_reply_to=in_reply_to,
        references=autoreply.message_ids(raw_values("References")),
        thread_ref=_thread_ref(subject, meta),
        auto_generated=auto[0] if auto else None,
        extra=extra,
    )


_Rendered = tuple[str | None, str | None]  # (plain text, HTML)


def _render(parts: list[_TextPart], limit: int, level: int = 0, alternative: bool = False) -> _Rendered:
    """The (plain, html) body of ``parts``, which share their first ``level`` multipart ancestors.

    The children of a multipart/alternative are one message written twice: the plain text is the
    first child's that has plain text, the HTML the last child's that has HTML (RFC 2046 5.1.4: the
    last is the richest). The children of any other multipart (mixed, related, ...) follow one
    another: a server's plain disclaimer after an HTML body, or plain, HTML, plain. When both kinds
    are among them, each child gives both: HTML as text for the plain side, plain text escaped into
    the HTML side, in order; otherwise the parts of the one kind are joined as they are.
    """
    rendered: list[_Rendered] = []
    index = 0
    while index < len(parts):
        part = parts[index]
        if len(part.path) <= level:  # a text part of this multipart itself
            rendered.append((None, part.text) if part.html else (part.text, None))
            index += 1
            continue
        # A child multipart: its parts are consecutive (the walk is in document order).
        serial, is_alternative = part.path[level]
        end = index + 1
        while end < len(parts) and len(parts[end].path) > level and parts[end].path[level][0] == serial:
            end += 1
        rendered.append(_render(parts[index:end], limit, level + 1, is_alternative))
        index = end
    plains = [plain for plain, _ in rendered if plain is not None]
    htmls = [html for _, html in rendered if html is not None]
    if alternative:
        return (plains[0] if plains else None, htmls[-1] if htmls else None)
    if not plains or not htmls:
        return ("\n".join(plains) if plains else None, "\n".join(htmls) if htmls else None)
    return (
        "\n".join(p if p is not None else html_to_text((h or "")[:limit]) for p, h in rendered),
        "\n".join(h if h is not None else f"<pre>{escape(p or '')}</pre>" for p, h in rendered),
    )


def _fallback_sender(
    raw_values: Callable[[str], list[str]], meta: Mapping[str, Any], hint: str | None
) -> tuple[str, Address] | None:
    """A *claimed* sender for a mail without a usable From, and where it came from.

    In order: the Sender and Reply-To headers, then the envelope sender. Over SMTP that is MAIL
    FROM (``meta["mail_from"]``; none for the null reverse path ``<>``), and a Return-Path header
    is ignored: the final MTA writes it, which is us, so one in the data is the client's claim about
    an envelope we saw ourselves. Read from a mailbox (no ``mail_from``), Return-Path is what the
    delivering MTA wrote: the envelope sender. Only valid addresses count (no encoded words).
    """
    candidates: list[tuple[str, list[str]]] = [
        ("sender", raw_values("Sender")),
        ("reply_to", raw_values("Reply-To")),
    ]
    mail_from = meta.get("mail_from")
    if mail_from is None:
        candidates.append(("return_path", raw_values("Return-Path")))
    elif mail_from:
        candidates.append(("mail_from", [str(mail_from)]))
    for source, values in candidates:
        found = parse_addresses(values, hint=hint)
        if found:
            return source, found[0]
    return None


def _html_gives_text(plain: str | None, body: _Body) -> bool:
    """Whether ``text`` comes from the HTML alternative rather than the plain parts.

    The plain alternative is the sender's own text and is preferred. The HTML one replaces it only
    when the plain text is missing or blank, or when some plain part could only be decoded lossily
    (U+FFFD in place of the sender's characters) while every HTML part decoded cleanly: then the
    HTML is the only faithful copy of what was written. A plain part that merely says less than the
    HTML (a forward, a shortened alternative) is still the sender's choice and stays.
    """
    if plain is None or not plain.strip():
        return True
    lossy_plain = any(entry.startswith("text/plain ") for entry in body.lossy)
    lossy_html = any(entry.startswith("text/html ") for entry in body.lossy)
    return lossy_plain and not lossy_html


def _mapping(value: object) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


normalize_email: Normalizer = make_email_normalizer(EmailLimits())

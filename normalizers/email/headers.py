"""Header text: RFC 2047 encoded words, raw 8-bit headers, RFC 2231 parameters.

The parser runs with ``compat32`` (see ``parse.py`` for why), so header values arrive as raw strings
in which 8-bit bytes are carried as surrogate escapes. Everything here is tolerant: real mail puts
encoded words inside quoted strings, splits one multi-byte character over two encoded words and
declares charsets that lie.
"""

from __future__ import annotations

import base64
import binascii
import re
from email.message import Message

from normalizers.email.charsets import SINGLE_BYTE, codec_for, decode, decode_unlabeled_cjk

# Payloads may contain spaces: broken clients put them inside Q words ("=?UTF-8?Q? Personal=C3=A4?=").
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?]*?)\?=")
_BETWEEN_WORDS = re.compile(r"[ \t\r\n]*")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def to_bytes(raw: str) -> bytes:
    """The original bytes of a compat32 header string (surrogate escapes back to 8-bit bytes)."""
    return raw.encode("latin-1", errors="surrogateescape")


def latin(raw: str) -> str:
    """A raw compat32 value with its 8-bit bytes as U+0080..U+00FF instead of surrogates.

    compat32 turns a value with surrogates into a lossy ``Header`` object on every ``get``; values
    in this form pass through untouched, and :func:`to_bytes` still gives the original bytes back.
    """
    return raw if raw.isascii() else to_bytes(raw).decode("latin-1")


def raw_values(part: Message, name: str) -> list[str]:
    """Every raw value of header ``name`` in ``part``, in order, without any decoding."""
    wanted = name.lower()
    return [latin(str(value)) for key, value in part.raw_items() if key.lower() == wanted]


def index(part: Message) -> dict[str, list[str]]:
    """Every raw header value of ``part`` by lowercased name, in order: one pass for many lookups
    (``index(part).get(name.lower(), [])`` is ``raw_values(part, name)``)."""
    found: dict[str, list[str]] = {}
    for key, value in part.raw_items():
        found.setdefault(key.lower(), []).append(latin(str(value)))
    return found


def unfold(raw: str) -> str:
    return _FOLD.sub("", raw).replace("\r", "").replace("\n", "")


def _word_bytes(encoding: str, payload: str) -> bytes | None:
    if encoding in "qQ":
        data = payload.replace("_", " ").encode("latin-1", errors="surrogateescape")
        return binascii.a2b_qp(data)
    padded = payload + "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(padded)
    except (binascii.Error, ValueError):
        try:  # a stray character: keep what decodes rather than dropping the word
            return base64.b64decode(re.sub(r"[^A-Za-z0-9+/]", "", payload) + "==", validate=False)
        except (binascii.Error, ValueError):
            return None


def decode_text(raw: str, *, hint: str | None = None) -> str:
    """Decode an unstructured header (Subject, display names): encoded words and raw 8-bit text.

    Adjacent encoded words in the same charset are joined *before* decoding, because clients split
    multi-byte characters across them. ``hint`` is the charset the body declared (used for raw 8-bit).
    """
    # Whitespace around the value is folding, not text (RFC 5322 3.2.2). compat32 drops it only
    # after the colon on the header's own line, so a value folded right after the colon
    # ("Subject:\r\n =?utf-8?B?...") kept a leading space, and one before the line end stayed too.
    # Whitespace inside an encoded word is the sender's text and is kept.
    text = unfold(raw).strip(" \t")
    out: list[str] = []
    pos = 0
    pending: tuple[str, bytearray] | None = None

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            out.append(decode(bytes(pending[1]), pending[0], hint=hint).text)
            pending = None

    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        data = _word_bytes(match.group(2), match.group(3))
        if data is None:
            continue
        if gap and not (pending is not None and _BETWEEN_WORDS.fullmatch(gap)):
            flush()
            out.append(_raw_text(gap, hint))
        charset = match.group(1).lower()
        if pending is not None and pending[0] != charset:
            flush()
        if pending is None:
            pending = (charset, bytearray())
        pending[1].extend(data)
        pos = match.end()
    flush()
    out.append(_raw_text(text[pos:], hint))
    return "".join(out)


def _raw_text(segment: str, hint: str | None) -> str:
    if segment.isascii():
        # Raw ISO-2022-JP (and -KR, -CN) text is 7-bit: only its escape sequences tell.
        return segment if "\x1b" not in segment else decode(segment.encode("ascii")).text
    # 8-bit bytes in a header: RFC 6532 UTF-8, a Chinese client's raw GBK, or Latin. A multi-byte
    # charset the mail declares is used as it is. Otherwise (no charset in the mail, or a single-byte
    # one, which says nothing about a CJK header) the legacy CJK charsets are tried in a fixed order
    # with strictness checks (see charsets.py); when none passes, the text is Latin: the mail's
    # single-byte charset, else windows-1252 (the WHATWG default for unlabeled legacy text).
    # Statistical detection is not used here: on a dozen bytes it guesses UTF-16 for "José".
    data = to_bytes(segment)
    hinted = codec_for(hint)
    if hinted is None or hinted in SINGLE_BYTE:
        guessed = decode_unlabeled_cjk(data)
        if guessed is not None:
            return guessed.text
        return decode(data, hinted or "cp1252").text
    return decode(data, None, hint=hint).text


def param(part: Message, name: str, header: str, *, hint: str | None = None) -> str | None:
    """A decoded MIME parameter (RFC 2231 continuations and charsets, or RFC 2047 inside quotes)."""
    values = raw_values(part, header)
    if not values or name.lower() not in values[0].lower():
        return None  # the parameter is not there (the common case: no file name on a text part)
    holder = Message()
    holder[header] = values[0]
    try:
        value = holder.get_param(name, header=header)
    except (ValueError, IndexError, LookupError):
        return None
    if value is None or value == "":
        return None
    if isinstance(value, tuple):
        charset, _language, text = value
        data = to_bytes(text) if isinstance(text, str) else bytes(text)
        codec = codec_for(charset) if charset else None
        result = decode(data, codec or charset or None, hint=hint).text
    else:
        result = decode_text(value, hint=hint)
    return result.strip().strip('"').strip() or None


def filename(part: Message, *, hint: str | None = None) -> str | None:
    """The attachment name: Content-Disposition filename, else Content-Type name."""
    return param(part, "filename", "content-disposition", hint=hint) or param(
        part, "name", "content-type", hint=hint
    )

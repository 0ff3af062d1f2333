"""What every channel's message gets after its normalizer: one sanitizer, one HTML-to-text, one
language guess, and one strict base64 decoder for attachments sent inline.

The pipeline runs :func:`normalized` in place of a bare normalizer call (in the gateway process and in
the normalizer process alike), so no channel can publish unsanitized HTML or an HTML-only message
without ``text``, and none needs its own copy of these rules. Normalizers hand over the HTML as
received; they may set ``text`` (email picks its plain alternative) and ``language`` (the web form's
Accept-Language), which are kept.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import Any

from core.model import CanonicalMessage, RawEnvelope, replace
from normalizers import html as html_body
from normalizers import language


def finish(message: CanonicalMessage) -> CanonicalMessage:
    """``message`` with its HTML sanitized, ``text`` from the HTML when it has none, and a language."""
    changes = finishing(message)
    return replace(message, **changes) if changes else message


def finishing(message: CanonicalMessage) -> dict[str, Any]:
    """What :func:`finish` changes in ``message``, as keywords for ``replace`` (empty: nothing), so
    that a step changing more fields after it (the enricher) copies the message once."""
    html = html_body.sanitize(message.html) if message.html else None
    text = message.text
    if not text and html:
        text = html_body.to_text(html) or None
    guessed = message.language or language.detect(message.reply_text or text or message.subject or "")
    if (html, text, guessed) == (message.html, message.text, message.language):
        return {}
    return {"html": html, "text": text, "language": guessed}


def normalized(
    normalize: Callable[[RawEnvelope], Iterable[CanonicalMessage]], envelope: RawEnvelope
) -> list[CanonicalMessage]:
    """``normalize(envelope)``, each message finished: the one way the pipeline calls a normalizer."""
    return [finish(message) for message in normalize(envelope)]


def decode_base64(value: str) -> bytes:
    """Standard, padded base64 and nothing else; ``ValueError`` for anything that is not.

    ``b64decode(validate=True)`` still takes surplus padding (``YWJj==``) and non-zero bits after
    the last byte (``YR==`` reads as ``a``), so what it returns may not be what was sent. Encoding
    the result again must give the input back.
    """
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if base64.b64encode(data) != value.encode("ascii"):
        raise ValueError("not valid base64 (padding or trailing bits)")
    return data

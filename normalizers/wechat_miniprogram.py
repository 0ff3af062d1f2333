"""WeChat Mini Program customer-service messages (小程序客服消息) -> canonical messages (pure).

A Mini Program's message push comes as XML or as JSON, as chosen in its console (数据格式); the
fields are the same in both (https://developers.weixin.qq.com/miniprogram/dev/framework/open-ability/
customer-message/receive.html): text, image, miniprogrampage and the ``user_enter_tempsession``
event. The connector puts the verified (and decrypted) document in ``envelope.meta["plaintext"]``;
both formats become the same field mapping and go through the Official Account's
:func:`normalizers.wechat.message_from_fields`, so ids, dedupe keys (``MsgId``; events
``FromUserName`` + ``CreateTime``), identities (``{appid}:{openid}``, and the unionid when the push
carries one) and extras are the Official Account's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import orjson

from core.errors import InvalidInput, NormalizationError, TooLarge
from core.model import CanonicalMessage, RawEnvelope
from normalizers.wechat import DEFAULT_MAX_XML_BYTES, MAX_DEPTH, message_from_fields, parse_callback_xml

CHANNEL = "miniprogram"


def parse_callback_json(data: str | bytes, *, max_bytes: int = DEFAULT_MAX_XML_BYTES) -> dict[str, Any]:
    """A JSON callback document as the field mapping :func:`parse_callback_xml` gives for XML.

    Scalars become strings (``CreateTime`` and the 64-bit ``MsgId`` arrive as numbers); objects
    nest at most ``MAX_DEPTH`` deep. Raises :class:`TooLarge` past ``max_bytes`` (before parsing) and
    :class:`InvalidInput` for anything but a JSON object (orjson itself stops at 1024 levels)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise TooLarge(f"JSON of {len(raw)} bytes exceeds {max_bytes}")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise InvalidInput("the callback is not a JSON object")
    fields = _scalars(value, 0)
    return fields if isinstance(fields, dict) else {}


def _scalars(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise InvalidInput("JSON nested too deeply")
    if isinstance(value, dict):
        return {str(k): _scalars(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_scalars(v, depth + 1) for v in value]
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return value if isinstance(value, str) else str(value)


def looks_like_json(data: str | bytes) -> bool:
    """Whether a callback document is JSON (else XML): the first non-blank character tells."""
    head = (data.encode("utf-8") if isinstance(data, str) else data)[:64].lstrip()
    return head[:1] == b"{"


def parse_document(data: str | bytes, *, max_bytes: int = DEFAULT_MAX_XML_BYTES) -> dict[str, Any]:
    """A Mini Program callback document, JSON or XML (XML with DTDs and entities refused)."""
    if looks_like_json(data):
        return parse_callback_json(data, max_bytes=max_bytes)
    return parse_callback_xml(data, max_bytes=max_bytes)


def normalize(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """Normalize one verified (decrypted) Mini Program push."""
    plaintext = envelope.meta.get("plaintext")
    if not isinstance(plaintext, str | bytes):
        raise NormalizationError("envelope has no decrypted plaintext in meta['plaintext']")
    max_bytes = int(envelope.meta.get("max_xml_bytes", DEFAULT_MAX_XML_BYTES))
    fields = parse_document(plaintext, max_bytes=max_bytes)
    raw = plaintext if isinstance(plaintext, str) else plaintext.decode("utf-8", "replace")
    message = message_from_fields(envelope, fields, raw)
    fmt = "json" if looks_like_json(plaintext) else "xml"
    return [dataclasses.replace(message, extra={**message.extra, "format": fmt})]


normalize_miniprogram = normalize

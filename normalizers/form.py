"""Web-form submissions -> one canonical message (pure).

Accepts ``application/x-www-form-urlencoded``, ``multipart/form-data`` and ``application/json``
bodies. The connector parses with the same functions before ingesting, so a submission the customer
must fix is answered with the form and its errors and nothing is stored; the normalizer raises
:class:`InvalidInput` again for defence (e.g. a replay).

Form submissions carry no provider id: ``external_id`` is ``None`` and idempotency falls back to a
content hash, so a double-submitted form is one ticket.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any
from urllib.parse import parse_qsl

import orjson
import phonenumbers

from core.errors import InvalidInput, TooLarge
from core.model import Attachment, CanonicalMessage, Identity, IdentityKind, RawEnvelope
from normalizers.content import decode_base64

CHANNEL = "form"
HONEYPOT_FIELD = "website"
STANDARD_FIELDS = ("name", "email", "phone", "subject", "message")
# Bounds the parser enforces whatever the connector is configured with; they protect the parser itself.
MAX_PARTS = 64
MAX_FIELDS = 64
MAX_PART_HEADER_BYTES = 8 * 1024
MAX_EXTRA_FIELDS = 20
MAX_LENGTHS: Mapping[str, int] = {"name": 200, "email": 254, "phone": 40, "subject": 300, "message": 50_000}
MAX_EXTRA_LENGTH = 2_000
DEFAULT_PHONE_REGION = "CN"

_EMAIL = re.compile(r"^[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+\.[^@\s<>()\[\],;:\"]+$")
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\]]{1,64}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class FormSubmission:
    """A parsed submission: text fields (first value wins) and uploaded files in order."""

    fields: Mapping[str, str] = field(default_factory=dict)
    attachments: tuple[Attachment, ...] = ()

    def get(self, name: str) -> str:
        return self.fields.get(name, "").strip()

    @property
    def is_bot(self) -> bool:
        """The honeypot is hidden from people; only a bot fills it in."""
        return bool(self.get(HONEYPOT_FIELD))


@dataclass(frozen=True, slots=True, kw_only=True)
class Contact:
    email: str | None
    phone: str | None  # E.164
    phone_raw: str | None  # what was typed, when it did not parse as a phone number


def _media_params(content_type: str) -> tuple[str, Message]:
    # The stdlib parses RFC 2045 / 2231 parameters (quoting, filename*=) correctly; reuse it.
    header = Message()
    header["Content-Type"] = content_type
    return header.get_content_type(), header


def _charset(message: Message) -> str:
    name = message.get_param("charset")
    charset = collapse_rfc2231_value(name) if name else "utf-8"
    try:
        return codecs.lookup(charset).name
    except LookupError:
        raise InvalidInput(f"unknown charset {charset!r}", status=415) from None


def _decode(raw: bytes, charset: str, what: str) -> str:
    try:
        return raw.decode(charset)
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} is not valid {charset}") from None


def _add_field(fields: dict[str, str], name: str, value: str) -> None:
    if len(fields) >= MAX_FIELDS and name not in fields:
        raise TooLarge(f"more than {MAX_FIELDS} form fields")
    fields.setdefault(name, value)


def _safe_filename(name: str) -> str:
    # Browsers escape '"' as %22 and line breaks as %0D/%0A (WHATWG multipart/form-data); drop the breaks.
    name = name.replace("%22", '"').replace("%0D", "").replace("%0A", "")
    # Old browsers send a full client path (C:\fakepath\x.png); keep the last component only.
    base = re.split(r"[\\/]", name)[-1].strip().replace("\x00", "")
    return base[:255] or "attachment"


def _parse_multipart(body: bytes, boundary: str) -> FormSubmission:
    if not boundary or len(boundary) > 70:
        raise InvalidInput("multipart body without a valid boundary")
    delimiter = b"--" + boundary.encode("ascii", "strict")
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise InvalidInput("multipart body without its boundary")
        position = start + 2 + len(delimiter)
    fields: dict[str, str] = {}
    attachments: list[Attachment] = []
    parts = 0
    closing = b"\r\n" + delimiter
    while True:
        if body.startswith(b"--", position):
            break  # the closing delimiter; anything after it is epilogue
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise InvalidInput("malformed multipart delimiter line")
        parts += 1
        if parts > MAX_PARTS:
            raise TooLarge(f"more than {MAX_PARTS} multipart parts")
        header_start = line_end + 2
        header_end = body.find(b"\r\n\r\n", header_start, header_start + MAX_PART_HEADER_BYTES + 4)
        if header_end < 0:
            # A part with no headers at all starts with the blank line directly.
            if body.startswith(b"\r\n", header_start):
                header_end = header_start - 2
            else:
                raise InvalidInput("multipart part headers are malformed or too long")
        content_start = header_end + 4
        content_end = body.find(closing, content_start)
        if content_end < 0:
            raise InvalidInput("multipart body is truncated (no closing boundary)")
        _add_part(body[header_start:header_end], body[content_start:content_end], fields, attachments)
        position = content_end + len(closing)
    return FormSubmission(fields=fields, attachments=tuple(attachments))


def _add_part(
    raw_headers: bytes, content: bytes, fields: dict[str, str], attachments: list[Attachment]
) -> None:
    headers = Message()
    # Browsers send non-ASCII filenames as raw UTF-8 inside the quotes.
    for line in raw_headers.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    if headers.get_content_disposition() != "form-data":
        raise InvalidInput("multipart part without Content-Disposition: form-data")
    name_param = headers.get_param("name", header="content-disposition")
    if not name_param:
        raise InvalidInput("multipart part without a field name")
    name = collapse_rfc2231_value(name_param)
    filename = headers.get_filename()
    if filename is None:
        _add_field(fields, name, _decode(content, _charset(headers), f"field {name!r}"))
        return
    if not filename and not content:
        return  # a file input the person left empty
    content_type = headers.get_content_type() if "content-type" in headers else "application/octet-stream"
    attachments.append(Attachment(name=_safe_filename(filename), content_type=content_type, data=content))


def _parse_json(body: bytes) -> FormSubmission:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the JSON body must be an object")
    fields: dict[str, str] = {}
    attachments: list[Attachment] = []
    for name, value in data.items():
        if name == "attachments":
            attachments.extend(_json_attachments(value))
        elif isinstance(value, str):
            _add_field(fields, name, value)
        elif value is not None:
            raise InvalidInput(f"field {name!r} must be a string")
    return FormSubmission(fields=fields, attachments=tuple(attachments))


def _json_attachments(value: Any) -> list[Attachment]:
    if not isinstance(value, list):
        raise InvalidInput("field 'attachments' must be a list")
    if len(value) > MAX_PARTS:
        raise TooLarge(f"more than {MAX_PARTS} attachments")
    found = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("data_base64"), str):
            raise InvalidInput(f"attachments[{index}] needs name, content_type and data_base64")
        try:
            data = decode_base64(item["data_base64"])
        except ValueError:
            raise InvalidInput(f"attachments[{index}].data_base64 is not valid base64") from None
        found.append(Attachment(
            name=_safe_filename(str(item.get("name") or "")),
            content_type=str(item.get("content_type") or "application/octet-stream"),
            data=data,
        ))
    return found


def parse_form(body: bytes, content_type: str | None) -> FormSubmission:
    """Parse a submission body; ``InvalidInput`` (415 for an unsupported type) when it cannot be read."""
    media_type, params = _media_params(content_type or "")
    if media_type == "application/x-www-form-urlencoded":
        text = _decode(body, _charset(params), "the form body")
        # parse_qsl's own bound raises a ValueError like malformed data does; too many fields is
        # too large, as it is for multipart (counted as parse_qsl counts: one more than the '&'s).
        if text.count("&") >= MAX_FIELDS:
            raise TooLarge(f"more than {MAX_FIELDS} form fields")
        try:
            pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict")
        except ValueError as exc:
            raise InvalidInput(f"the form body is malformed: {exc}") from None
        fields: dict[str, str] = {}
        for name, value in pairs:
            _add_field(fields, name, value)
        return FormSubmission(fields=fields)
    if media_type == "multipart/form-data":
        boundary = params.get_param("boundary")
        return _parse_multipart(body, collapse_rfc2231_value(boundary) if boundary else "")
    if media_type == "application/json":
        return _parse_json(body)
    raise InvalidInput(f"unsupported content type {media_type!r}", status=415)


def parse_contact(submission: FormSubmission, *, region: str = DEFAULT_PHONE_REGION) -> Contact:
    email = submission.get("email").lower() or None
    raw_phone = submission.get("phone") or None
    phone = None
    if raw_phone is not None:
        try:
            number = phonenumbers.parse(raw_phone, region)
        except phonenumbers.NumberParseException:
            number = None
        if number is not None and phonenumbers.is_possible_number(number):
            phone = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return Contact(email=email, phone=phone, phone_raw=raw_phone if phone is None else None)


def field_errors(submission: FormSubmission, *, region: str = DEFAULT_PHONE_REGION) -> dict[str, str]:
    """Field name -> error code (``required``, ``invalid``, ``too_long``, ``contact_required``)."""
    errors: dict[str, str] = {}
    for name, limit in MAX_LENGTHS.items():
        if len(submission.get(name)) > limit:
            errors[name] = "too_long"
    if not submission.get("message"):
        errors["message"] = "required"
    email = submission.get("email")
    if email and "email" not in errors and not _EMAIL.match(email):
        errors["email"] = "invalid"
    contact = parse_contact(submission, region=region)
    if contact.phone_raw is not None and "phone" not in errors and contact.email is None:
        errors["phone"] = "invalid"  # an unusable phone only matters when it is the only contact
    if not email and not submission.get("phone"):
        errors["contact"] = "contact_required"
    return errors


def describe_errors(errors: Mapping[str, str]) -> str:
    """A reason naming each field, for logs and JSON answers: ``message: required; email: invalid``."""
    return "; ".join(f"{name}: {code}" for name, code in errors.items())


def _extra_fields(submission: FormSubmission) -> dict[str, str]:
    skip = {*STANDARD_FIELDS, HONEYPOT_FIELD}
    extra: dict[str, str] = {}
    for name, value in submission.fields.items():
        if name in skip or not _FIELD_NAME.match(name) or not value.strip():
            continue
        if len(extra) >= MAX_EXTRA_FIELDS:
            break
        extra[name] = value.strip()[:MAX_EXTRA_LENGTH]
    return extra


def _text(value: str) -> str | None:
    value = value.replace("\r\n", "\n").replace("\r", "\n").strip()
    return value or None


def to_message(envelope: RawEnvelope, submission: FormSubmission) -> CanonicalMessage:
    """Build the canonical message from a valid submission (see :func:`field_errors`)."""
    region = str(envelope.meta.get("phone_region") or DEFAULT_PHONE_REGION)
    contact = parse_contact(submission, region=region)
    identities = []
    if contact.email:
        identities.append(Identity(kind=IdentityKind.EMAIL, value=contact.email, verified=False))
    if contact.phone:
        identities.append(Identity(kind=IdentityKind.PHONE, value=contact.phone, verified=False))
    extra: dict[str, Any] = {}
    if contact.phone_raw:
        extra["phone_raw"] = contact.phone_raw
    if fields := _extra_fields(submission):
        extra["fields"] = fields
    return CanonicalMessage(
        channel=CHANNEL,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=None,
        received_at=envelope.received_at,
        identities=tuple(identities),
        display_name=_text(submission.get("name")),
        subject=_text(submission.get("subject")),
        text=_text(submission.get("message")),
        language=_language(envelope.meta.get("accept_language")),
        attachments=submission.attachments,
        extra=extra,
    )


def _language(accept_language: Any) -> str | None:
    """The first language the browser asks for: the customer's language, a hint for the desk's reply."""
    if not isinstance(accept_language, str):
        return None
    first = accept_language.split(",", 1)[0].split(";", 1)[0].strip()
    return first if re.fullmatch(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*", first) else None


def normalize_form(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """The form normalizer: a submission a bot made yields nothing; an invalid one raises ``InvalidInput``."""
    submission = parse_form(envelope.body, envelope.content_type)
    if submission.is_bot:
        return ()
    region = str(envelope.meta.get("phone_region") or DEFAULT_PHONE_REGION)
    errors = field_errors(submission, region=region)
    if errors:
        raise InvalidInput(describe_errors(errors))
    return (to_message(envelope, submission),)

"""Authenticated API submissions -> one canonical message (pure).

The body schema lives here (:class:`ApiMessage`) so that the connector validates with exactly the
model the normalizer maps: malformed input is refused before anything is stored, and the normalizer
raises :class:`InvalidInput` again for defence.

Identities: the caller is authenticated, but it asserts emails and phone numbers it may not have
verified itself (an app's sign-up form). They stay *claimed* unless the inbox is configured with
``trust_identities = true`` (the connector passes that as ``meta["trust_identities"]``), because
verified identities merge customers automatically and a wrong merge leaks one customer's thread to
another. The caller's own customer id is its own namespace, so it is always verified as ``{inbox}:{id}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, ClassVar, Literal, Self

import orjson
import phonenumbers
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import InvalidInput, validation_reason
from core.model import Attachment, CanonicalMessage, Identity, IdentityKind, RawEnvelope
from normalizers.content import decode_base64

CHANNEL = "api"
IDEMPOTENCY_HEADER = "idempotency-key"
MAX_ATTACHMENTS = 20
OFFLOAD_HTML_CHARS = 16_384  # longer HTML is finished in the normalizer process (~10 ms of loop time)
DEFAULT_PHONE_REGION = "CN"

Short = Annotated[str, Field(min_length=1, max_length=255)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class Customer(_Strict):
    email: Annotated[str, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None = None
    phone: Annotated[str, Field(max_length=40)] | None = None
    external_id: Short | None = None
    name: Annotated[str, Field(max_length=200)] | None = None

    @field_validator("phone")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        return None if value is None else to_e164(value)

    @model_validator(mode="after")
    def _reachable(self) -> Self:
        if not (self.email or self.phone or self.external_id):
            raise ValueError("give at least one of email, phone or external_id")
        return self


class ApiAttachment(_Strict):
    name: Short
    content_type: Annotated[str, Field(max_length=255, pattern=r"^[\w.+-]+/[\w.+-]+$")] = (
        "application/octet-stream"
    )
    data_base64: str

    def decoded(self) -> bytes:
        return decode_base64(self.data_base64)

    @property
    def size(self) -> int:
        """Decoded size without decoding (the data is validated, canonical base64)."""
        data = self.data_base64
        return len(data) * 3 // 4 - (len(data) - len(data.rstrip("=")))

    @field_validator("data_base64")
    @classmethod
    def _base64(cls, value: str) -> str:
        decode_base64(value)
        return value


class CallInfo(_Strict):
    direction: Literal["inbound", "outbound"]
    duration_seconds: Annotated[float, Field(ge=0)] | None = None
    from_number: Annotated[str, Field(max_length=40)] | None = None
    to_number: Annotated[str, Field(max_length=40)] | None = None
    recording_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = None


class ApiMessage(_Strict):
    """``POST /api/v1/messages`` body (documented in connectors/api/openapi.yaml)."""

    customer: Customer
    subject: Annotated[str, Field(max_length=300)] | None = None
    text: Annotated[str, Field(max_length=100_000)] | None = None
    html: Annotated[str, Field(max_length=500_000)] | None = None
    attachments: Annotated[tuple[ApiAttachment, ...], Field(max_length=MAX_ATTACHMENTS)] = ()
    sent_at: AwareDatetime | None = None
    external_id: Short | None = None
    kind: Literal["message", "call_record", "voicemail_transcript"] = "message"
    call: CallInfo | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.kind == "call_record" and self.call is None:
            raise ValueError("kind 'call_record' needs the call object")
        if self.kind != "call_record" and not (self.text or self.html):
            raise ValueError(f"kind {self.kind!r} needs text or html")
        return self


def to_e164(value: str, region: str = DEFAULT_PHONE_REGION) -> str:
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        raise ValueError("not a phone number") from None
    if not phonenumbers.is_possible_number(number):
        raise ValueError("not a possible phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def parse_api_message(body: bytes) -> ApiMessage:
    """Parse and validate; ``InvalidInput`` 400 for broken JSON, 422 naming the field for schema errors."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("the body is not valid JSON") from None
    try:
        return ApiMessage.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(validation_reason(exc.errors()), status=422) from None


def _call_extra(call: CallInfo) -> dict[str, Any]:
    return {"call": call.model_dump(exclude_none=True)}


def to_message(envelope: RawEnvelope, payload: ApiMessage) -> CanonicalMessage:
    trusted = envelope.meta.get("trust_identities") is True
    customer = payload.customer
    identities = []
    if customer.external_id:
        identities.append(Identity(
            kind=IdentityKind.EXTERNAL, value=f"{envelope.inbox}:{customer.external_id}", verified=True
        ))
    if customer.email:
        identities.append(Identity(kind=IdentityKind.EMAIL, value=customer.email.lower(), verified=trusted))
    if customer.phone:
        identities.append(Identity(kind=IdentityKind.PHONE, value=customer.phone, verified=trusted))
    return CanonicalMessage(
        channel=CHANNEL,
        tenant=envelope.tenant,
        inbox=envelope.inbox,
        external_id=payload.external_id,
        received_at=envelope.received_at,
        sent_at=payload.sent_at,
        kind=payload.kind,
        identities=tuple(identities),
        display_name=customer.name or None,
        subject=payload.subject or None,
        text=payload.text or None,
        html=payload.html or None,
        attachments=tuple(
            Attachment(name=a.name, content_type=a.content_type, data=a.decoded())
            for a in payload.attachments
        )
        if payload.attachments
        else (),
        extra=_call_extra(payload.call) if payload.call else {},
        dedupe_key=envelope.headers.get(IDEMPOTENCY_HEADER) or None,
    )


def normalize_api(envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """The API normalizer: one message per request."""
    return normalize_parsed(parse_api_message(envelope.body), envelope)


def normalize_parsed(payload: ApiMessage, envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
    """The same, from a payload the connector already validated from ``envelope.body``."""
    return (to_message(envelope, payload),)


@dataclass(frozen=True, slots=True)
class _OffloadedApi:
    """``normalize_api`` in the normalizer process (gateway/offload.py); plain data, so it pickles."""

    offload: ClassVar[bool] = True

    def __call__(self, envelope: RawEnvelope) -> Sequence[CanonicalMessage]:
        return normalize_api(envelope)


def normalizer_for(payload: ApiMessage) -> Callable[[RawEnvelope], Sequence[CanonicalMessage]]:
    """How to normalize a validated request: in the loop from ``payload``, or, for long HTML, in the
    normalizer process. Sanitizing and reading text out of HTML (normalizers.content.finish) takes
    ~0.3 s of the event loop for the 500 KB the schema allows, about 0.7 ms per KB."""
    if payload.html is not None and len(payload.html) > OFFLOAD_HTML_CHARS:
        return _OffloadedApi()
    return partial(normalize_parsed, payload)

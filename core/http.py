"""HTTP helpers shared by the web connectors: client address, rate limits, bounded bodies, answers.

Everything here is transport plumbing with no channel knowledge; connectors decide what to say.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

import orjson
from aiohttp import web
from pydantic import SecretStr

from core.channel import Normalizer
from core.errors import ConfigError, TooLarge
from core.model import IngestResult, Outcome, RawEnvelope, plain_text
from core.timeouts import shared_timeout

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Request headers that carry credentials: never copied into an envelope (it is stored and replayable).
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
_READ_CHUNK = 64 * 1024


class ClientAddress:
    """The client's IP: the peer address, or X-Forwarded-For's rightmost hop not in ``trusted_proxies``.

    Only hops appended by a trusted proxy are believed; anything further left was written by the
    client and could be forged to dodge a rate limit.
    """

    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        self._trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(entry, strict=False) for entry in trusted_proxies
        )

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def __call__(self, request: web.BaseRequest) -> str | None:
        peer = request.remote
        if peer is None or not self._trusted or not self._is_trusted(peer):
            return peer
        forwarded = request.headers.getall("X-Forwarded-For", ())
        hops = [hop.strip() for value in forwarded for hop in value.split(",")]
        for hop in reversed(hops):
            if not hop:
                continue
            if not self._is_trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # a garbled hop: fall back to what we know for sure
        return peer


class RateLimiter:
    """A token bucket per key (client IP, API inbox) with bounded memory.

    At most ``max_keys`` buckets are kept; the least recently seen is dropped first. A dropped bucket
    comes back full, which only matters for a key idle long enough to be the oldest of ``max_keys``.
    """

    def __init__(
        self, *, per_minute: float, burst: int, max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate limits need per_minute > 0, burst >= 1 and max_keys >= 1")
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, stamp)

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, stamp = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


def retry_after_value(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so a client never comes back too early."""
    return str(max(1, math.ceil(seconds)))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """A provider's ``Retry-After``: delay-seconds or an HTTP-date, as seconds from now (never
    negative); ``None`` when absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def json_response(
    payload: Mapping[str, Any], *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type="application/json", headers=headers
    )


def json_error(
    status: int, code: str, reason: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """``{"error": code, "reason": text}``: a stable machine code plus a sentence a person can act on."""
    return json_response({"error": code, "reason": reason}, status=status, headers=headers)


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The request body exactly as received, refusing (``TooLarge``) past ``limit`` bytes.

    Checks Content-Length first so an honest oversized upload is refused before it is read, then
    counts while reading because Content-Length may be absent (chunked) or false.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge(f"request body is {declared} bytes; the limit is {limit}")
    content = request.content
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if content.at_eof():
            break  # all of it is here: no read just to be told so (a small body comes in one)
    return b"".join(chunks)


def header_bytes(value: str) -> bytes:
    """A header value as the bytes that arrived.

    aiohttp decodes header bytes that are not UTF-8 as lone surrogates (``surrogateescape``), which
    a plain ``.encode()`` refuses with ``UnicodeEncodeError``: compare secrets on these bytes.
    """
    return value.encode("utf-8", "surrogateescape")


def envelope_headers(request: web.BaseRequest, *, without: str | None = None) -> dict[str, str]:
    """Request headers for the envelope: names lower-cased, credentials dropped, repeats comma-joined;
    also ``without`` (any case), the channel's own signature or secret header once it is verified.

    Names and values are plain ``str`` (aiohttp's are ``istr``), and bytes that were not UTF-8 are
    kept as ``\\xNN`` escapes (:func:`core.model.plain_text`), so the envelope can always be
    stored and quarantined.
    """
    dropped = without.lower() if without is not None else None
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers.items():
        # ASCII, the usual header, tested inline: plain_text is a call per name and per value.
        lower = raw_name.lower() if raw_name.isascii() else plain_text(raw_name).lower()
        value = raw_value if type(raw_value) is str and raw_value.isascii() else plain_text(raw_value)
        if lower in SECRET_HEADERS or lower == dropped:
            continue
        headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
    return headers


def request_envelope(
    request: web.BaseRequest,
    *,
    channel: str,
    tenant: str,
    inbox: str,
    body: bytes,
    signature_verified: bool,
    remote: str | None,
    meta: Mapping[str, Any],
    key_reuse: Literal["record", "refuse"] = "record",
) -> RawEnvelope:
    """The envelope of one HTTP request: its body, content type and headers (credentials dropped),
    received now."""
    return RawEnvelope(
        channel=channel,
        tenant=tenant,
        inbox=inbox,
        body=body,
        content_type=request.headers.get("Content-Type"),
        headers=envelope_headers(request),
        received_at=datetime.now(UTC),
        signature_verified=signature_verified,
        remote=remote,
        meta=dict(meta),
        key_reuse=key_reuse,
    )


def accepts_json(request: web.BaseRequest) -> bool:
    """True when the client prefers JSON over HTML (fetch/XHR callers; a browser navigation asks for HTML)."""
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


async def ingest_within(
    ingest: Callable[[RawEnvelope, Normalizer], Awaitable[IngestResult]],
    envelope: RawEnvelope,
    normalize: Normalizer,
    within: float,
) -> IngestResult:
    """``ingest`` bounded by ``within`` seconds: a store that does not answer in time is a RETRY (the
    caller answers 503 before its client gives up), never a hung request. A commit cut short is
    found as a duplicate when the client retries. The bound is shared by every request of the same
    ``within`` (:mod:`core.timeouts`): one timer, not one per request."""
    try:
        with shared_timeout(within):
            return await ingest(envelope, normalize)
    except TimeoutError:
        return IngestResult(
            outcome=Outcome.RETRY, reason=f"the message was not stored within {within:g} s", retry_after=5.0
        )


def result_status(result: IngestResult) -> int:
    """The HTTP status for a pipeline result: stored -> 2xx, rejected -> its hint or 400, retry -> 503."""
    if result.outcome is Outcome.ACCEPTED or result.outcome is Outcome.QUARANTINED:
        return 202
    if result.outcome is Outcome.DUPLICATE:
        return 200
    if result.outcome is Outcome.REJECTED:
        status = result.status or 400
        return status if 400 <= status < 500 else 400
    return 503


def result_payload(result: IngestResult) -> dict[str, Any]:
    """``{"message_id", "thread_id", "status"}`` for a stored result (ids of the first message of a batch)."""
    first = result.placements[0] if result.placements else None
    return {
        "message_id": first.message_id if first else None,
        "thread_id": first.thread_id if first else None,
        "status": result.outcome.value,
    }


def result_response(result: IngestResult, *, headers: Mapping[str, str] | None = None) -> web.Response:
    """Map a pipeline result to a JSON answer; never 2xx unless ``result.stored``."""
    status = result_status(result)
    extra = dict(headers or {})
    if result.stored:
        return json_response(result_payload(result), status=status, headers=extra)
    if result.outcome is Outcome.REJECTED:
        return json_error(status, "rejected", result.reason or "the message was rejected", headers=extra)
    extra["Retry-After"] = retry_after_value(result.retry_after or 5.0)
    return json_error(
        503, "unavailable", result.reason or "the message could not be stored now; retry later", headers=extra
    )


# Bearer keys shorter than this are refused by the channels' settings models ...
MIN_KEY_LENGTH = 8
# ... and warned about below this (the dev config's "dev-api-key" is short on purpose).
RECOMMENDED_KEY_LENGTH = 16

G = TypeVar("G")


class BearerKeys(Generic[G]):
    """Bearer keys and what each one grants (an inbox, a tenant).

    Keys are kept as SHA-256 digests, so every comparison has the same length, and a lookup
    compares with every key without stopping at a match: timing tells nothing about which matched.
    """

    def __init__(self, *, what: str, source: str | None) -> None:
        self._what = what  # "an API key", "a desk API key": for messages that never show the key
        self._source = source
        self._keys: list[tuple[bytes, G]] = []

    def add(self, key: SecretStr, grant: G, *, where: str) -> None:
        """Register ``key``; a key used twice is a configuration error (it must grant one thing)."""
        value = key.get_secret_value()
        if len(value) < RECOMMENDED_KEY_LENGTH:
            logger.warning(
                "%s: a key is shorter than %d characters; use long random keys outside development",
                where,
                RECOMMENDED_KEY_LENGTH,
            )
        digest = hashlib.sha256(value.encode()).digest()
        if any(digest == known for known, _ in self._keys):
            raise ConfigError(f"{self._what} is used twice", file=self._source, key=where)
        self._keys.append((digest, grant))

    def lookup(self, request: web.Request) -> G | None:
        """What the request's ``Authorization: Bearer <key>`` grants, or ``None``."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(header_bytes(token.strip())).digest()
        found = None
        for known, grant in self._keys:
            if hmac.compare_digest(digest, known):
                found = grant
        return found


def refuse_credentials(
    failures: RateLimiter, remote: str | None, *, present: bool, challenge: str, required: str
) -> web.Response:
    """The answer to a missing or wrong credential: 401 with ``challenge``, or 429 with
    ``Retry-After`` once ``remote`` has failed more often than ``failures`` allows (each failure
    takes a token, so guessing a key or token is slowed to the limiter's rate)."""
    wait = failures.acquire(remote or "unknown")
    if wait > 0:
        return json_error(
            429,
            "rate_limited",
            "too many failed authentications; retry later",
            headers={"Retry-After": retry_after_value(wait)},
        )
    return json_error(
        401,
        "unauthorized",
        f"{required} is required: Authorization: Bearer <key>",
        headers={"WWW-Authenticate": f'{challenge}, error="invalid_token"' if present else challenge},
    )


_ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type", 429: "rate_limited",
}
_ERROR_REASONS = {
    404: "nothing is served at this path",
    405: "this path does not take this method",
}


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """HTTP errors raised rather than answered (aiohttp's router: unknown path 404, wrong method
    405; ``raise web.HTTPUnauthorized``) as the JSON every other error is (:func:`json_error`).

    Answers a handler *returns* are left alone: a provider that expects its own form (WeChat's
    plain ``success``, an HTML form page) gets it from the channel's handler.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        given = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else None
        reason = given or _ERROR_REASONS.get(exc.status, exc.reason.lower())
        # Allow (405), WWW-Authenticate (401), Retry-After ... stay; the body's own headers do not.
        headers = {
            name: value for name, value in exc.headers.items()
            if name.lower() not in ("content-type", "content-length")
        }
        return json_error(exc.status, _ERROR_CODES.get(exc.status, "error"), reason, headers=headers)

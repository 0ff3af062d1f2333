"""Sender trust from an upstream MTA's ``Authentication-Results`` header (RFC 8601).

We do not evaluate DKIM/SPF/DMARC ourselves: that needs DNS on the ack path and the MTA in front
has already done it. We believe the verdict of one configured authserv-id, read from the topmost
header it wrote (the MTA prepends its own and strips forged copies; anything below could have been
written by the sender). Parsing uses ``authres`` (by the dkimpy author), which handles RFC 8601's
comments, quoting and ptypes; hand-rolled splitting on ';' gets those wrong.
"""

from __future__ import annotations

import logging
import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, TypedDict

import authres  # type: ignore[import-untyped]

logger = logging.getLogger(__name__)

# The header block is bounded: a mail with megabytes of headers is not going to be trusted anyway.
MAX_HEADER_BYTES = 256 * 1024
# Only this many Authentication-Results headers are examined (a sender can add thousands).
MAX_RESULTS_HEADERS = 50
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")
_FOLD = re.compile(r"\r?\n[ \t]+")
_METHODS = ("dkim", "spf", "dmarc")


class DkimResult(TypedDict):
    result: str  # pass, fail, neutral, ...
    domain: str | None  # header.d (or the domain of header.i)


class Authentication(TypedDict):
    """``meta["authentication"]``, in the shape ``normalizers.email.addresses.sender_verified`` reads."""

    authserv_id: str
    dmarc: str  # pass, fail, none, temperror, permerror, bestguesspass, ...
    header_from: str | None  # header.from of the dmarc result: the From domain DMARC evaluated
    dkim: list[DkimResult]  # every signature's result
    spf: str


def header_block(raw: bytes) -> bytes:
    """The bytes of the header section (bounded), without the body."""
    head = raw[:MAX_HEADER_BYTES]
    match = _END_OF_HEADERS.search(head)
    return head[: match.start()] if match else head


def has_results(head: bytes) -> bool:
    """Whether the header block ``head`` may hold an ``Authentication-Results`` field."""
    return b"authentication-results" in head.lower()


def authentication_results(raw: bytes) -> list[str]:
    """Every ``Authentication-Results`` value, topmost first, unfolded."""
    head = header_block(raw)
    if not has_results(head):
        return []  # most mail: nothing to parse
    message = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
    values = message.get_all("Authentication-Results") or []
    return [_FOLD.sub(" ", str(value)).strip() for value in values[:MAX_RESULTS_HEADERS]]


def verdict(raw: bytes, authserv_id: str) -> Authentication | None:
    """The verdict in the topmost header written by ``authserv_id``; ``None`` when there is none.

    A malformed topmost header of the trusted id yields ``None`` (not trusted), never a lower one.
    """
    wanted = authserv_id.lower()
    for value in authentication_results(raw):
        head = value.split(";", 1)[0].strip().split()
        if not head or head[0].lower() != wanted:
            continue
        try:
            parsed = authres.AuthenticationResultsHeader.parse_value(value)
        except Exception as exc:  # authres raises its own and stdlib errors on malformed input
            logger.info("unparseable Authentication-Results from %s: %s", authserv_id, type(exc).__name__)
            return None
        return _summarize(authserv_id, parsed.results)
    return None


def _summarize(authserv_id: str, results: list[Any]) -> Authentication:
    found: dict[str, list[Any]] = {method: [] for method in _METHODS}
    for result in results:
        method = str(result.method).lower()
        if method in found:
            found[method].append(result)

    def outcome(method: str) -> str:
        values = [str(r.result).lower() for r in found[method]]
        if "pass" in values:
            return "pass"
        return values[0] if values else "none"

    def prop(result: Any, ptype: str, name: str) -> str | None:
        for p in result.properties:
            if str(p.type).lower() == ptype and str(p.name).lower() == name and p.value:
                return str(p.value).lower()
        return None

    def signing_domain(result: Any) -> str | None:
        # header.d names the domain; some MTAs (Gmail) give only header.i = "[local]@domain".
        domain = prop(result, "header", "d")
        if domain is None and (identity := prop(result, "header", "i")) is not None:
            domain = identity.rpartition("@")[2] or None
        return domain

    return Authentication(
        authserv_id=authserv_id,
        dmarc=outcome("dmarc"),
        header_from=next((d for r in found["dmarc"] if (d := prop(r, "header", "from"))), None),
        dkim=[DkimResult(result=str(r.result).lower(), domain=signing_domain(r)) for r in found["dkim"]],
        spf=outcome("spf"),
    )

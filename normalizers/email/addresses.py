"""Addresses and sender trust.

The sender identity is only ever the real addr-spec, parsed from the *raw* header before any
RFC 2047 decoding: an encoded word can then never smuggle an address into the structure, and a
display name that looks like an address stays a display name (and is flagged). Only an addr-spec
written outside quoted strings and comments is an address: ``From: "a@b.example"`` has none.
"""

from __future__ import annotations

import contextlib
import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email import _parseaddr  # type: ignore[attr-defined]  # getaddresses' parser, see _AddressParser
from typing import Any

import idna

from normalizers.email.headers import decode_text, unfold

_ADDR_SPEC = re.compile(r"[^@\s<>()\[\]\\,;:\"]+@[^@\s<>()\[\]\\,;:\"]+")
_ADDRESS_IN_TEXT = re.compile(r"[^@\s<>()\"']+@[^@\s<>()\"']+\.[^@\s<>()\"']+")


@dataclass(frozen=True, slots=True)
class Address:
    """One parsed address: the normalized addr-spec and the decoded display name."""

    address: str
    name: str


@dataclass(frozen=True, slots=True)
class Sender:
    """The From of a mail, with the tricks that were found in it."""

    address: str | None
    name: str | None
    flags: tuple[str, ...] = field(default=())


def normalize_address(addr_spec: str) -> str | None:
    """``local@domain`` with the domain lowercased and IDNA-decoded; None when not an addr-spec."""
    addr_spec = addr_spec.strip()
    if "=?" in addr_spec or not _ADDR_SPEC.fullmatch(addr_spec):
        return None
    local, _, raw_domain = addr_spec.rpartition("@")
    domain = _normalize_domain(raw_domain)
    if domain is None:
        return None
    return f"{unicodedata.normalize('NFC', local)}@{domain}"


@functools.lru_cache(maxsize=4096)
def _normalize_domain(domain: str) -> str | None:
    """Lowercased, NFC, IDNA-decoded; None when empty. Cached: mail comes from and goes to the
    same few domains, and the idna package (pure Python) spent ~10 us per address on them."""
    domain = unicodedata.normalize("NFC", domain.rstrip(".").lower())
    if not domain:
        return None
    # Punycode and Unicode spellings of one domain must give one identity; a domain that is not a
    # valid IDN keeps its lowercased text, which is still what the sender wrote.
    with contextlib.suppress(idna.IDNAError, UnicodeError, ValueError):
        domain = idna.decode(idna.encode(domain, uts46=True))
    return domain


# An unquoted display name holding an "@" before an angle-addr ("support@bank.com <evil@x.org>"):
# getaddresses would read the display name as a second address; quoting it keeps it a name.
_BARE_PHRASE = re.compile(r'(^|,)(\s*)([^,"<>()]*@[^,"<>()]*?)(\s*<[^<>]*>)')


def _quote_phrases(value: str) -> str:
    def quote(match: re.Match[str]) -> str:
        phrase = match.group(3).strip().replace("\\", "\\\\").replace('"', '\\"')
        return f'{match.group(1)}{match.group(2)}"{phrase}"{match.group(4)}'

    return _BARE_PHRASE.sub(quote, value) if "@" in value and "<" in value else value


# getaddresses unquotes a lone quoted string into the address slot: for ``From: "ceo@bank.example"``
# it returns the address ``ceo@bank.example``, just as for a bare addr-spec, and its result cannot
# tell the two apart. So the same parser runs with every "@" that it reads inside a quoted string,
# a comment or a domain literal replaced by _AT_MASK: an "@" then reaches an address only from an
# addr-spec written outside them. The mask is a noncharacter ("never for interchange").
_AT_MASK = "\ufdd0"


class _AddressParser(_parseaddr.AddrlistClass):  # type: ignore[misc]  # no stubs for email._parseaddr
    """The parser of ``email.utils.getaddresses`` (3.11: ``_AddressList(", ".join(values))``), with
    "@" masked in what it reads as a quoted string, a comment or a domain literal.

    Its one reader of all three is ``getdelimited``, so the mask follows the parser's own idea of
    where they are, quirks included (it skips the character after a route-addr's addr-spec, so a
    ``"`` there opens nothing); a separate scan would have to repeat those quirks exactly.
    """

    def getdelimited(self, beginchar: str, endchars: str, allowcomments: bool = True) -> str:
        return str(super().getdelimited(beginchar, endchars, allowcomments)).replace("@", _AT_MASK)


def _address_fields(raw_values: Sequence[str]) -> list[tuple[str, str]]:
    """(name, address) pairs as getaddresses gives them, "@" masked inside quoted strings, comments
    and domain literals; names get their "@" back, a masked address stays masked (never valid).

    The values are joined with ", " and parsed as one list, as getaddresses does: a quote left open
    in one From header runs on into the next.
    """
    text = ", ".join(_quote_phrases(unfold(value)) for value in raw_values)
    if _AT_MASK in text:  # raw headers are Latin-1 range (headers.latin); an envelope sender may not be
        text = text.replace(_AT_MASK, "\x1a")  # SUB: so that no mask of the sender's becomes an "@"
    pairs: list[tuple[str, str]] = _AddressParser(text).getaddrlist()
    return [(name.replace(_AT_MASK, "@"), address) for name, address in pairs]


# Parsed address headers are cached: the same few To and From values come back mail after mail
# (an inbox's address, a customer's From), and getaddresses costs ~10 us a header. Only short
# values are kept, so the cache stays small whatever arrives.
_CACHED_VALUES_MAX = 512


def parse_addresses(raw_values: Sequence[str], *, hint: str | None = None) -> list[Address]:
    """Every valid address in the given raw header values (To, Cc, Reply-To ...), in order."""
    if not raw_values:
        return []
    if sum(map(len, raw_values)) <= _CACHED_VALUES_MAX:
        return list(_parse_addresses_cached(tuple(raw_values), hint))
    return _parse_addresses(raw_values, hint)


@functools.lru_cache(maxsize=2048)
def _parse_addresses_cached(raw_values: tuple[str, ...], hint: str | None) -> tuple[Address, ...]:
    return tuple(_parse_addresses(raw_values, hint))


def _parse_addresses(raw_values: Sequence[str], hint: str | None) -> list[Address]:
    result: list[Address] = []
    for raw_name, raw_addr in _address_fields(raw_values):
        address = _address(raw_addr)
        if address is not None:
            result.append(Address(address, decode_text(raw_name, hint=hint).strip()))
    return result


def _address(raw_addr: str) -> str | None:
    """The normalized address in getaddresses' address slot; None for one read from a quoted string."""
    return None if _AT_MASK in raw_addr else normalize_address(_decode_addr(raw_addr))


def _decode_addr(raw_addr: str) -> str:
    # RFC 6532 allows UTF-8 in addresses; compat32 hands raw 8-bit bytes over as surrogate escapes.
    if raw_addr.isascii():
        return raw_addr
    try:
        return raw_addr.encode("latin-1", errors="surrogateescape").decode("utf-8")
    except UnicodeError:
        return raw_addr


def parse_sender(raw_from: Sequence[str], *, hint: str | None = None) -> Sender:
    """The sender from all From headers; several From headers give no address worth verifying."""
    if raw_from and sum(map(len, raw_from)) <= _CACHED_VALUES_MAX:
        return _parse_sender_cached(tuple(raw_from), hint)
    return _parse_sender(raw_from, hint)


@functools.lru_cache(maxsize=2048)
def _parse_sender_cached(raw_from: tuple[str, ...], hint: str | None) -> Sender:
    return _parse_sender(raw_from, hint)


def _parse_sender(raw_from: Sequence[str], hint: str | None) -> Sender:
    flags: list[str] = []
    if not raw_from:
        return Sender(None, None, ("no_from",))
    if len(raw_from) > 1:
        flags.append("multiple_from")
    # Several From headers: the first valid address is kept as a claim, never as verified.
    pairs = _address_fields(raw_from)
    chosen: tuple[str, str] | None = None
    for raw_name, raw_addr in pairs:
        address = _address(raw_addr)
        if address is None:
            if "=?" in raw_addr:
                flags.append("encoded_word_in_address")
            continue
        if chosen is None:
            chosen = (raw_name, address)
    if len(raw_from) == 1 and len([p for p in pairs if p[1]]) > 1:
        flags.append("multiple_addresses")
    if chosen is None:
        # An address written only in a display name, quoted string or comment ("a@b", with no
        # angle-addr) is no address, and is flagged as one in a display name would be.
        if any(_AT_MASK in raw_addr or "@" in raw_name for raw_name, raw_addr in pairs):
            flags.append("display_name_contains_address")
        return Sender(None, _first_name(pairs, hint), (*flags, "no_valid_address"))
    name = decode_text(chosen[0], hint=hint).strip()
    for found in _ADDRESS_IN_TEXT.findall(name):
        if normalize_address(found.strip(".")) != chosen[1]:
            flags.append("display_name_contains_address")
            break
    return Sender(chosen[1], name or None, tuple(flags))


def _first_name(pairs: Sequence[tuple[str, str]], hint: str | None) -> str | None:
    for raw_name, _ in pairs:
        name = decode_text(raw_name, hint=hint).strip()
        if name:
            return name
    return None


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _aligned(domain: str, authenticated: str) -> bool:
    """Relaxed DMARC alignment, approximated: same domain or one is a subdomain of the other."""
    domain, authenticated = domain.lower().rstrip("."), authenticated.lower().rstrip(".")
    if not domain or not authenticated:
        return False
    return (
        domain == authenticated
        or domain.endswith("." + authenticated)
        or authenticated.endswith("." + domain)
    )


def sender_verified(sender: Sender, authentication: Mapping[str, Any] | None) -> bool:
    """True only when the trusted upstream verdict authenticates exactly this From domain.

    ``authentication`` (``envelope.meta["authentication"]``) holds ``dmarc`` ("pass", ...) with
    ``header_from`` (the From domain the verdict is for) and/or ``dkim``: a list of
    ``{"result": "pass", "domain": "<d=>"}``. Anything else, or a suspicious From, is not verified.
    """
    if not authentication or sender.address is None:
        return False
    if {"multiple_from", "multiple_addresses", "encoded_word_in_address"} & set(sender.flags):
        return False
    from_domain = _domain(sender.address)
    header_from = str(authentication.get("header_from") or "")
    if str(authentication.get("dmarc", "")).lower() == "pass" and header_from:
        return _ascii_domain(header_from) == _ascii_domain(from_domain)
    for result in authentication.get("dkim") or ():
        if not isinstance(result, Mapping) or str(result.get("result", "")).lower() != "pass":
            continue
        if _aligned(_ascii_domain(from_domain), _ascii_domain(str(result.get("domain", "")))):
            return True
    return False


@functools.lru_cache(maxsize=1024)
def _ascii_domain(domain: str) -> str:
    try:
        return idna.encode(domain.strip().rstrip("."), uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain.strip().rstrip(".").lower()

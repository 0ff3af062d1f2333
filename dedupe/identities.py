"""Identity normalisation: one spelling per identity, so the same person always matches.

Decisions (documented in docs/threading.md):

- **Email**: the whole address is lower-cased. RFC 5321 lets a server treat the local part as
  case-sensitive, but practically no mail system does, and keeping case would split one customer
  into two whenever they type their address differently. The domain is mapped with IDNA 2008 /
  UTS #46 (``idna``) and kept in its Unicode form (``bücher.de``), so ``xn--bcher-kva.de`` and
  ``BÜCHER.de`` are one domain and a desk agent can read it. Sub-addressing (``+tag``) is kept:
  whether ``ada+shop@`` is ``ada@`` depends on the provider.
- **Phone**: E.164 via ``phonenumbers``; a number that cannot be parsed as a possible number is
  dropped (it stays in the text), because a wrong phone identity would link strangers.
- **WhatsApp** ``wa_id`` is the phone number in international digits: it also yields a ``phone``
  identity, with the same verified flag (WhatsApp proved the number).
- **Slack** ``team:user`` ids are upper-cased (Slack ids are upper case); WeChat openids are scoped
  per app (``appid:openid``) and kept exactly; other ids are stripped of surrounding space only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import idna
import phonenumbers

from core.model import Identity, IdentityKind

_E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
# Kinds whose values are case-insensitive provider ids.
_UPPER = frozenset({IdentityKind.SLACK})


def normalize_email(value: str) -> str | None:
    """``Ada@Bücher.DE`` -> ``ada@bücher.de``; ``None`` when it is not an address."""
    text = value.strip().strip("<>").strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        return None
    if domain.isascii() and "xn--" not in domain.lower():
        # Plain ASCII domains (nearly all): UTS #46 mapping would only lower-case them.
        return f"{local.lower()}@{domain.rstrip('.').lower()}"
    try:
        domain = idna.decode(idna.encode(domain.rstrip("."), uts46=True))
    except idna.IDNAError:
        # Not a valid IDN (e.g. an underscore); a plain lower-case domain still matches itself.
        domain = domain.rstrip(".").lower()
    return f"{local.lower()}@{domain}"


@functools.lru_cache(maxsize=4096)
def normalize_phone(value: str, default_region: str | None = None) -> str | None:
    """E.164 (``+41791234567``), or ``None`` when it is not a possible number."""
    text = value.strip()
    if _E164.match(text):
        return text  # already E.164 (what every normalizer hands over): skip the parser
    if not text:
        return None
    if text.startswith("00"):
        text = "+" + text[2:]
    elif default_region is None and not text.startswith("+"):
        # Without a region only international numbers can be read.
        text = "+" + text
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize(identity: Identity, default_region: str | None = None) -> list[Identity]:
    """The identity in its one spelling, plus what it implies (a wa_id is also a phone); may be empty."""
    kind, value = identity.kind, identity.value
    if kind == IdentityKind.EMAIL:
        email = normalize_email(value)
        return [Identity(kind=kind, value=email, verified=identity.verified)] if email else []
    if kind == IdentityKind.PHONE:
        phone = normalize_phone(value, default_region)
        return [Identity(kind=kind, value=phone, verified=identity.verified)] if phone else []
    value = value.strip()
    if not value:
        return []
    if kind == IdentityKind.WHATSAPP:
        wa_id = value.lstrip("+")
        found = [Identity(kind=kind, value=wa_id, verified=identity.verified)]
        phone = normalize_phone("+" + wa_id)
        if phone is not None:
            found.append(Identity(kind=IdentityKind.PHONE, value=phone, verified=identity.verified))
        return found
    if kind in _UPPER:
        value = value.upper()
    return [Identity(kind=kind, value=value, verified=identity.verified)]


def normalize_all(identities: Iterable[Identity], default_region: str | None = None) -> list[Identity]:
    """Normalised identities in order, one per (kind, value); a verified copy wins over a claimed one."""
    seen: dict[tuple[str, str], Identity] = {}
    for given in identities:
        for identity in normalize(given, default_region):
            prior = seen.get(identity.key())
            if prior is None or (identity.verified and not prior.verified):
                seen[identity.key()] = identity
    return list(seen.values())

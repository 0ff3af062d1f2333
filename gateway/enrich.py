"""Extraction and routing enrichment: entities found in the text, routing hints from rules.

Everything is compiled once in :meth:`Enricher.from_settings`; :meth:`Enricher.enrich` only runs
precompiled regexes, substring and set look-ups, and scans a bounded prefix of the text so a huge
message costs no more than a large one.

Extractors (``[[extractors]]``, or :data:`DEFAULT_EXTRACTORS` when the key is absent) are regexes
with an optional named group holding the value. Kind ``phone`` is special: every match is parsed
with ``phonenumbers`` (default region ``CN``) and kept, as E.164, only when it is a valid number.
An extractor may name strings it ``requires``, of which any match contains one: its regex is then
tried only on text that holds one of them (case-insensitively), a substring test that costs a
fraction of a regex scan. Each regex pass costs 5-30 ns per character even where nothing matches,
which across the defaults was ~220 us for 5 KB of English text. An extractor may also name the
``digit_run`` every match holds (ten digits in a row for an order number): its regex is then tried
only on text with a run that long, which one bytes translation per text tells for all extractors.

Routing rules (``[[routing.rules]]``): a rule matches when every criterion it names matches (any
channel of ``channels`` AND any inbox of ``inboxes`` AND any keyword AND any customer); a rule that
names none matches every message. Use several rules for "either". Of the matching rules the highest
priority wins, tags are their union in rule order, the queue comes from the first one that names one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self

import phonenumbers

from core.model import CanonicalMessage, Entity, Routing, replace
from core.settings import ExtractorSettings, RoutingRule, Settings
from normalizers.content import finishing

MAX_ENTITIES = 32
# Only this much of subject + text is scanned: order and tracking numbers sit near the top.
MAX_SCAN_CHARS = 32_768
DEFAULT_PHONE_REGION = "CN"
PRIORITIES = ("low", "normal", "high", "urgent")

# `\b` is Unicode-aware, and Chinese characters count as word characters, so "订单号123" has no
# boundary before the digits. These look-arounds bound values by ASCII letters and digits only.
# Patterns start with their literal, or a character class without IGNORECASE (case-insensitive parts
# come after it in `(?i:...)`), with the look-behind after it: the regex engine then skips ahead to
# a possible first character instead of trying every position, many times faster on long text.
_L = r"(?<![A-Za-z0-9])"
_R = r"(?![A-Za-z0-9])"
# Possessive whitespace (no alternative starts with a space, so none needs one back): a keyword
# followed by no value fails in a few steps instead of trying every split of the spaces.
_SEP = r"\s*+(?:是|为|:|：|#|no\.?|number|num)?\s*+[:：#]?\s*+"
# Phone numbers are read in the digits people type them in: ASCII, full-width (CJK input methods),
# Arabic-Indic, Persian and Devanagari; phonenumbers turns each into E.164. A class of its own
# rather than \d (every script's digits), so that DIGITS is exactly what a match needs.
DIGITS = tuple(
    chr(code)
    for low, high in ((0x30, 0x39), (0xFF10, 0xFF19), (0x660, 0x669), (0x6F0, 0x6F9), (0x966, 0x96F))
    for code in range(low, high + 1)
)
_DIGIT = "".join(DIGITS)
_ASCII_DIGITS = DIGITS[:10]

# The digit runs of a text, one byte per character: its UTF-8 bytes with continuation bytes deleted,
# every byte that begins a character `\d` may match (an ASCII digit, or the lead byte of a non-ASCII
# decimal digit, shared with the other characters of its range) turned into "0", the rest into " ".
# The longest run of "0"s is then at least the longest run of digits (exact on ASCII text), found
# in C at ~1 ns per character against 5-10 for a `\d` regex. The lead bytes are those of the
# decimal digits in this Python's Unicode database (tests/gateway/test_enrich.py tries each one):
# D9, DB, DF (Arabic-Indic, Persian, NKo), E0, E1 (Indic, Thai, Myanmar, ...), EA (Vai, Javanese,
# ...), EF (full-width), F0 (the rest).
_DECIMAL_LEADS = b"\xd9\xdb\xdf\xe0\xe1\xea\xef\xf0"
_CONTINUATION = bytes(range(0x80, 0xC0))
_RUN_MAP = bytes(0x30 if chr(b) in _ASCII_DIGITS or b in _DECIMAL_LEADS else 0x20 for b in range(256))

# Each names what any of its matches contains (``requires``, case-folded, and ``digit_run``), so that
# most messages skip most regexes; tests/gateway/test_enrich.py checks that every match holds them.
DEFAULT_EXTRACTORS: tuple[ExtractorSettings, ...] = (
    # Taobao / Tmall / JD / Pinduoduo order numbers: long digit runs, only next to an order keyword
    # (a bare 18-digit number could as well be an ID card number).
    ExtractorSettings(
        kind="order_number",
        pattern=(
            rf"[订Oo](?:(?<=[Oo])[Rr](?i:der)|(?<=订)单(?:编号|号码|号)?)"
            rf"(?i:{_SEP}{_L}(?P<value>\d{{10,20}}){_R})"
        ),
        group="value",
        requires=("order", "订单"),
        digit_run=10,
    ),
    # International shops: "#12345", "Order 12345", "order no. AB-12345" ("[#TG-1" is a ticket ref).
    ExtractorSettings(
        kind="order_number", pattern=rf"#(?<![\w\[]#)(?P<value>[A-Z]{{0,4}}-?\d{{4,12}}){_R}", group="value",
        requires=("#",),
        digit_run=4,
    ),
    ExtractorSettings(
        kind="order_number",
        pattern=rf"[Oo][Rr](?i:der(?<![A-Za-z0-9]order){_SEP}{_L}(?P<value>[A-Z]{{0,4}}-?\d{{4,12}}){_R})",
        group="value",
        requires=("order",),
        digit_run=4,
    ),
    # UPS.
    ExtractorSettings(
        kind="tracking_number", pattern=rf"1Z(?<![A-Za-z0-9]1Z)[0-9A-Z]{{16}}{_R}", requires=("1z",),
        digit_run=1,
    ),
    # SF Express.
    ExtractorSettings(
        kind="tracking_number", pattern=rf"SF(?<![A-Za-z0-9]SF)\d{{12}}{_R}", requires=("sf",), digit_run=12
    ),
    # UPU S10 (China Post, EMS and other posts): two letters, nine digits, country code, all ASCII.
    ExtractorSettings(
        kind="tracking_number", pattern=rf"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z][0-9]{{9}}[A-Z]{{2}}{_R}",
        requires=_ASCII_DIGITS,
        digit_run=9,
    ),
    # JD Logistics waybills (JDVA..., JDVC..., JDX...).
    ExtractorSettings(
        kind="tracking_number", pattern=rf"JD(?<![A-Za-z0-9]JD)[VX][A-Z]?\d{{11,13}}{_R}", requires=("jd",),
        digit_run=11,
    ),
    # YTO.
    ExtractorSettings(
        kind="tracking_number", pattern=rf"YT(?<![A-Za-z0-9]YT)\d{{13}}{_R}", requires=("yt",), digit_run=13
    ),
    # ZTO, YTO, Yunda, STO and others use bare digit runs: only next to a carrier or waybill keyword.
    ExtractorSettings(
        kind="tracking_number",
        pattern=(
            r"[Tt快运物单中圆韵申百极](?:(?<=[Tt])[Rr](?i:acking(?>\s*(?:no\.?|number|#))?)|(?<![Tt])(?:(?<=快)递单号"
            r"|(?<=运)单号|(?<=物)流单号|(?<=快)递号|(?<=单)号|(?<=中)通|(?<=圆)通|(?<=韵)达|(?<=申)通|(?<=百)世|(?<=极)兔))"
            rf"\s*+(?:快递)?(?i:{_SEP}{_L}(?P<value>[A-Z]{{0,4}}\d{{10,15}}){_R})"
        ),
        group="value",
        # "track", not "tracking": (?i:i) also matches the Turkish İ and ı, which casefold keeps apart.
        requires=("track", "单号", "快递号", "中通", "圆通", "韵达", "申通", "百世", "极兔"),
        digit_run=10,
    ),
    # Phone candidates; each is validated with phonenumbers and stored as E.164.
    ExtractorSettings(
        kind="phone",
        pattern=(
            rf"[+{_DIGIT}](?<![\w+][+{_DIGIT}])(?:(?<=\+)[{_DIGIT}]|(?<!\+))"
            rf"[{_DIGIT} \-().]{{5,20}}[{_DIGIT}](?!\w)"
        ),
        requires=DIGITS,
        digit_run=1,
    ),
)


@dataclass(frozen=True, slots=True)
class _Extractor:
    kind: str
    regex: re.Pattern[str]
    group: str | int
    requires: tuple[str, ...]  # case-folded; empty: tried on every text
    # Finds any of ``requires`` in one C call: a third of the time of a generator of ``in`` tests.
    gate: re.Pattern[str] | None
    digit_run: int  # 0: tried whatever digits the text holds

    @classmethod
    def compile(cls, spec: ExtractorSettings) -> Self:
        regex = re.compile(spec.pattern)
        if spec.group is not None and spec.group not in regex.groupindex:
            raise ValueError(f"extractor {spec.kind!r}: pattern has no group named {spec.group!r}")
        requires = tuple(dict.fromkeys(needle.casefold() for needle in spec.requires))
        gate = re.compile("|".join(map(re.escape, requires))) if requires else None
        group = spec.group if spec.group is not None else 0
        return cls(spec.kind, regex, group, requires, gate, spec.digit_run)


@dataclass(frozen=True, slots=True)
class _Rule:
    channels: frozenset[str]
    inboxes: frozenset[str]
    keywords: tuple[str, ...]  # case-folded
    customers: frozenset[str]
    priority: int | None
    tags: tuple[str, ...]
    queue: str | None

    @classmethod
    def compile(cls, rule: RoutingRule) -> Self:
        # Substring tests on case-folded text ("URGENT", "Straße" ~ "strasse"): several times faster
        # on a long mail than a case-insensitive regex alternation, which tries every position.
        return cls(
            channels=frozenset(rule.channels),
            inboxes=frozenset(rule.inboxes),
            keywords=tuple(dict.fromkeys(k.casefold() for k in rule.keywords if k)),
            customers=frozenset(c.strip().lower() for c in rule.customers),
            priority=PRIORITIES.index(rule.priority) if rule.priority else None,
            tags=rule.tags,
            queue=rule.queue,
        )

    def matches(self, message: CanonicalMessage, folded: str, customers: frozenset[str]) -> bool:
        """Whether the rule covers ``message``; ``folded`` is its scanned text, case-folded."""
        if self.channels and message.channel not in self.channels:
            return False
        if self.inboxes and message.inbox not in self.inboxes:
            return False
        if self.customers and self.customers.isdisjoint(customers):
            return False
        return not self.keywords or any(keyword in folded for keyword in self.keywords)


class Enricher:
    """Fills ``entities`` and ``routing`` of a canonical message; built once, used for every message."""

    def __init__(
        self, extractors: Iterable[ExtractorSettings], rules: Iterable[RoutingRule], *,
        phone_region: str = DEFAULT_PHONE_REGION,
    ) -> None:
        self._extractors = tuple(_Extractor.compile(spec) for spec in extractors)
        self._rules = tuple(_Rule.compile(rule) for rule in rules)
        self._fold = any(rule.keywords for rule in self._rules) or any(e.requires for e in self._extractors)
        # Ascending, so that the first one a text lacks ends the search (longer ones are lacking too).
        runs = sorted({e.digit_run for e in self._extractors if e.digit_run})
        self._runs = tuple(b"0" * run for run in runs)
        self._phone_region = phone_region

    @classmethod
    def from_settings(cls, settings: Settings, *, phone_region: str = DEFAULT_PHONE_REGION) -> Self:
        extractors = DEFAULT_EXTRACTORS if settings.extractors is None else settings.extractors
        return cls(extractors, settings.routing.rules, phone_region=phone_region)

    def enrich(self, message: CanonicalMessage) -> CanonicalMessage:
        changes = self._changes(message, message.text)
        return replace(message, **changes) if changes else message

    def finish_and_enrich(self, message: CanonicalMessage) -> CanonicalMessage:
        """``enrich(normalizers.content.finish(message))``, copying the message once instead of
        twice (a copy is ~2 us of the event loop per message)."""
        changes = finishing(message)
        changes.update(self._changes(message, changes.get("text", message.text)))
        return replace(message, **changes) if changes else message

    def _changes(self, message: CanonicalMessage, text: str | None) -> dict[str, Any]:
        """The enrichment of ``message`` whose text is ``text``, as keywords for ``replace``."""
        scanned = "\n".join(part for part in (message.subject, text) if part)[:MAX_SCAN_CHARS]
        folded = scanned.casefold() if self._fold else ""
        entities = self._entities(message.entities, scanned, folded)
        routing = self._routing(message, folded)
        if entities == message.entities and routing == message.routing:
            return {}
        return {"entities": entities, "routing": routing}

    def _entities(self, existing: tuple[Entity, ...], text: str, folded: str) -> tuple[Entity, ...]:
        found = list(existing)
        seen = {(e.kind, e.value) for e in existing}
        claimed: list[tuple[int, int]] = []  # spans already taken, so an order number is not also a phone
        longest = self._longest_run(text)
        for extractor in self._extractors:
            # Whether the regex can match: the text holds the digit run and one of the needles every
            # match contains (tested here, not in a method: this runs for every extractor).
            gate = extractor.gate
            if extractor.digit_run > longest or (gate is not None and gate.search(folded) is None):
                continue
            group, kind = extractor.group, extractor.kind
            for match in extractor.regex.finditer(text):
                start, end = match.span(group)
                if start < 0 or (claimed and any(start < e and s < end for s, e in claimed)):
                    continue
                value: str | None = match.group(group)
                if kind == "phone":
                    value = self._phone(value)
                if not value or (kind, value) in seen:
                    continue
                seen.add((kind, value))
                claimed.append((start, end))
                found.append(Entity(kind=kind, value=value))
                if len(found) >= MAX_ENTITIES:
                    return tuple(found)
        return tuple(found)

    def _longest_run(self, text: str) -> int:
        """The longest ``digit_run`` of an extractor that ``text`` may hold (0: none)."""
        if not self._runs:
            return 0
        digits = text.encode("utf-8", "surrogatepass").translate(_RUN_MAP, _CONTINUATION)
        longest = 0
        for run in self._runs:
            if run not in digits:
                break
            longest = len(run)
        return longest

    def _phone(self, candidate: str | None) -> str | None:
        return None if candidate is None else _e164(candidate, self._phone_region)

    def _routing(self, message: CanonicalMessage, folded: str) -> Routing:
        """``folded``: the scanned text, case-folded (empty when no rule or extractor needs it)."""
        if not self._rules:
            return message.routing
        customers = frozenset(i.value.lower() for i in message.identities)
        current = message.routing
        priority: int | None = None
        tags = list(current.tags)
        queue = current.queue
        for rule in self._rules:
            if not rule.matches(message, folded, customers):
                continue
            if rule.priority is not None and (priority is None or rule.priority > priority):
                priority = rule.priority
            tags.extend(tag for tag in rule.tags if tag not in tags)
            if queue is None:
                queue = rule.queue
        # No matching rule names a priority: keep what the connector set.
        level = current.priority if priority is None else PRIORITIES[priority]
        return Routing(priority=level, tags=tuple(tags), queue=queue)


# The same numbers come back: a signature's phone in every quoted reply of a thread, a customer's
# number in each of their messages. phonenumbers spends 30-60 us on a candidate; the answer is a
# function of the candidate text, so it is kept (a bounded cache of short strings).
@functools.lru_cache(maxsize=4096)
def _e164(candidate: str, region: str) -> str | None:
    """``candidate`` as an E.164 number when it is a valid phone number in ``region``, else None."""
    try:
        number = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

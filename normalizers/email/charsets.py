"""Bytes to text for mail: declared charsets, charsets that are missing, and charsets that lie.

Order of trust: the declared charset (mapped to the superset real clients actually use), then
UTF-8, then statistical detection (charset-normalizer), and only as a last resort a lossy decode,
which the caller records in ``extra``. The raw bytes are archived by the store either way.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import charset_normalizer

# Declared names mapped to what senders really mean: mail "GB2312" is GBK/GB18030 in practice,
# "ks_c_5601-1987" is Windows cp949, "Shift_JIS" from Windows has the cp932 extensions, and
# "iso-8859-1" is windows-1252 (as in every browser, WHATWG encoding standard).
_SUPERSETS = {
    "gb2312": "gb18030",
    "gb_2312-80": "gb18030",
    "gb_2312": "gb18030",
    "euc-cn": "gb18030",
    "x-euc-cn": "gb18030",
    "cn-gb": "gb18030",
    "csgb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "windows-936": "gb18030",
    "big5": "big5hkscs",
    "x-big5": "big5hkscs",
    "cn-big5": "big5hkscs",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "ksc5601": "cp949",
    "euc-kr": "cp949",
    "x-windows-949": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "sjis": "cp932",
    "ms_kanji": "cp932",
    "iso-2022-jp": "iso2022_jp_ext",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "us-ascii": "ascii",
    "ascii": "ascii",
    "ansi_x3.4-1968": "ascii",
    "iso-8859-9": "cp1254",
    "latin-9": "iso8859-15",
    "latin9": "iso8859-15",
    "latin-2": "iso8859-2",
    "latin-0": "iso8859-15",
    "utf8": "utf-8",
    "unicode-1-1-utf-7": "utf-7",
    "x-unicode20utf8": "utf-8",
}
# Single-byte charsets accept any byte sequence, so a strict decode never tells us they lie.
SINGLE_BYTE = (
    {"cp1252", "latin-1", "iso8859-1"}
    | {f"cp125{i}" for i in range(9)}
    | {f"iso8859-{i}" for i in range(2, 17)}
)
DETECT_SAMPLE = 64 * 1024  # detection cost grows with input; a sample is enough to pick a charset


@dataclass(frozen=True, slots=True)
class Decoded:
    """Text plus how it was obtained; ``how`` is declared, utf-8, detected, ascii or lossy."""

    text: str
    charset: str
    how: str

    @property
    def lossy(self) -> bool:
        return self.how == "lossy"


def codec_for(declared: str | None) -> str | None:
    """The Python codec to use for a declared charset name, or None when unknown."""
    if not declared:
        return None
    name = declared.strip().strip("\"'").lower()
    name = _SUPERSETS.get(name, name)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def detect(data: bytes) -> str | None:
    """Best guess of the charset of ``data`` (None when nothing fits)."""
    best = charset_normalizer.from_bytes(data[:DETECT_SAMPLE]).best()
    if best is None:
        return None
    return codec_for(best.encoding)


# ISO 2022 designations of a character set (RFC 1468, 1554, 1557, 1922): ESC $ @ / A / B, ESC $ ( X,
# ESC $ ) X (G1, used with SO / SI), ESC $ * X, ESC $ + X, ESC ( B / I / J and ESC . A / F.
_ISO2022_ESCAPE = re.compile(rb"\x1b(?:\$[@AB]|\$[()*+][@A-Z]|\([BIJ]|\.[AF])")
_ISO2022_G1 = re.compile(rb"\x1b\$[)*+]([@A-Z])")
# The Japanese family, most common first: each is a superset of ISO-2022-JP for some escapes
# (half-width katakana; GB2312, KS C 5601 and ISO-8859-1/7; JIS X 0213).
_ISO2022_JP_CODECS = ("iso2022_jp_ext", "iso2022_jp_2", "iso2022_jp_2004", "iso2022_jp_3")
_SHIFT_OR_LINE_END = re.compile(rb"[\x0e\x0f]|\r?\n")


def _iso2022_cn_as_jp2(data: bytes) -> bytes:
    """ISO-2022-CN text whose only G1 set is GB2312, rewritten for the stdlib's ISO-2022-JP-2 codec.

    Python has no ISO-2022-CN codec; ISO-2022-JP-2 reads GB2312 too, designated to G0 (ESC $ A)
    instead of shifted in with SO from G1. So SO becomes ESC $ A and SI (or a line end, where
    RFC 1922 resets the shift state) ESC ( B; the designation ESC $ ) A itself is dropped.
    """
    out: list[bytes] = []
    pos, shifted = 0, False
    for match in _SHIFT_OR_LINE_END.finditer(data):
        out.append(data[pos : match.start()])
        token = match.group()
        if token == b"\x0e":
            out.append(b"" if shifted else b"\x1b$A")
            shifted = True
        else:
            out.append(b"\x1b(B" if shifted else b"")
            shifted = False
            if token != b"\x0f":
                out.append(token)
        pos = match.end()
    out.append(data[pos:] + (b"\x1b(B" if shifted else b""))
    return b"".join(out).replace(b"\x1b$)A", b"")


def decode_iso2022(data: bytes) -> Decoded | None:
    """7-bit text carrying ISO 2022 escape sequences but no charset label (or a wrong one, such as
    us-ascii): the escapes say which charset it is. None without any escape sequence.

    Text with escapes that no codec reads (CNS 11643 in ISO-2022-CN, say) comes back unchanged and
    marked lossy, so the mail says it was not understood.
    """
    if b"\x1b" not in data or not _ISO2022_ESCAPE.search(data):
        return None
    g1 = set(_ISO2022_G1.findall(data))
    candidates: tuple[tuple[str, bytes], ...]
    if g1 == {b"C"}:
        candidates = (("iso2022_kr", data),)
    elif g1 == {b"A"}:
        candidates = (("iso2022_jp_2", _iso2022_cn_as_jp2(data)),)
    elif not g1:
        candidates = tuple((codec, data) for codec in _ISO2022_JP_CODECS)
    else:
        candidates = ()
    for codec, payload in candidates:
        try:
            return Decoded(payload.decode(codec), codec, "detected")
        except UnicodeDecodeError:
            continue
    return Decoded(data.decode("ascii"), "ascii", "lossy")


def decode(data: bytes, declared: str | None = None, *, hint: str | None = None) -> Decoded:
    """Decode ``data`` declared as ``declared``; ``hint`` is a charset seen elsewhere in the mail."""
    if data.isascii():
        # ASCII is a subset of every charset mail uses except UTF-7 / ISO-2022 (7-bit with escapes).
        codec = codec_for(declared)
        if codec is not None and (codec == "utf-7" or codec.startswith("iso2022")):
            try:
                return Decoded(data.decode(codec), codec, "declared")
            except UnicodeDecodeError:
                pass
        # Unlabelled, labelled us-ascii or with a label Python has no codec for (iso-2022-cn).
        return decode_iso2022(data) or Decoded(data.decode("ascii"), "ascii", "ascii")
    codec = codec_for(declared)
    if codec is not None and codec != "ascii":
        if codec in SINGLE_BYTE:
            # Latin text that is also valid multi-byte UTF-8 is practically non-existent, while UTF-8
            # mislabeled as Latin-1 is common; prefer UTF-8 then.
            try:
                return Decoded(data.decode("utf-8"), "utf-8", "detected")
            except UnicodeDecodeError:
                pass
            try:
                return Decoded(data.decode(codec), codec, "declared")
            except UnicodeDecodeError:
                # cp1252 leaves five bytes undefined; Latin-1 maps every byte, losing nothing.
                return Decoded(data.decode("latin-1"), "latin-1", "declared")
        try:
            return Decoded(data.decode(codec), codec, "declared")
        except UnicodeDecodeError:
            pass  # the declaration lies (or the data is damaged): fall through to detection
        if codec == "utf-8":
            # Damaged UTF-8, not another charset: at least as many well-formed multi-byte characters
            # as broken bytes (text in a legacy charset almost never forms valid UTF-8 sequences).
            # Detection would turn every character into mojibake; a lossy decode loses only the
            # broken bytes, and the caller records it.
            text = data.decode("utf-8", errors="replace")
            broken = text.count("\ufffd")
            if sum(1 for char in text if not char.isascii()) - broken >= broken:
                return Decoded(text, "utf-8", "lossy")
    try:
        return Decoded(data.decode("utf-8"), "utf-8", "utf-8")
    except UnicodeDecodeError:
        pass
    hinted = codec_for(hint)
    if hinted is not None and hinted not in SINGLE_BYTE and hinted not in {"ascii", "utf-8"}:
        try:
            return Decoded(data.decode(hinted), hinted, "detected")
        except UnicodeDecodeError:
            pass
    guessed = detect(data)
    if guessed is not None:
        try:
            return Decoded(data.decode(guessed), guessed, "detected")
        except UnicodeDecodeError:
            pass
    fallback = codec or guessed or "utf-8"
    return Decoded(data.decode(fallback, errors="replace"), fallback, "lossy")


# Raw 8-bit header text with no charset anywhere in the mail (a Chinese, Japanese or Korean client
# that writes its legacy charset straight into From and Subject). A dozen bytes is too little for
# statistics, so the legacy CJK charsets are tried in a fixed order, each with a strictness check:
# the bytes must decode without error AND every non-ASCII character must be one that text in that
# charset is made of. The order and the checks are chosen so that each charset's bytes fail the
# checks of the charsets tried before it:
#
# 1. GB18030, restricted to the GB2312 repertoire (the 6,763 common simplified hanzi and CJK
#    punctuation): Big5 text decodes as GBK, but its trail bytes 0x40-0x7E land outside GB2312 and
#    its frequent lead bytes 0xA4-0xAF land on kana, Greek or private-use rows; Shift_JIS kana and
#    most kanji have lead bytes 0x81-0x9F, outside GB2312.
# 2. Big5 (strict, without the HKSCS extensions): Shift_JIS lead bytes 0x81-0x9F are invalid in it.
# 3. Shift_JIS (cp932): hanzi, full-width kana and punctuation, but no half-width katakana (GB and
#    Big5 text decoded as Shift_JIS turns into half-width katakana).
# 4. EUC-KR (strict KS X 1001, not the cp949 extension whose rare Hangul GBK bytes decode to):
#    Hangul syllables and hanja.
#
# If no charset passes, a second round takes the first one that decodes strictly to CJK text at
# all (GBK text with a character outside GB2312 is still GBK). Known limit: EUC-KR Hangul bytes
# (0xB0A1-0xC8FE) are all valid GB2312 hanzi, and about one Big5 string of three characters in
# fifteen happens to be valid GB2312; without a charset in the mail such text comes out as GB18030
# (encoded words, or a charset on any body part, avoid the guess altogether).
def _in(code: int, *ranges: tuple[int, int]) -> bool:
    return any(low <= code <= high for low, high in ranges)


_HAN = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF))
_PUNCTUATION = (
    (0x3000, 0x303F),  # CJK symbols and punctuation
    (0xFF01, 0xFF5E),  # full-width ASCII
    (0xFFE0, 0xFFE6),  # full-width signs
    (0x2010, 0x203B),  # dashes, quotes, ellipsis, per mille, reference mark
    (0x00B7, 0x00B7),
    (0x00D7, 0x00D7),
    (0x00F7, 0x00F7),
    (0x2460, 0x24FF),  # circled numbers
    (0x25A0, 0x25FF),  # geometric shapes (■ ● ★ are in every CJK charset)
    (0x2605, 0x2606),
)
_KANA = ((0x3040, 0x30FF),)
_HANGUL = ((0xAC00, 0xD7A3),)
_BOPOMOFO = ((0x3100, 0x312F),)


def _gb2312(char: str) -> bool:
    try:
        char.encode("gb2312")
    except UnicodeEncodeError:
        return False
    return True


_CJK_CANDIDATES: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("gb18030", _HAN + _PUNCTUATION),
    ("big5", _HAN + _PUNCTUATION + _BOPOMOFO),
    ("cp932", _HAN + _PUNCTUATION + _KANA),
    ("euc_kr", _HAN + _PUNCTUATION + _HANGUL),
)


_LATIN_LOOKALIKE = re.compile(r"(?<![^\x00-\x7f])[^\x00-\x7f](?![^\x00-\x7f])")


def _latin_lookalike(text: str, codec: str) -> bool:
    """A lone CJK character that swallowed an ASCII letter as its trail byte, next to a letter.

    That is what Latin-1 text becomes ("Gérard": 0xE9 'r' is one Big5 hanzi between "G" and "ard");
    CJK text rarely has a single character wedged into a Latin word.
    """
    for match in _LATIN_LOOKALIKE.finditer(text):
        start, end = match.span()
        trail = match.group().encode(codec)[-1:]
        touches = (start > 0 and text[start - 1].isalpha()) or (end < len(text) and text[end].isalpha())
        if trail.isalpha() and touches:
            return True
    return False


def _plausible(text: str, codec: str, allowed: tuple[tuple[int, int], ...], *, strict: bool) -> bool:
    wide = [c for c in text if not c.isascii()]
    if not wide or any(not c.isprintable() for c in text if c not in "\t"):
        return False
    if not all(_in(ord(c), *allowed) for c in wide) or _latin_lookalike(text, codec):
        return False
    return not (strict and codec == "gb18030" and not all(_gb2312(c) for c in wide))


def decode_unlabeled_cjk(data: bytes) -> Decoded | None:
    """Raw 8-bit text with no charset known: UTF-8, else a legacy CJK charset that passes its checks.

    None when nothing passes (the caller falls back to statistical detection).
    """
    try:
        return Decoded(data.decode("utf-8"), "utf-8", "utf-8")
    except UnicodeDecodeError:
        pass
    decoded: list[tuple[str, str, tuple[tuple[int, int], ...]]] = []
    for codec, allowed in _CJK_CANDIDATES:
        try:
            decoded.append((codec, data.decode(codec), allowed))
        except UnicodeDecodeError:
            continue
    for strict in (True, False):
        for codec, text, allowed in decoded:
            if _plausible(text, codec, allowed, strict=strict):
                return Decoded(text, codec, "detected")
    return None

"""Bytes to text for mail: declared charsets, charsets that are missing, and charsets that lie.

Order of trust: the declared charset (mapped to the superset real clients actually use), then
UTF-8, then statistical detection (charset-normalizer), and only as a last resort a lossy decode,
which the caller records in ``extra``. The raw bytes are archived by the store either way.
"""

from __future__ import annotations

import codecs
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
_SINGLE_BYTE = (
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
        return Decoded(data.decode("ascii"), "ascii", "ascii")
    codec = codec_for(declared)
    if codec is not None and codec != "ascii":
        if codec in _SINGLE_BYTE:
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
    try:
        return Decoded(data.decode("utf-8"), "utf-8", "utf-8")
    except UnicodeDecodeError:
        pass
    hinted = codec_for(hint)
    if hinted is not None and hinted not in _SINGLE_BYTE and hinted not in {"ascii", "utf-8"}:
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

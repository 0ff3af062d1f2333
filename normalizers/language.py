"""The language of a message, guessed from the script and a few common words (every channel).

Run once for every channel by :func:`normalizers.content.finish`; a normalizer that knows better
(the web form's Accept-Language) sets ``language`` itself and the guess is skipped.
"""

from __future__ import annotations

import re

_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")
_HAN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Bytes that are not part of a word (anything but a-z and '), for splitting lowercased text.
_NOT_WORD = bytes(c if chr(c) in "abcdefghijklmnopqrstuvwxyz'" else 0x20 for c in range(256))


def detect(text: str) -> str | None:
    """A cheap guess from the script of the first few thousand characters.

    Counting stays in C: CJK characters with compiled character classes (only when the sample is
    not ASCII), Latin letters and words with bytes methods. A loop over the characters in Python
    was half of the whole normalizer's time on a plain 5 KB mail; four ``findall`` passes a quarter.
    """
    sample = text[:2000]
    if sample.isascii():
        kana = hangul = han = 0
    else:
        kana, hangul = len(_KANA.findall(sample)), len(_HANGUL.findall(sample))
        han = len(_HAN.findall(sample))
    # [A-Za-z] are ASCII: drop everything else, then count what deleting the letters removes.
    ascii_part = sample.encode("ascii", "ignore")
    latin = len(ascii_part) - len(ascii_part.translate(None, _ASCII_LETTERS))
    if kana and kana * 10 >= han:
        return "ja"
    if hangul and hangul >= han:
        return "ko"
    if han and han * 4 >= latin:
        return "zh"
    if latin >= 20:
        # The words of [a-z']+ in the lowercased sample: in UTF-8 every other character, multi-byte
        # ones included, is made of bytes that become separators.
        words = sample.lower().encode("utf-8", "surrogatepass").translate(_NOT_WORD).split()
        common = sum(map(_ENGLISH_BYTES.__contains__, words))
        if words and common * 100 >= len(words) * 15:
            return "en"
    return None


# fmt: off
_ENGLISH = frozenset(
    (
        "the", "a", "an", "and", "or", "to", "of", "in", "on", "for", "is", "are", "was", "be",
        "it", "i", "you", "we", "my", "your", "this", "that", "with", "have", "has", "not", "please",
        "thanks", "thank", "hi", "hello", "can", "could", "would", "will", "from", "at", "as", "if",
        "but", "me", "our", "do",
    )
)
_ENGLISH_BYTES = frozenset(word.encode() for word in _ENGLISH)
# fmt: on

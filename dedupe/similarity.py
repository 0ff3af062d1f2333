"""Normalised-text similarity for duplicate touchpoints (the same complaint sent twice).

Text is folded (NFKC, case, punctuation and whitespace runs become one space) and CJK characters are
spaced apart so they compare character by character, as words do in other scripts. Similarity is
rapidfuzz's plain ``ratio`` (normalised Indel distance) on the folded text: ``token_set_ratio`` would
call "my order is late" a 100 % match of "my order is late and my refund is missing", which would
merge two different problems.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from rapidfuzz import fuzz

# Texts shorter than this after folding are never duplicates: "ok", "thanks", "hello?" repeat legitimately.
MIN_CHARS = 12
MAX_CHARS = 2000  # compared prefix; enough to tell two messages apart, bounded cost

_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f])")
_NOT_WORD = re.compile(r"[\W_]+")
# For ASCII text: NFKC changes nothing, casefold is lower(), and [\W_] is every non-alphanumeric.
_ASCII_NOT_WORD = str.maketrans({chr(c): " " for c in range(128) if not chr(c).isalnum()})


# Placement folds a message's text twice (to look for a duplicate, then to remember it).
@functools.lru_cache(maxsize=64)
def normalize_text(text: str | None) -> str:
    """Folded text for comparison; empty when there is nothing to compare."""
    if not text:
        return ""
    text = text[: MAX_CHARS * 2]
    if text.isascii():
        return " ".join(text.lower().translate(_ASCII_NOT_WORD).split())[:MAX_CHARS]
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = _CJK.sub(r" \1 ", folded)
    return " ".join(_NOT_WORD.sub(" ", folded).split())[:MAX_CHARS]


def similarity(a: str, b: str) -> float:
    """0..100 on already normalised texts."""
    return float(fuzz.ratio(a, b))


def is_duplicate(a: str, b: str, threshold: float, min_chars: int = MIN_CHARS) -> bool:
    """Whether two normalised texts are the same content (both long enough, similar enough)."""
    if len(a) < min_chars or len(b) < min_chars:
        return False
    return fuzz.ratio(a, b, score_cutoff=threshold) > 0

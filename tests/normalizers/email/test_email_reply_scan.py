"""Reply extraction's one-scan search for candidate lines cuts where the line-by-line loop cut.

The reference below is the loop it replaced (every line stripped and offered to ``_may_cut``). Both
run on the text of every mail of the fixtures and corpora, and on edge cases for the scan: Unicode
blanks before a marker, case folding, non-ASCII digits, CR line ends, the line cap.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import NormalizationError
from normalizers.email import normalize_email
from normalizers.email.reply import _BLANK_RUNS, _MAX_LINES, _cuts_at, _may_cut, extract_reply
from tests.support.corpora import email_corpus_mails
from tests.support.mailkit import envelope

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "email"


def reference(text: str) -> str | None:
    """extract_reply as it was: every line stripped and tried in a Python loop."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[:_MAX_LINES]
    cut = len(lines)
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped and _may_cut(stripped) and _cuts_at(lines, index):
            cut = index
            break
    kept = lines[:cut]
    if ">" in text:
        kept = [line for line in kept if not line.lstrip().startswith(">")]
    result = "\n".join(line.rstrip() for line in kept)
    if "\n\n\n" in result:
        result = _BLANK_RUNS.sub("\n\n", result)
    return result.strip() or None


QUOTE = "On Mon, 1 Jan 2024 at 10:00, Alice <a@example.com> wrote:\n> old text\n"

EDGES = [
    "",
    "\n",
    "-- \nsig",
    "Thanks\n-- \nsig",
    "Thanks\n\u3000-- \nsig",  # ideographic space before the signature marker
    "Thanks\n\xa0\xa0On Monday Bob wrote:\n> x",
    "Thanks\n\x1c\x1d\x85" + QUOTE,  # blanks to str.strip that are no line ends to str.split("\n")
    "Thanks\n\u2028" + QUOTE,
    "Thanks\n\t ON MONDAY BOB WROTE:\n> x",
    "Thanks\n\u017fent from my phone",  # long s folds to "s" under IGNORECASE
    "Thanks\n\u0662\u0660\u0662\u0664-01-08 10:00 Bob wrote:\n> x",  # Arabic-Indic digits
    "Thanks\n12 apples\n2024-01-08 10:00 Bob wrote:\n> x",
    "Thanks\r\n\r\n" + QUOTE.replace("\n", "\r\n"),
    "Thanks\r" + QUOTE.replace("\n", "\r"),
    "From: Bob\nSent: Monday\n",  # a header block at the very first line
    "Hello\nFrom: Bob\nnothing after\n",
    "a\n" * (_MAX_LINES + 5) + "-- \nsig",  # a marker past the line cap is not seen
    "a\n" * (_MAX_LINES - 2) + "-- \nsig",
    "Hi\n\n\n\n> quoted\n  > quoted too\nend  \n",
    "________________\nFrom: x\nTo: y\n",
    '在 2024年1月1日 星期一, "x" <x@qq.com> 写道：\n> old',
    "Hi\n 发自我的iPhone",
]


@pytest.mark.parametrize("text", EDGES)
def test_edge_cases_cut_where_the_loop_cut(text: str) -> None:
    assert extract_reply(text) == reference(text)


def _texts() -> list[str]:
    """The text of every fixture mail, and of every corpus mail when the corpora are present."""
    texts = []
    for path in [*sorted(FIXTURES.glob("*.eml")), *email_corpus_mails()]:
        try:
            [message] = normalize_email(envelope(path.read_bytes()))
        except NormalizationError:
            continue
        if message.text:
            texts.append(message.text)
    return texts


def test_every_fixture_and_corpus_mail_cuts_where_the_loop_cut() -> None:
    texts = _texts()
    assert len(texts) >= 10  # the fixtures alone; the corpora add some 200
    for text in texts:
        assert extract_reply(text) == reference(text)
        # The same text with CRLF and with lines indented by Unicode blanks.
        assert extract_reply(text.replace("\n", "\r\n")) == reference(text.replace("\n", "\r\n"))
        indented = text.replace("\n", "\n\u3000 ")
        assert extract_reply(indented) == reference(indented)

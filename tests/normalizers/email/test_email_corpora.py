"""Every mail of the public corpora yields a message or a NormalizationError, never anything else."""

from __future__ import annotations

import pytest

from core.errors import NormalizationError
from normalizers.email import normalize_email
from tests.support.corpora import CORPORA, EMAIL_CORPORA
from tests.support.mailkit import envelope


@pytest.mark.parametrize("corpus", sorted(EMAIL_CORPORA))
def test_corpus_never_crashes(corpus: str) -> None:
    root = CORPORA / corpus
    if not root.is_dir():
        pytest.skip(f"corpus {root} not present")
    mails = sorted(root.glob(EMAIL_CORPORA[corpus]))
    assert mails
    unexpected: list[str] = []
    for path in mails:
        try:
            messages = normalize_email(envelope(path.read_bytes()))
        except NormalizationError as exc:
            # A quarantine is allowed, but not for a bug of ours hidden behind the safety net.
            if "unexpected" in str(exc):
                unexpected.append(f"{path.name}: {exc}")
            continue
        assert len(messages) == 1, path
    assert not unexpected


def test_every_disagreement_of_the_conformance_runner_is_explained() -> None:
    # A new disagreement (a regression, or a fix that moved one) must be looked at and either fixed
    # or explained in bench/conformance_email.py; a stale explanation is listed too.
    from bench.conformance_email import CORPORA as RUNNERS
    from bench.conformance_email import EXPLAINED, Report, explanation

    if not all((CORPORA / name).is_dir() for name in RUNNERS):
        pytest.skip(f"corpora not present under {CORPORA}")
    report = Report()
    for name, runner in RUNNERS.items():
        runner(CORPORA / name, report)
    misses = {(file, field) for field, tally in report.fields.items() for file, _, _ in tally.misses}
    assert not report.crashed
    assert sorted(m for m in misses if explanation(*m) is None) == []
    assert sorted(set(EXPLAINED) - {(file.split("#", 1)[0], field) for file, field in misses}) == []

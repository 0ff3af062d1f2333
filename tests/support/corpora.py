"""Where the shared test corpora are: ``$TICKETGATE_CORPORA``, else ``shared/corpora`` beside the checkout.

The corpora are other projects' material (some AGPL): read in place, never copied into this repo.
Tests that use them skip cleanly when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPORA = Path(os.environ.get("TICKETGATE_CORPORA", ROOT.parent / "shared" / "corpora"))

# The mail corpora, and where their mails are inside each.
EMAIL_CORPORA = {
    "zammad": "mail/*.box",
    "mikel_mail": "emails/**/*.eml",
    "django_helpdesk": "test_files/*.eml",
}


def email_corpus_mails() -> list[Path]:
    """Every mail of the email corpora that are present (none when the folder is absent)."""
    return [
        path for corpus, pattern in EMAIL_CORPORA.items() for path in sorted((CORPORA / corpus).glob(pattern))
    ]

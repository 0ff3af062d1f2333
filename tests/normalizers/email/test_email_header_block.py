"""The header-block repair finds the end of the headers where it found it before it stopped
scanning the body for a bare-LF blank line that comes after the CRLF one (the reference below is
the search as it was)."""

from __future__ import annotations

import pytest

from normalizers.email.parse import _header_end


def reference(raw: bytes) -> int:
    """The header end as it was found before: both blank-line forms searched through the whole body."""
    found = [e for e in (raw.find(b"\n\r\n"), raw.find(b"\n\n")) if e >= 0]
    return min(found, default=len(raw))


@pytest.mark.parametrize(
    "raw",
    [
        b"From: a@example.com\r\nSubject: x\r\n\r\nbody\n\nmore\n\n",
        b"From: a@example.com\nSubject: x\n\nbody\r\n\r\nmore",
        b"From: a@example.com\r\nbroken line\r\nSubject: x\n\nbody\r\n\r\n",
        b"From: a@example.com\r\nbroken line\r\nSubject: x\r\n\r\nbody\n\nstray: x\n\n",
        b"From: a@example.com\r\nbroken line\nSubject: x\r\n\r\n",
        b"From: a@example.com\r\nSubject: no blank line at all",
        b"From: a@example.com\r\nbroken\r\nSubject: no blank line at all\n",
        b"From: a@example.com\n\n\r\nbody",  # the bare-LF blank line overlaps the CRLF one
        b"From: a@example.com\r\n\n\r\nbody",
        b"\r\n\r\nbody first",
        b"\n\nbody first",
        b"\n\r\n",
        b"",
    ],
)
def test_the_header_end_is_where_it_was(raw: bytes) -> None:
    assert _header_end(raw) == reference(raw)

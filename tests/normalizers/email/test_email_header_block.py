"""The header-block repair gives what it gave before it stopped scanning the body for a bare-LF
blank line that comes after the CRLF one (the reference below is the function as it was)."""

from __future__ import annotations

import pytest

from normalizers.email.parse import _HEADER_LINE, _repair_header_block


def reference(raw: bytes) -> tuple[bytes, int]:
    end = raw.find(b"\n\r\n")
    end2 = raw.find(b"\n\n")
    end = min(e for e in (end, end2, len(raw)) if e >= 0)
    head = raw[: end + 1]
    lines = head.splitlines(keepends=True)
    if all(_HEADER_LINE.match(line) or line[:1] in b" \t" for line in lines[1:]):
        return raw, 0
    last_field = max(i for i, line in enumerate(lines) if _HEADER_LINE.match(line)) if lines else -1
    repaired: list[bytes] = []
    repairs = 0
    for index, line in enumerate(lines):
        is_field = _HEADER_LINE.match(line) is not None
        if is_field or line[:1] in b" \t" or index > last_field or (index == 0 and line.startswith(b"From ")):
            repaired.append(line)
        elif repaired and any(_HEADER_LINE.match(r) for r in repaired):
            repaired.append(b" " + line)
            repairs += 1
        else:
            repairs += 1
    return b"".join(repaired) + raw[end + 1 :], repairs


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
        b"\r\n\r\nbody first",
        b"\n\nbody first",
        b"\n\r\n",
        b"",
    ],
)
def test_header_block_repair_is_unchanged(raw: bytes) -> None:
    assert _repair_header_block(raw) == reference(raw)

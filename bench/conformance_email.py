"""Conformance of the email normalizer against three public corpora with expected values.

Runs every mail of ``../shared/corpora/{zammad,mikel_mail,django_helpdesk}`` (or ``--corpora DIR``)
through ``normalize_email``, compares what the other projects' test suites expect, prints per-field
agreement and every disagreement, and the mean normalization time per mail. Figures, not pass/fail.

    .venv/bin/python bench/conformance_email.py [--corpora ../shared/corpora] [--quiet]

Comparison rules (the deliberate differences from the other products are documented in ``RULES``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import NormalizationError
from core.model import CanonicalMessage, RawEnvelope
from normalizers.email import normalize_email
from normalizers.email.addresses import normalize_address

RULES = """\
- addresses: compared after our normalization on both sides (domain lowercased and IDNA-decoded,
  local part kept); an expected value that is not an addr-spec at all counts as "no address".
- Zammad stores the HTML alternative of the body as an attachment "message.html"; ticketgate keeps it
  in the `html` field, so those entries are left out of the attachment comparison.
- django-helpdesk truncates long titles and appends "..."; a title ending in "..." is compared as a prefix.
- subjects are compared exactly, whitespace included (a stray leading space is a bug, not noise).
- Zammad (Ruby mail gem) stores "text" attachments as strings with LF line ends; for mails whose
  expected attachments are text, our bytes are compared with CRLF turned into LF as well (the
  normalizer itself keeps the decoded bytes exactly as sent).
- django-helpdesk saves the HTML alternative as an attachment and prefixes stored attachment names
  with "part-<n>_"; both are left out of the comparison.
- every remaining disagreement is listed with the deliberate choice behind it (``EXPLAINED``); one
  without an explanation is printed as UNEXPLAINED and counted, so a regression cannot hide there.
"""

# Every known disagreement: (file, field) -> why ticketgate deliberately differs. Sizes of the Ruby
# mail gem corpus carry a "#<index>" suffix in the file name; it is ignored here.
_FORWARD_AS_ONE = (
    "a forwarded mail (message/rfc822) is one attachment, the embedded mail itself; the mail gem also "
    "lists the attachments inside it (here broken.pdf), which ticketgate leaves inside the .eml"
)
_FORWARD_BYTES = (
    "a forwarded mail is stored as the embedded mail serialized from the parsed tree with its headers "
    "exactly as received (no refolding); Zammad stores the mail gem's re-encoding (refolded headers, "
    "trimmed end), so the bytes differ by a few line ends"
)
_APPLE_HTML = (
    "Apple Mail splits one HTML body into several text/html parts of a multipart/mixed; ticketgate "
    "joins them into `html` (and `text`), Zammad keeps the first and stores the rest as document.html"
)
_NO_CONTENT_TYPE = (
    "a part without Content-Type is text/plain (RFC 2045 section 5.2), so this fax notice is the body "
    'text; Zammad stores it as an attachment named "file"'
)
_BETTER_DECODING = (
    "ticketgate decodes the file name correctly (a detected charset; or windows-1258, which writes "
    "accents as combining marks: e + U+0301); the expected value is the other product's "
    "mis-decoding (U+FFFD or mojibake)"
)
EXPLAINED: dict[tuple[str, str], str] = {
    ("mikel/emails/attachment_emails/attachment_message_rfc822.eml", "attachment count"): _FORWARD_AS_ONE,
    ("mikel/emails/attachment_emails/attachment_message_rfc822.eml", "attachment sizes"): _FORWARD_AS_ONE,
    ("mikel/emails/attachment_emails/attachment_message_rfc822_inline_image.eml", "attachment sizes"): (
        "ticketgate stores the embedded mail as its part's bytes as sent (1,808: a truncated mail, a "
        "multipart without parts); the mail gem's 1,815 is its own re-encoding of it"
    ),
    ("zammad/mail014.box", "attachment hashes"): _FORWARD_BYTES,
    ("zammad/mail014.box", "attachment sizes"): _FORWARD_BYTES,
    ("zammad/mail055.box", "attachment hashes"): _FORWARD_BYTES,
    ("zammad/mail055.box", "attachment sizes"): _FORWARD_BYTES,
    ("zammad/mail085.box", "attachment hashes"): _APPLE_HTML,
    ("zammad/mail085.box", "attachment names"): _APPLE_HTML,
    ("zammad/mail085.box", "attachment sizes"): _APPLE_HTML,
    ("zammad/mail087.box", "attachment hashes"): _NO_CONTENT_TYPE,
    ("zammad/mail087.box", "attachment names"): _NO_CONTENT_TYPE,
    ("zammad/mail087.box", "attachment sizes"): _NO_CONTENT_TYPE,
    ("zammad/mail064.box", "attachment names"): _BETTER_DECODING,
    ("zammad/mail073.box", "attachment names"): _BETTER_DECODING,
    ("mikel/emails/attachment_emails/attachment_with_encoded_name.eml", "attachment names"): _BETTER_DECODING,
    ("zammad/mail102.box", "attachment names"): (
        "the sender gave two files the same name; ticketgate never renames a name the sender chose "
        "(only made-up names of nameless parts are made unique); Zammad inserts a counter into the second"
    ),
    ("zammad/mail035.box", "sender address"): (
        'the From is only a quoted string holding an address ("a@b"), no angle-addr: free text, so no '
        "address for either side; ticketgate then takes the Reply-To, as for any mail without a usable "
        "From (a claim, flagged from_fallback); Zammad leaves the sender without an address"
    ),
    ("zammad/mail019.box", "sender name"): (
        'From: "我" <> has no address; ticketgate keeps the display name and takes the address from '
        "Sender/Reply-To/Return-Path (flagged from_fallback); Zammad drops the name with the address"
    ),
    ("zammad/mail046.box", "sender name"): (
        "raw 8-bit GBK display name, the body declares iso-8859-1: ticketgate tries the legacy CJK "
        "charsets with strictness checks and gets 武兰成 (GBK, like the subject that both sides read "
        "as GBK); Zammad decodes it as Latin (ÎäŔźłÉ)"
    ),
    ("zammad/mail076.box", "sender name"): (
        'malformed From ("…transfer"@example.com>): no valid address, so no name is taken from it '
        "either (a spoofing rule); Zammad keeps the broken text as the name"
    ),
    ("zammad/mail087.box", "sender name"): (
        "From: Test test@example.com (no angle brackets) is not a valid mailbox; ticketgate takes "
        "neither address nor name from it; Zammad makes the whole line the name"
    ),
    ("zammad/mail092.box", "sender name"): (
        "the comment in MAILER-DAEMON (Mail Delivery System) <…> is kept in the display name, as mail "
        "clients show it; the mail gem drops comments"
    ),
    ("zammad/mail018.box", "subject"): (
        "the subject is in UTF-7 (+ANw- is Ü); ticketgate decodes it and turns tabs into spaces; "
        "Zammad leaves the UTF-7 undecoded"
    ),
    ("zammad/mail027.box", "subject"): (
        "the first encoded word starts with an encoded CRLF; a line break cannot be part of a one-line "
        "subject, so ticketgate drops it at the ends; Zammad keeps it"
    ),
    ("django/test_files/utf-nondecodable.eml", "text"): (
        "in this copy the plain part decodes cleanly as UTF-8 and differs from the HTML part (it is a "
        "forward); ticketgate keeps the sender's plain alternative in `text` (HTML only when the plain "
        "part is blank or lossy). django-helpdesk's reply parser discards the forward as quoted "
        "history and falls back to the HTML, which is where 'prosazuje lepší' is"
    ),
    ("mikel/emails/error_emails/multiple_references_with_one_invalid.eml", "threading"): (
        "two References headers (one broken): ticketgate keeps every valid id from both for threading; "
        "the mail gem reads only the first header"
    ),
}


def explanation(file: str, field_name: str) -> str | None:
    return EXPLAINED.get((file.split("#", 1)[0], field_name))


@dataclass
class Tally:
    agree: int = 0
    total: int = 0
    misses: list[tuple[str, Any, Any]] = field(default_factory=list)

    def check(self, name: str, expected: Any, got: Any, same: bool | None = None) -> None:
        self.total += 1
        if same if same is not None else expected == got:
            self.agree += 1
        else:
            self.misses.append((name, expected, got))


@dataclass
class Report:
    fields: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    crashed: list[tuple[str, str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    mails: int = 0


def _envelope(data: bytes) -> RawEnvelope:
    return RawEnvelope(
        channel="email", tenant="bench", inbox="support@example.com", body=data, received_at=datetime.now(UTC)
    )


def run(path: Path, report: Report) -> CanonicalMessage | None:
    data = path.read_bytes()
    report.mails += 1
    started = time.perf_counter()
    try:
        message = normalize_email(_envelope(data))[0]
    except NormalizationError as exc:
        report.quarantined.append((str(path), str(exc)))
        return None
    except Exception as exc:  # the one thing that must never happen: counted and listed
        report.crashed.append((str(path), f"{type(exc).__name__}: {exc}"))
        return None
    finally:
        report.times.append(time.perf_counter() - started)
    return message


def _addr(value: str | None) -> str | None:
    return normalize_address(value) if value else None


def _addresses(header: str | None) -> list[str]:
    if not header:
        return []
    return sorted(a for _, raw in getaddresses([header]) if (a := _addr(raw)))


def _sender(message: CanonicalMessage) -> str | None:
    return message.identities[0].value if message.identities else None


def _names(message: CanonicalMessage) -> list[str]:
    return sorted(a.name for a in message.attachments)


def zammad(root: Path, report: Report) -> None:
    for box in sorted((root / "mail").glob("*.box")):
        expected_path = root / "expected_json" / (box.stem + ".expected.json")
        message = run(box, report)
        if message is None or not expected_path.exists():
            continue
        expected = json.loads(expected_path.read_text(encoding="utf-8"))
        name = f"zammad/{box.name}"
        fields = report.fields
        fields["sender address"].check(name, _addr(expected["from_email"]), _sender(message))
        fields["sender name"].check(name, expected["from_display_name"] or None, message.display_name)
        fields["subject"].check(name, expected["subject"] or None, message.subject)
        want_rcpt = sorted(_addresses(expected.get("to")) + _addresses(expected.get("cc")))
        got_rcpt = sorted([*message.extra.get("to", []), *message.extra.get("cc", [])])
        fields["recipients"].check(name, want_rcpt, got_rcpt)
        attachments = [
            a
            for a in expected.get("attachments", [])
            if not (a["filename"] == "message.html" and a["preferences"].get("content-alternative"))
        ]
        fields["attachment names"].check(name, sorted(a["filename"] for a in attachments), _names(message))
        # Zammad keeps "text" attachments as strings with LF line ends; compare ours the same way.
        as_text = any(a["data_kind"] == "text" for a in attachments)
        got_data = [a.data.replace(b"\r\n", b"\n") if as_text else a.data for a in message.attachments]
        want_sizes = sorted(a["size"] for a in attachments)
        fields["attachment sizes"].check(name, want_sizes, _match_sizes(attachments, message))
        got_md5 = {hashlib.md5(d).hexdigest() for d in got_data} | {
            hashlib.md5(a.data).hexdigest() for a in message.attachments
        }
        want_md5 = {a["md5"] for a in attachments}
        fields["attachment hashes"].check(name, sorted(want_md5 - got_md5), [], want_md5 <= got_md5)


def _match_sizes(expected: list[dict[str, Any]], message: CanonicalMessage) -> list[int]:
    """Our sizes, each taken as its LF-only size when that is what a "text" expectation matches."""
    pool = list(message.attachments)
    sizes: list[int] = []
    for want in expected:
        for attachment in pool:
            lf_size = len(attachment.data.replace(b"\r\n", b"\n"))
            if attachment.size == want["size"] or (want["data_kind"] == "text" and lf_size == want["size"]):
                sizes.append(want["size"])
                pool.remove(attachment)
                break
    sizes.extend(a.size for a in pool)
    return sorted(sizes)


def mikel(root: Path, report: Report) -> None:
    curated = json.loads((root / "expected_curated.json").read_text(encoding="utf-8"))
    for eml in sorted((root / "emails").rglob("*.eml")):
        key = eml.relative_to(root).as_posix()
        message = run(eml, report)
        expected = curated.get(key)
        if message is None or not isinstance(expected, dict):
            continue
        name, fields = f"mikel/{key}", report.fields
        if "to" in expected:
            fields["recipients"].check(
                name, sorted(_addr(a) for a in expected["to"]), sorted(message.extra.get("to", []))
            )
        if "from" in expected:
            fields["sender address"].check(name, _addr(expected["from"][0]), _sender(message))
        if "from_address" in expected:
            fields["sender address"].check(name, _addr(expected["from_address"]), _sender(message))
        if "from_display_names" in expected:
            fields["sender name"].check(name, expected["from_display_names"][0], message.display_name)
        if "subject" in expected:
            fields["subject"].check(name, expected["subject"], message.subject)
        if "attachment_count" in expected:
            fields["attachment count"].check(name, expected["attachment_count"], len(message.attachments))
        if "attachment_filenames" in expected:
            fields["attachment names"].check(name, sorted(expected["attachment_filenames"]), _names(message))
        for index in range(4):
            size = expected.get(f"attachment_{index}_decoded_length")
            if size is not None:
                got = message.attachments[index].size if index < len(message.attachments) else None
                fields["attachment sizes"].check(f"{name}#{index}", size, got)
        if "attachment_0_inline" in expected:
            got_inline = message.attachments[0].inline if message.attachments else None
            fields["attachment inline"].check(name, expected["attachment_0_inline"], got_inline)
        if "reply_in_reply_to" in expected:
            fields["threading"].check(name, expected["reply_in_reply_to"], message.external_id)
        if "reply_references" in expected:
            got_refs = [*message.references, message.external_id]
            fields["threading"].check(name, expected["reply_references"], got_refs)
        if "references" in expected:
            fields["threading"].check(name, [expected["references"]], list(message.references))
        if expected.get("in_reply_to_blank"):
            fields["threading"].check(name, None, message.in_reply_to)
        for text_key in ("decoded_body", "decoded_body_chomped"):
            if text_key in expected:
                fields["text"].check(name, expected[text_key].strip(), (message.text or "").strip())
        _mikel_dsn(name, expected, message, fields)


def _mikel_dsn(
    name: str, expected: dict[str, Any], message: CanonicalMessage, fields: dict[str, Tally]
) -> None:
    dsn = message.extra.get("dsn") or {}
    if "bounced" in expected:
        bounced = message.auto_generated == "bounce" and dsn.get("action") == "failed"
        fields["dsn"].check(f"{name}:bounced", expected["bounced"], bounced)
    pairs = {
        "action": "action",
        "error_status": "status",
        "final_recipient": "final_recipient",
        "diagnostic_code": "diagnostic_code",
        "remote_mta": "remote_mta",
    }
    for theirs, ours in pairs.items():
        if theirs in expected:
            fields["dsn"].check(f"{name}:{theirs}", expected[theirs], dsn.get(ours))


def django(root: Path, report: Report) -> None:
    curated = json.loads((root / "expected_curated.json").read_text(encoding="utf-8"))
    for eml in sorted((root / "test_files").glob("*.eml")):
        key = eml.relative_to(root).as_posix()
        message = run(eml, report)
        expected = curated.get(key)
        if message is None or not isinstance(expected, dict):
            continue
        name, fields = f"django/{key}", report.fields
        title = expected.get("title")
        if title is not None:
            got = message.subject or ""
            same = got.startswith(title[:-3]) if title.endswith("...") else got == title
            fields["subject"].check(name, title, message.subject, same)
        text = (message.text or "").strip()
        if "description" in expected:
            fields["text"].check(name, expected["description"], text)
        if "description_stripped" in expected:
            fields["text"].check(name, expected["description_stripped"], text)
        if "description_contains" in expected:
            fields["text"].check(
                name, expected["description_contains"], text, expected["description_contains"] in text
            )
        if "attachment_filename" in expected:
            # django-helpdesk prefixes stored names with "part-<n>_"; the sender's name is the rest.
            want_name = re.sub(r"^part-\d+_", "", expected["attachment_filename"])
            fields["attachment names"].check(name, [want_name], _names(message))
        if "attachment_content" in expected:
            want = hashlib.sha256(expected["attachment_content"].encode()).hexdigest()
            got_hashes = [a.sha256 for a in message.attachments]
            fields["attachment hashes"].check(name, want, got_hashes, want in got_hashes)
        if "attachment_count" in expected:
            # django-helpdesk saves the HTML alternative as an attachment; ticketgate keeps it in `html`.
            count = expected["attachment_count"] - (1 if "html_attachment_contains" in expected else 0)
            fields["attachment count"].check(name, count, len(message.attachments))


CORPORA: dict[str, Callable[[Path, Report], None]] = {
    "zammad": zammad,
    "mikel_mail": mikel,
    "django_helpdesk": django,
}


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def print_report(report: Report, *, quiet: bool, out: Callable[[str], None] = print) -> None:
    out(f"mails: {report.mails}, quarantined: {len(report.quarantined)}, crashed: {len(report.crashed)}")
    if report.times:
        mean = statistics.fmean(report.times) * 1000
        median = statistics.median(report.times) * 1000
        out(f"normalize_email: mean {mean:.2f} ms/mail, median {median:.2f} ms/mail")
    out("")
    out(f"{'field':<20} {'agree':>6} {'total':>6} {'%':>7}")
    for name in sorted(report.fields):
        tally = report.fields[name]
        out(f"{name:<20} {tally.agree:>6} {tally.total:>6} {100 * tally.agree / max(tally.total, 1):>6.1f}%")
    for path, reason in report.quarantined:
        out(f"QUARANTINED {path}: {reason}")
    for path, reason in report.crashed:
        out(f"CRASHED {path}: {reason}")
    if not quiet:
        out("\ndisagreements (file, field, expected, got):")
        unexplained = 0
        for name in sorted(report.fields):
            for file, expected, got in report.fields[name].misses:
                out(f"  {file} | {name} | {_short(expected)} | {_short(got)}")
                why = explanation(file, name)
                unexplained += why is None
                out(f"      -> {why}" if why else "      -> UNEXPLAINED")
        out(f"\nunexplained disagreements: {unexplained}")
        out("\ncomparison rules:\n" + RULES)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    default = Path(__file__).resolve().parents[2] / "shared" / "corpora"
    parser.add_argument("--corpora", type=Path, default=default)
    parser.add_argument("--quiet", action="store_true", help="figures only, no list of disagreements")
    args = parser.parse_args(list(argv) if argv is not None else None)
    report = Report()
    for folder, runner in CORPORA.items():
        root = args.corpora / folder
        if root.is_dir():
            runner(root, report)
        else:
            print(f"skipped {folder}: {root} not found")
    print_report(report, quiet=args.quiet)
    return 1 if report.crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())

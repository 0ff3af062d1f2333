"""Extraction and routing enrichment: microseconds per message, with and without the pre-checks.

Usage: python bench/enrich.py [--rounds N] [--base DIR]

The texts are those the gateway enriches:
- every mail of the email corpora (``../shared/corpora``, when present) and of the test fixtures,
  parsed by the email normalizer (subject + text, as the pipeline passes them);
- 5 KB of English prose with dates, prices and a phone number;
- 5 KB of Chinese customer-service text with an order number;
- smtp-source's body (``bench/smtp_ingest.py`` load): 5 KB of "X" lines, each after its number;
- the Node-RED peer's API message (``../shared/peer/api.lua``): 680 characters of English.

Each set runs through the default extractors with the example config's routing rules, once with the
extractors' pre-checks (``requires``, ``digit_run``) and once with them removed (the baseline: every
regex over the whole text), alternating rounds, so that both figures come from the same minutes on
a noisy machine. With ``--base DIR`` the baseline is instead the enricher of another tree
(``DIR/gateway/enrich.py``, e.g. a ``git archive`` of the commit before a change), loaded beside
this one in the same process: a before/after of a change to the module. The phone-number cache is
emptied before every message: a number repeated within one message (quoted replies) is found in it,
one seen in an earlier message is not, which is the gateway's least favourable case.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.errors import NormalizationError  # noqa: E402
from core.model import CanonicalMessage, Identity, RawEnvelope  # noqa: E402
from core.settings import Settings  # noqa: E402
from gateway.enrich import DEFAULT_EXTRACTORS, Enricher, _e164  # noqa: E402
from normalizers.email import normalize_email  # noqa: E402
from tests.support.corpora import email_corpus_mails  # noqa: E402

_ENGLISH = (
    "Hello team,\n\nI ordered a standing desk on 12 March 2026 and it still has not arrived. The "
    "confirmation said it would ship within 5 working days, and I paid 489.00 EUR plus 25.00 for "
    "delivery. Could you please tell me where it is? You can reach me at +1 415-555-2671 between "
    "9am and 5pm. Many thanks, and kind regards,\nJane Doe\n\n"
)
_CHINESE = (
    "您好，我在3月12日下的订单到现在还没有收到，订单号：123456789012345678。物流信息一直没有更新，"
    "请帮忙查一下是什么情况，如果不能发货请给我退款。我的电话是13800138000，谢谢！\n\n"
)

# The Node-RED peer's load (../shared/peer/api.lua): this text, "Order #%08d" and a customer's email.
_PEER = "Hello, my order has not arrived yet, could you check the tracking? " * 10


def _repeat(text: str, size: int = 5_000) -> str:
    return (text * (size // len(text) + 1))[:size]


def _message(
    text: str, subject: str | None = None, *, channel: str = "email", customer: str | None = None
) -> CanonicalMessage:
    identities = () if customer is None else (Identity(kind="email", value=customer),)
    return CanonicalMessage(
        channel=channel, tenant="bench", inbox="support", external_id=None,
        received_at=datetime.now(UTC), subject=subject, text=text, identities=identities,
    )


def _mails() -> list[CanonicalMessage]:
    paths = sorted((ROOT / "tests" / "fixtures" / "email").glob("*.eml")) + email_corpus_mails()
    messages = []
    for path in paths:
        envelope = RawEnvelope(
            channel="email", tenant="bench", inbox="support@example.com", body=path.read_bytes(),
            received_at=datetime.now(UTC),
        )
        try:
            messages.append(normalize_email(envelope)[0])
        except NormalizationError:
            continue
    return messages


def _per_message(enricher: Enricher, forget: Callable[[], None], messages: list[CanonicalMessage]) -> float:
    spent = 0.0
    for message in messages:
        forget()  # each message as if it were the first: no number seen before
        started = time.perf_counter()
        enricher.enrich(message)
        spent += time.perf_counter() - started
    return spent / len(messages) * 1e6


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--base", type=Path, help="a tree whose gateway/enrich.py is the baseline")
    args = parser.parse_args(None if argv is None else list(argv))

    # The example config's routing rules (the rest of it needs secrets from the environment).
    example = tomllib.loads((ROOT / "config" / "ticketgate.example.toml").read_text())
    settings = Settings.model_validate({"routing": example["routing"]})
    gated = Enricher.from_settings(settings)
    if args.base is None:
        label = "without pre-checks"
        unchecked = [spec.model_copy(update={"requires": (), "digit_run": 0}) for spec in DEFAULT_EXTRACTORS]
        plain, forget_plain = Enricher(unchecked, settings.routing.rules), _e164.cache_clear
    else:
        label = f"base {args.base}"
        found = importlib.util.spec_from_file_location("base_enrich", args.base / "gateway" / "enrich.py")
        if found is None or found.loader is None:
            parser.error(f"no gateway/enrich.py under {args.base}")
        base_module = importlib.util.module_from_spec(found)
        sys.modules[found.name] = base_module  # dataclasses look their module up while it runs
        found.loader.exec_module(base_module)
        plain, forget_plain = base_module.Enricher.from_settings(settings), base_module._e164.cache_clear
    mails = _mails()
    sets = {
        f"mails of the corpora and fixtures ({len(mails)}, mean "
        f"{statistics.mean(len(m.text or '') for m in mails) / 1000:.1f} K chars)": mails,
        "5 KB English": [_message(_repeat(_ENGLISH), "Where is my desk?")] * 200,
        "5 KB Chinese": [_message(_repeat(_CHINESE), "订单未收到")] * 200,
        "5 KB smtp-source body": [_message("".join(f"{n}{'X' * 77}\n" for n in range(1, 65))[:5_000])] * 200,
        "peer's API message": [
            _message(_PEER, "Order #00001234", channel="api", customer="customer1234@example.com")
        ] * 1_000,
    }
    for name, messages in sets.items():
        assert all(gated.enrich(m).entities == plain.enrich(m).entities for m in messages), name
        with_check, without = [], []
        for _ in range(args.rounds):
            without.append(_per_message(plain, forget_plain, messages))
            with_check.append(_per_message(gated, _e164.cache_clear, messages))
        base, new = statistics.median(without), statistics.median(with_check)
        print(f"{name}:\n  {label}: {base:7.1f} us/message; this tree: {new:7.1f}; ratio {new / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

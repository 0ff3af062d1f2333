"""Mail parsed in the normalizer process: the same messages, the same errors, and a crash loses nothing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from connectors.email import trust
from core.errors import InvalidInput, NormalizationError
from core.settings import Settings
from gateway.enrich import Enricher
from gateway.offload import ComputeLost, NormalizeWorker, offloadable
from normalizers.api import normalizer_for, parse_api_message
from normalizers.content import normalized
from normalizers.email import EmailLimits, make_email_normalizer
from tests.support.mailkit import envelope
from tests.support.normalizers import CannotParse, Dies, Refuses, Unexpected, Unreadable

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "email"


@pytest.fixture
async def worker() -> AsyncIterator[NormalizeWorker]:
    instance = NormalizeWorker(Settings())
    await instance.start()
    yield instance
    await instance.close()


async def test_every_fixture_mail_parses_in_the_child_as_in_the_loop(worker: NormalizeWorker) -> None:
    normalize = make_email_normalizer(EmailLimits())
    enrich = Enricher.from_settings(Settings()).enrich
    mails = sorted(FIXTURES.glob("*.eml"))
    assert len(mails) > 10
    assert offloadable(normalize)

    for path in mails:
        mail = envelope(path.read_bytes(), mail_from="a@example.com", rcpt_tos=["support@demo.localhost"])
        try:
            expected = [enrich(m) for m in normalized(normalize, mail)]
        except NormalizationError as exc:
            with pytest.raises(NormalizationError, match=str(exc)[:40]):
                await worker.run(normalize, mail)
            continue
        assert await worker.run(normalize, mail) == expected, path.name


async def test_the_normalizers_errors_arrive_as_themselves(worker: NormalizeWorker) -> None:
    with pytest.raises(InvalidInput) as refused:
        await worker.run(Refuses(status=415), envelope(b"abc"))
    assert (refused.value.status, refused.value.reason) == (415, "refused b'abc'")
    with pytest.raises(NormalizationError, match="no idea"):
        await worker.run(CannotParse(), envelope(b"abc"))
    # An exception that does not pickle as itself still quarantines, naming what it was.
    with pytest.raises(NormalizationError, match="_Awkward: a/b"):
        await worker.run(Unexpected(), envelope(b"abc"))


async def test_a_request_the_child_cannot_read_is_answered_not_fatal(worker: NormalizeWorker) -> None:
    child = worker.pid
    with pytest.raises(NormalizationError, match="could not read it: no such normalizer here"):
        await worker.run(Unreadable(), envelope(b"abc"))
    with pytest.raises(NormalizationError, match="no idea"):
        await worker.run(CannotParse(), envelope(b"abc"))
    assert worker.pid == child


async def test_each_normalizer_is_its_own_across_calls(worker: NormalizeWorker) -> None:
    # Normalizers are pickled once and kept on both sides: two that differ only in their limits
    # stay apart, and one the child cannot read fails the same way each time.
    mail = envelope((FIXTURES / "gbk_order_question.eml").read_bytes())
    small, large = make_email_normalizer(EmailLimits(max_bytes=100)), make_email_normalizer(EmailLimits())
    for _ in range(2):
        with pytest.raises(NormalizationError, match="limit 100"):
            await worker.run(small, mail)
        assert await worker.run(large, mail) == await worker.run(make_email_normalizer(EmailLimits()), mail)
        with pytest.raises(NormalizationError, match="could not read it"):
            await worker.run(Unreadable(), envelope(b"abc"))


async def test_what_does_not_pickle_is_left_to_the_caller(worker: NormalizeWorker) -> None:
    assert await worker.run(CannotParse(), envelope(b"abc", callback=lambda: None)) is None
    assert await worker.run(lambda e: [], envelope(b"abc")) is None  # type: ignore[arg-type]


async def test_a_crash_fails_only_what_was_inside_and_another_child_takes_over(
    worker: NormalizeWorker,
) -> None:
    normalize = make_email_normalizer(EmailLimits())
    mail = envelope((FIXTURES / "gbk_order_question.eml").read_bytes())
    first = worker.pid

    with pytest.raises(NormalizationError, match="died while parsing"):
        await worker.run(Dies(), envelope(b"poison"))
    # Until the next child runs, the caller parses in the loop (run says so with None).
    assert await worker.run(normalize, mail) is None

    messages = None
    for _ in range(300):  # the next child runs within 30 s
        if worker.pid != first and (messages := await worker.run(normalize, mail)) is not None:
            break
        await asyncio.sleep(0.1)
    enrich = Enricher.from_settings(Settings()).enrich
    assert messages == [enrich(m) for m in normalized(normalize, mail)]
    assert worker.pid != first


async def test_long_api_html_is_sanitized_and_read_in_the_child(worker: NormalizeWorker) -> None:
    # Finishing 500 KB of HTML takes ~0.3 s: in the event loop it would stall every other request.
    page = "<p>请问订单什么时候发货？<img src=x onerror=alert(1)></p><script>steal()</script>" * 400
    body = orjson.dumps({"customer": {"external_id": "u1"}, "html": page})
    normalize = normalizer_for(parse_api_message(body))
    assert offloadable(normalize)
    short = orjson.dumps({"customer": {"external_id": "u1"}, "html": "<p>hi</p>"})
    assert not offloadable(normalizer_for(parse_api_message(short)))

    messages = await worker.run(normalize, replace(envelope(body), channel="api"))

    assert messages is not None
    [message] = messages
    assert message.html is not None
    assert "<script" not in message.html
    assert "onerror" not in message.html
    assert message.text is not None
    assert message.text.startswith("请问订单什么时候发货？")
    assert message.language == "zh"


TRUSTED = (
    b"Authentication-Results: mx.trusted.example;\r\n dkim=pass header.d=shop.example header.s=s1;\r\n"
    b" spf=pass (sender designated) smtp.mailfrom=bounce@shop.example;\r\n"
    b" dmarc=pass (p=REJECT) header.from=shop.example\r\n"
    b"From: a@shop.example\r\nSubject: hi\r\n"
)


async def test_a_call_is_computed_in_the_child_as_in_the_loop(worker: NormalizeWorker) -> None:
    done, verdict = await worker.call(trust.verdict, TRUSTED, "mx.trusted.example")

    assert done
    assert verdict == trust.verdict(TRUSTED, "mx.trusted.example")
    assert verdict is not None
    assert verdict["dmarc"] == "pass"
    assert await worker.call(trust.verdict, TRUSTED, "someone.else") == (True, None)


async def test_a_calls_errors_arrive_as_themselves(worker: NormalizeWorker) -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        await worker.call(int, "twelve")


async def test_a_call_that_does_not_pickle_is_left_to_the_caller(worker: NormalizeWorker) -> None:
    assert await worker.call(lambda: 1) == (False, None)
    assert await worker.call(len, lambda: 1) == (False, None)


async def test_a_call_that_kills_the_child_fails_alone_and_another_child_takes_over(
    worker: NormalizeWorker,
) -> None:
    first = worker.pid
    with pytest.raises(ComputeLost):
        await worker.call(os._exit, 3)
    for _ in range(300):  # the next child runs within 30 s
        if worker.pid != first and (result := await worker.call(len, "abc"))[0]:
            break
        await asyncio.sleep(0.1)
    assert result == (True, 3)

"""The fault suite: the real gateway process under faults a user meets, with a ledger of messages.

Every case records the ids it sent and got acknowledged, and the ids the bus delivered; each case
asserts it lost none, and the run ends with the ledger (also written to ``fault-ledger.json`` in
pytest's base temporary directory).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import MakeDeployment, deploy
from tests.support.consumer import Consumer

__all__ = ["MakeDeployment", "deploy"]  # the real gateway process, from the end-to-end suite

AUTH = {"Authorization": "Bearer e2e-test-key-0001"}


@dataclass
class Case:
    sent: set[str] = field(default_factory=set)  # acknowledged (2xx) by the gateway
    refused: int = 0  # answered with a temporary error: not acknowledged, so not owed
    received: set[str] = field(default_factory=set)

    @property
    def lost(self) -> set[str]:
        return self.sent - self.received


class Ledger:
    """Ids sent and received per fault case."""

    def __init__(self) -> None:
        self.cases: dict[str, Case] = {}

    def case(self, name: str) -> Case:
        return self.cases.setdefault(name, Case())

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "case": name,
                "sent": len(c.sent),
                "refused": c.refused,
                "received": len(c.received & c.sent),
                "lost": len(c.lost),
            }
            for name, c in sorted(self.cases.items())
        ]


_LEDGER = pytest.StashKey[Ledger]()


@pytest.fixture(scope="session")
def ledger(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    made = request.config.stash.setdefault(_LEDGER, Ledger())
    yield made  # type: ignore[misc]
    path = tmp_path_factory.getbasetemp() / "fault-ledger.json"
    path.write_text(json.dumps(made.rows(), indent=2))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    made = config.stash.get(_LEDGER, None)
    if made is None or not made.cases:
        return
    terminalreporter.section("fault ledger")
    for row in made.rows():
        terminalreporter.line(
            f"{row['case']:<40} sent {row['sent']:>4}  refused {row['refused']:>4}"
            f"  received {row['received']:>4}  lost {row['lost']}"
        )


async def send_message(session: aiohttp.ClientSession, url: str, case: Case, *, note: str = "") -> int:
    """POST one API message; an acknowledged one is owed to the bus (its message id is recorded)."""
    body = {
        "customer": {"email": f"fault-{uuid.uuid4().hex[:8]}@example.com"},
        "subject": "fault case",
        "text": f"fault case message {note}",
        "external_id": f"fault-{uuid.uuid4()}",
    }
    async with session.post(f"{url}/api/v1/messages", json=body, headers=AUTH) as resp:
        answer = await resp.json(content_type=None)
        if 200 <= resp.status < 300:
            case.sent.add(answer["message_id"])
        else:
            case.refused += 1
        return resp.status


def delivered_ids(consumer: Consumer) -> set[str]:
    return {orjson.loads(r.body)["message"]["id"] for r in consumer.received}


async def settle(case: Case, consumer: Consumer, within: float = 20.0) -> None:
    """Wait until the bus delivered every acknowledged message of ``case``; assert lost 0."""
    try:
        await consumer.wait_until(lambda: case.sent <= delivered_ids(consumer), within=within)
    finally:
        case.received |= delivered_ids(consumer)
    assert not case.lost, f"lost {len(case.lost)} of {len(case.sent)} acknowledged messages"

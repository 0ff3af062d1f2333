"""``ctx.shared``: channels set up on one gateway meet the same object under one key."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from connectors.telegram import DESCRIPTOR
from core.model import IngestResult, Outcome, RawEnvelope
from core.settings import Settings
from gateway.channels import GatewayContext
from gateway.metrics import Metrics
from normalizers.base import Normalizer


async def _ingest(envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
    return IngestResult(outcome=Outcome.ACCEPTED)


def _context(app: web.Application, settings: Settings) -> GatewayContext:
    return GatewayContext(app, DESCRIPTOR, settings=settings, ingest=_ingest, store=None, metrics=Metrics())


def test_the_first_channel_builds_and_the_others_get_the_same_object(tmp_path: Path) -> None:
    settings = Settings.model_validate({"store": {"path": str(tmp_path / "g.db")}})
    app = web.Application()
    built: list[object] = []

    def build() -> object:
        built.append(object())
        return built[-1]

    first, second = _context(app, settings), _context(app, settings)
    assert first.shared("family/one", build) is second.shared("family/one", build)
    assert len(built) == 1
    assert first.shared("family/two", build) is built[1]
    # Another gateway app shares nothing with this one.
    assert _context(web.Application(), settings).shared("family/one", build) is built[2]

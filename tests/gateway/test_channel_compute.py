"""``ctx.compute``: in the normalizer process when it runs, in the gateway process when not."""

from __future__ import annotations

import os
from pathlib import Path

from aiohttp import web

from connectors.telegram import DESCRIPTOR
from core.model import IngestResult, Outcome, RawEnvelope
from core.settings import Settings
from gateway.channels import GatewayContext
from gateway.metrics import Metrics
from gateway.offload import NormalizeWorker
from normalizers.base import Normalizer


async def _ingest(envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
    return IngestResult(outcome=Outcome.ACCEPTED)


def _context(settings: Settings, offload: NormalizeWorker | None) -> GatewayContext:
    return GatewayContext(
        web.Application(), DESCRIPTOR, settings=settings, ingest=_ingest, store=None, metrics=Metrics(),
        offload=offload,
    )


async def test_compute_runs_in_the_normalizer_process_when_there_is_one(tmp_path: Path) -> None:
    settings = Settings.model_validate({"store": {"path": str(tmp_path / "g.db")}})
    worker = NormalizeWorker(settings)
    await worker.start()
    try:
        assert worker.pid is not None
        assert worker.pid != os.getpid()
        assert await _context(settings, worker).compute(os.getpid) == worker.pid
        # What does not pickle is computed here.
        assert await _context(settings, worker).compute(lambda: os.getpid()) == os.getpid()
    finally:
        await worker.close()


async def test_compute_runs_here_without_a_normalizer_process(tmp_path: Path) -> None:
    settings = Settings.model_validate({"store": {"path": str(tmp_path / "g.db")}})
    assert await _context(settings, None).compute(os.getpid) == os.getpid()
    assert await _context(settings, None).compute(divmod, 7, 2) == (3, 1)

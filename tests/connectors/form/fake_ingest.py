"""A recording stand-in for the pipeline's ``ingest``, shared by the form and API connector tests.

It runs the normalizer it is handed, as the pipeline does, so a test also proves that what the
connector hands over can be normalized.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.model import CanonicalMessage, IngestResult, Outcome, Placement, RawEnvelope
from normalizers.base import Normalizer

ACCEPTED = IngestResult(
    outcome=Outcome.ACCEPTED,
    placements=(
        Placement(message_id="m-1", thread_id="t-1", customer_id="c-1", sequence=1, is_new_thread=True),
    ),
)


class FakeIngest:
    def __init__(self, result: IngestResult = ACCEPTED) -> None:
        self.result = result
        self.envelopes: list[RawEnvelope] = []
        self.messages: list[Sequence[CanonicalMessage]] = []

    async def __call__(self, envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
        self.envelopes.append(envelope)
        self.messages.append(normalize(envelope))
        return self.result

    @property
    def calls(self) -> int:
        return len(self.envelopes)

"""What every connector shares: the seam (``core.channel``) and the ingest callable it hands its handlers.

A connector is built from the settings (``from_settings``; ``None`` when the channel is not
configured, :class:`core.errors.ConfigError` when it is configured wrongly: fail closed) and set up
with a :class:`~core.channel.ChannelContext`. It verifies, builds a
:class:`~core.model.RawEnvelope` and awaits ``ctx.ingest``; it maps the
:class:`~core.model.IngestResult` to the channel's own answer and never answers success unless
``result.stored``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from core.channel import ChannelContext, ChannelMetrics, Connector
from core.model import IngestResult, RawEnvelope
from normalizers.base import Normalizer

Ingest = Callable[[RawEnvelope, Normalizer], Awaitable[IngestResult]]
"""``ctx.ingest`` as a handler holds it: the envelope and the normalizer to run."""

__all__ = ["ChannelContext", "ChannelMetrics", "Connector", "Ingest"]

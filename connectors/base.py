"""The connector contract: one small protocol for every channel.

A connector is built from the settings (``from_settings``; it returns ``None`` when the channel is
not configured and raises :class:`core.errors.ConfigError` when it is configured wrongly, e.g. a
secret is missing: fail closed), then mounted on the application (``setup``). HTTP connectors add an
aiohttp sub-app under their own prefix; others (SMTP, IMAP) add a ``cleanup_ctx`` entry.

The connector verifies, builds a :class:`~core.model.RawEnvelope` and awaits ``ingest``; it
maps the :class:`~core.model.IngestResult` to the channel's own answer and never answers
success unless ``result.stored``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, Self

from aiohttp import web

from core.model import IngestResult, RawEnvelope
from core.settings import Settings
from normalizers.base import Normalizer

Ingest = Callable[[RawEnvelope, Normalizer], Awaitable[IngestResult]]


class Connector(Protocol):
    name: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None: ...

    def setup(self, app: web.Application, ingest: Ingest) -> None: ...

"""Typed application keys: app state is only ever read through these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from core.settings import Settings
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.channels import EnabledChannel, Registry
    from gateway.pipeline import Pipeline
    from gateway.relay import Relay
    from gateway.replies import Dispatcher
    from gateway.store.base import Store

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STORE: web.AppKey[Store] = web.AppKey("store")
PIPELINE: web.AppKey[Pipeline] = web.AppKey("pipeline")
RELAY: web.AppKey[Relay] = web.AppKey("relay")
# The channels set up, with the endpoints they describe (for the start-up summary).
CHANNELS: web.AppKey[Sequence[EnabledChannel]] = web.AppKey("channels")
# The reply dispatcher (tests and benchmarks drive it; channels reach it through their context).
REPLIES: web.AppKey[Dispatcher] = web.AppKey("replies")
# The channels installed (quarantine replay takes each channel's live normalizer from it).
REGISTRY: web.AppKey[Registry] = web.AppKey("registry")

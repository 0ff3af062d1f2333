"""Set a connector up on a bare aiohttp app through the real channel context (gateway.channels)."""

from __future__ import annotations

from aiohttp import web

from core.channel import ChannelDescriptor, Connector, SenderSpec
from core.settings import Settings
from gateway.channels import GatewayContext, Ingest, Registry
from gateway.metrics import Metrics
from gateway.store.base import Store


def descriptor_of(connector: Connector) -> ChannelDescriptor:
    """The installed descriptor whose connector class built ``connector``."""
    registry = Registry.installed()
    for name in registry.names():
        descriptor = registry.get(name)
        if type(connector) is descriptor.connector:
            return descriptor
    raise LookupError(f"no installed channel builds {type(connector).__name__}")


def set_up(
    app: web.Application,
    connector: Connector,
    ingest: Ingest,
    *,
    settings: Settings,
    store: Store | None = None,
    metrics: Metrics | None = None,
    descriptor: ChannelDescriptor | None = None,
    senders: dict[str, SenderSpec] | None = None,
) -> GatewayContext:
    """``connector.setup`` with a context around ``ingest`` (a fake or the real pipeline's);
    ``descriptor`` replaces the installed one (a test's recording normalizer); ``senders`` receives
    what the channel registers with ``ctx.add_sender``."""
    ctx = GatewayContext(
        app,
        descriptor or descriptor_of(connector),
        settings=settings,
        ingest=ingest,
        store=store,
        metrics=metrics or Metrics(),
        senders=senders,
    )
    connector.setup(ctx)
    return ctx

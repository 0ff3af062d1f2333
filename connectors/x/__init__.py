"""The X (Twitter) channel: Account Activity API direct messages, replies as DMs."""

from connectors.x.connector import XConnector
from connectors.x.settings import XSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.x import normalize_x

DESCRIPTOR = ChannelDescriptor(
    name="x",
    connector=XConnector,
    normalizer=normalize_x,
    settings=XSettings,
    identity_kinds=frozenset({IdentityKind.X}),
    # X wants the webhook (and the CRC challenge) answered within 3 seconds.
    deadline=3.0,
)

__all__ = ["DESCRIPTOR", "XConnector", "XSettings"]

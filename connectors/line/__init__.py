"""The LINE channel: Messaging API webhooks, one LINE Official Account per inbox, replies by push."""

from connectors.line.connector import LineConnector
from connectors.line.settings import LineSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.line import normalize_line

DESCRIPTOR = ChannelDescriptor(
    name="line",
    connector=LineConnector,
    normalizer=normalize_line,
    settings=LineSettings,
    identity_kinds=frozenset({IdentityKind.LINE}),
    # LINE's guidance: answer the webhook within about 2 s, work after answering.
    deadline=2.0,
)

__all__ = ["DESCRIPTOR", "LineConnector", "LineSettings"]

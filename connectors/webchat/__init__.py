"""The live web chat channel (see :mod:`connectors.webchat.connector`)."""

from connectors.webchat.connector import WebchatConnector
from connectors.webchat.settings import WebchatSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.webchat import normalize_webchat

DESCRIPTOR = ChannelDescriptor(
    name="webchat",
    connector=WebchatConnector,
    normalizer=normalize_webchat,
    settings=WebchatSettings,
    identity_kinds=frozenset({IdentityKind.WEBCHAT_VISITOR, IdentityKind.EXTERNAL, IdentityKind.EMAIL}),
    deadline=10.0,  # the widget shows the message as pending, then sends it again
)

__all__ = ["DESCRIPTOR", "WebchatConnector", "WebchatSettings"]

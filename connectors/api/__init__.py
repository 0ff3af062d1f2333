"""The authenticated API channel (see :mod:`connectors.api.connector`)."""

from connectors.api.connector import ApiChannelSettings, ApiConnector
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.api import normalize_api

DESCRIPTOR = ChannelDescriptor(
    name="api",
    connector=ApiConnector,
    normalizer=normalize_api,
    settings=ApiChannelSettings,
    identity_kinds=frozenset({IdentityKind.EMAIL, IdentityKind.PHONE, IdentityKind.EXTERNAL}),
    deadline=30.0,  # an app's HTTP client; nothing retries on a clock of its own
)

__all__ = ["DESCRIPTOR", "ApiChannelSettings", "ApiConnector"]

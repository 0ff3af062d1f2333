"""The authenticated API channel (see :mod:`connectors.api.connector`)."""

from connectors.api.connector import ApiChannelSettings, ApiConnector

__all__ = ["ApiChannelSettings", "ApiConnector"]

"""The web-form channel (see :mod:`connectors.form.connector`)."""

from connectors.form.connector import FormChannelSettings, FormConnector

__all__ = ["FormChannelSettings", "FormConnector"]

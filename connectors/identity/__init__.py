"""The desk API: desks and CRMs read customers, link and unlink them, and read thread status."""

from connectors.identity.connector import IdentityConnector

__all__ = ["IdentityConnector"]

"""The desk API: desks and CRMs read customers, link and unlink them, and read thread status."""

from gateway.desk.api import IdentityConnector

__all__ = ["IdentityConnector"]

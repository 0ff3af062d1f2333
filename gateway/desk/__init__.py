"""The desk API: desks and CRMs read customers, link and unlink them, and read thread status."""

from gateway.desk.api import DeskApi

__all__ = ["DeskApi"]

"""ticketgate: omnichannel ingestion gateway for customer service."""

__version__ = "0.1.0"

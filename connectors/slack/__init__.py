"""The Slack channel: the Events API (or Socket Mode), one app installation per inbox, and replies."""

from connectors.slack.connector import SlackConnector
from connectors.slack.intake import configure
from connectors.slack.settings import SlackSettings
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.slack import normalize_slack

DESCRIPTOR = ChannelDescriptor(
    name="slack",
    connector=SlackConnector,
    normalizer=normalize_slack,
    configure=configure,
    settings=SlackSettings,
    identity_kinds=frozenset({IdentityKind.SLACK, IdentityKind.EMAIL}),
    # Slack retries a callback that has no answer within 3 seconds.
    deadline=3.0,
)

__all__ = ["DESCRIPTOR", "SlackConnector", "SlackSettings"]

"""WhatsApp Cloud API, Messenger and Instagram: three channels behind one endpoint per Meta app
(``/meta/{app}``, one signature check), each with its own normalizer, identities and sender."""

from connectors.meta.hub import own_app_ids
from connectors.meta.pages import InstagramConnector, MessengerConnector
from connectors.meta.settings import InstagramSettings, MessengerSettings, WhatsAppSettings
from connectors.meta.whatsapp import WhatsAppConnector
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from core.settings import Settings
from normalizers import messenger, whatsapp
from normalizers.base import Normalizer

# Meta waits about 20 s for an answer before it counts a delivery as failed and retries it.
_META_DEADLINE = 15.0


def _whatsapp(settings: Settings) -> Normalizer:
    table = settings.channel(whatsapp.CHANNEL, WhatsAppSettings)
    return whatsapp.configure(table.echoes if table is not None else "ignore")


def _messenger(settings: Settings) -> Normalizer:
    table = settings.channel(messenger.MESSENGER, MessengerSettings)
    echoes = table.echoes if table is not None else "ignore"
    return messenger.configure(messenger.MESSENGER, echoes, own_app_ids(settings))


def _instagram(settings: Settings) -> Normalizer:
    table = settings.channel(messenger.INSTAGRAM, InstagramSettings)
    echoes = table.echoes if table is not None else "ignore"
    return messenger.configure(messenger.INSTAGRAM, echoes, own_app_ids(settings))


WHATSAPP = ChannelDescriptor(
    name=whatsapp.CHANNEL,
    connector=WhatsAppConnector,
    normalizer=whatsapp.normalize_whatsapp,
    configure=_whatsapp,
    settings=WhatsAppSettings,
    identity_kinds=frozenset({IdentityKind.WHATSAPP, IdentityKind.PHONE}),
    deadline=_META_DEADLINE,
)
MESSENGER = ChannelDescriptor(
    name=messenger.MESSENGER,
    connector=MessengerConnector,
    normalizer=messenger.normalize_messenger,
    configure=_messenger,
    settings=MessengerSettings,
    identity_kinds=frozenset({IdentityKind.MESSENGER_PSID}),
    deadline=_META_DEADLINE,
)
INSTAGRAM = ChannelDescriptor(
    name=messenger.INSTAGRAM,
    connector=InstagramConnector,
    normalizer=messenger.normalize_instagram,
    configure=_instagram,
    settings=InstagramSettings,
    identity_kinds=frozenset({IdentityKind.INSTAGRAM_IGSID}),
    deadline=_META_DEADLINE,
)

__all__ = [
    "INSTAGRAM",
    "MESSENGER",
    "WHATSAPP",
    "InstagramConnector",
    "MessengerConnector",
    "WhatsAppConnector",
]

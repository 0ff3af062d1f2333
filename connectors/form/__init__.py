"""The web-form channel (see :mod:`connectors.form.connector`)."""

from connectors.form.connector import FormChannelSettings, FormConnector
from core.channel import ChannelDescriptor
from core.model import IdentityKind
from normalizers.form import normalize_form

DESCRIPTOR = ChannelDescriptor(
    name="form",
    connector=FormConnector,
    normalizer=normalize_form,
    settings=FormChannelSettings,
    identity_kinds=frozenset({IdentityKind.EMAIL, IdentityKind.PHONE}),
    deadline=30.0,  # a person's browser
)

__all__ = ["DESCRIPTOR", "FormChannelSettings", "FormConnector"]

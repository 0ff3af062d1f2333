"""Which connectors exist; a channel's module (and its SDK) is imported only when it is configured."""

from __future__ import annotations

import importlib
from typing import cast

from connectors.base import Connector
from core.settings import Settings
from normalizers.base import Normalizer

# channel table name -> "module:ClassName"
CONNECTORS: dict[str, str] = {
    "form": "connectors.form:FormConnector",
    "api": "connectors.api:ApiConnector",
    "email": "connectors.email:EmailConnector",
    "wechat": "connectors.wechat:WeChatConnector",
    "wecom": "connectors.wechat:WeComConnector",
    "wechat_kf": "connectors.wechat:WeChatKfConnector",
    # The desk API (customers, merges, thread status); not a message channel, so no normalizer.
    "identity": "gateway.desk:IdentityConnector",
}


def load_connectors(settings: Settings) -> list[Connector]:
    """Build every configured connector; raises ConfigError for a misconfigured one (fail closed)."""
    built: list[Connector] = []
    seen: set[str] = set()
    for name, raw in settings.channels.items():
        if raw.get("enabled", True) is False:
            continue
        target = CONNECTORS.get(name)
        if target is None:
            from core.errors import ConfigError

            raise ConfigError(
                f"unknown channel (known: {', '.join(sorted(CONNECTORS))})",
                file=settings.source,
                key=f"channels.{name}",
            )
        if target in seen:
            continue
        seen.add(target)
        module_name, _, class_name = target.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        connector = cls.from_settings(settings)
        if connector is not None:
            built.append(cast(Connector, connector))
    return built


# channel name (as in RawEnvelope.channel) -> "module:function"; used to replay quarantined messages.
NORMALIZERS: dict[str, str] = {
    "form": "normalizers.form:normalize_form",
    "api": "normalizers.api:normalize_api",
    "email": "normalizers.email:normalize_email",
    "wechat": "normalizers.wechat:normalize_wechat",
    "wecom": "normalizers.wechat:normalize_wecom",
    "wechat_kf": "normalizers.wechat_kf:normalize_kf",
}


def normalizer_for(channel: str) -> Normalizer:
    module_name, _, name = NORMALIZERS[channel].partition(":")
    return cast(Normalizer, getattr(importlib.import_module(module_name), name))

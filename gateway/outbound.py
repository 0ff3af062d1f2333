"""Fetching a URL someone else named (a desk's reply attachment): public addresses only.

A URL in a reply command makes the gateway fetch it and hand the bytes to a customer. Without a
rule, a command could name ``https://10.0.0.5/`` or a name that resolves to the metadata service,
and read the internal network through the gateway. So every address a fetch connects to must be
public (``ipaddress``' ``is_global``, not multicast), unless it lies in a network the operator
allows (an intranet file server).

The check sits where the connection is made, not before it: the connector connects only to the
addresses :class:`PublicResolver` returned, so a name cannot resolve to a public address for the
check and a private one for the connection. aiohttp never asks a resolver about an address
literal, so :func:`check_url` looks at those itself, and the caller follows redirects one by one
to check each hop.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressNotPermitted(OSError):
    """The URL's host is, or resolves only to, addresses that are not public and not allowed."""


def permitted(address: str, allowed: Sequence[Network] = ()) -> bool:
    """Whether a connection to ``address`` (an IP address, perhaps with a ``%zone``) may be made."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if any(ip in network for network in allowed):
        return True
    return ip.is_global and not ip.is_multicast


def check_url(url: URL, allowed: Sequence[Network] = ()) -> None:
    """Refuse an https URL whose host is an address literal that is not permitted (names are
    checked when they resolve)."""
    host = (url.host or "").strip("[]")
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return  # a name: PublicResolver decides
    if not permitted(host, allowed):
        raise AddressNotPermitted(f"{host} is not a public address")


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses :func:`permitted` lets through."""

    def __init__(self, allowed: Sequence[Network] = (), inner: AbstractResolver | None = None) -> None:
        self._allowed = tuple(allowed)
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [entry for entry in found if permitted(entry["host"], self._allowed)]
        if not kept:
            raise AddressNotPermitted(f"{host} resolves to no public address")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def not_permitted(exc: BaseException) -> AddressNotPermitted | None:
    """The :class:`AddressNotPermitted` behind an aiohttp connection error, if that is what it was."""
    cause: Any = exc
    while cause is not None:
        if isinstance(cause, AddressNotPermitted):
            return cause
        cause = getattr(cause, "os_error", None) or cause.__cause__
    return None

"""gateway.outbound: which addresses a fetch of a URL someone else named may connect to."""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway.outbound import AddressNotPermitted, PublicResolver, check_url, not_permitted, permitted


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1", "172.16.5.4", "192.168.1.1", "127.0.0.1", "0.0.0.0", "169.254.169.254",
        "100.64.0.1", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1%eth0", "fc00::1",
        "::ffff:10.0.0.1", "::ffff:127.0.0.1", "ff02::1", "not an address",
    ],
)
def test_addresses_that_are_not_public_are_refused(address: str) -> None:
    assert not permitted(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_permitted(address: str) -> None:
    assert permitted(address)


def test_an_allowed_network_is_permitted_and_nothing_beside_it() -> None:
    allowed = (ipaddress.ip_network("10.20.0.0/16"),)
    assert permitted("10.20.3.4", allowed)
    assert permitted("::ffff:10.20.3.4", allowed)
    assert not permitted("10.21.0.1", allowed)


def test_address_literals_in_urls_are_checked_and_names_left_to_the_resolver() -> None:
    with pytest.raises(AddressNotPermitted, match=r"10\.0\.0\.1"):
        check_url(URL("https://10.0.0.1/x"))
    with pytest.raises(AddressNotPermitted, match="::1"):
        check_url(URL("https://[::1]:8443/x"))
    check_url(URL("https://8.8.8.8/x"))
    check_url(URL("https://files.example/x"))


class _Fixed(AbstractResolver):
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_the_resolver_keeps_only_permitted_addresses() -> None:
    mixed = PublicResolver(inner=_Fixed("10.0.0.7", "93.184.216.34", "127.0.0.1"))
    assert [r["host"] for r in await mixed.resolve("files.example", 443)] == ["93.184.216.34"]
    with pytest.raises(AddressNotPermitted, match=r"files\.example resolves to no public address"):
        await PublicResolver(inner=_Fixed("10.0.0.7", "169.254.169.254")).resolve("files.example", 443)


async def test_a_connection_is_never_made_to_a_name_that_resolves_only_privately() -> None:
    connector = aiohttp.TCPConnector(resolver=PublicResolver())
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as failed:
            await session.get("https://localhost:9/")
    refused = not_permitted(failed.value)
    assert refused is not None
    assert "localhost resolves to no public address" in str(refused)
    assert not_permitted(aiohttp.ClientConnectionError("other")) is None

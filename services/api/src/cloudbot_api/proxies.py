"""Who the client is when requests come through proxies: X-Forwarded-For is believed only
from the proxies in TRUSTED_PROXIES, and rate limits count an IPv6 client by its /64."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

# One IPv6 subscriber usually holds a whole /64 and can pick any address in it at will.
IPV6_CLIENT_PREFIX = 64


class TrustedProxies:
    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        # Asked on every request for the same few peers: parsing the address each time
        # cost more than the rest of the security headers.
        self.trusts = functools.lru_cache(maxsize=4096)(self._trusts)

    def _trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def client(self, peer: str, forwarded_for: Iterable[str]) -> str:
        """The client's address: `peer`, or, when `peer` is a trusted proxy, the nearest hop
        in X-Forwarded-For that is not one. `forwarded_for` holds every X-Forwarded-For
        header line in the order received: several lines are one list (RFC 9110 5.3), so
        a client cannot hide behind a line of its own ahead of the one its proxy appended."""
        if not self._networks or not self.trusts(peer):
            return peer
        hops = [h.strip() for line in forwarded_for for h in line.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return peer


def rate_limit_address(address: str) -> str:
    """The address as rate limits count it: IPv4 as is, IPv6 as its /64 network."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)

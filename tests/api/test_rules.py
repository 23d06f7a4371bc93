"""The API's pure rules, without a request: key hints, the client's address behind proxies
and how rate limits count it."""

from __future__ import annotations

import pytest

from cloudbot_api.api_keys.service import mask
from cloudbot_api.proxies import TrustedProxies, rate_limit_address

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("sk-ant-0123456789abcdefWXYZ", "sk-…WXYZ"),
        ("0123456789abcdef", "012…cdef"),  # 16 characters: long enough for a prefix
        ("0123456789abcde", "…de"),  # shorter keys show only their last two
        ("ab", "…ab"),
    ],
)
def test_mask_shows_a_prefix_and_the_last_characters_only(key, hint):
    assert mask(key) == hint
    assert key not in mask(key) or len(key) <= 2


@pytest.mark.parametrize(
    ("proxies", "peer", "forwarded", "address"),
    [
        # No trusted proxies: the header is anybody's to write, and ignored.
        ([], "203.0.113.7", "198.51.100.1", "203.0.113.7"),
        # A peer that is not a trusted proxy cannot speak for others.
        (["10.0.0.0/8"], "203.0.113.7", "198.51.100.1", "203.0.113.7"),
        # Through a trusted proxy: the last hop it did not add itself.
        (["10.0.0.0/8"], "10.0.0.5", "198.51.100.1", "198.51.100.1"),
        # A client's own forged entry sits left of the real one, and is not believed.
        (["10.0.0.0/8"], "10.0.0.5", "6.6.6.6, 198.51.100.1", "198.51.100.1"),
        # A chain of trusted proxies is walked back to the first untrusted hop.
        (["10.0.0.0/8"], "10.0.0.5", "198.51.100.1, 10.0.0.9", "198.51.100.1"),
        # Nothing but trusted hops (or no header): the peer itself.
        (["10.0.0.0/8"], "10.0.0.5", "10.0.0.9", "10.0.0.5"),
        (["10.0.0.0/8"], "10.0.0.5", None, "10.0.0.5"),
        # Garbage in the header is an untrusted hop, never a crash.
        (["10.0.0.0/8"], "10.0.0.5", "not-an-address", "not-an-address"),
        (["127.0.0.1/32", "::1/128"], "::1", "2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_address_believes_forwarded_for_only_from_trusted_proxies(
    proxies, peer, forwarded, address
):
    lines = [forwarded] if forwarded is not None else []
    assert TrustedProxies(proxies).client(peer, lines) == address


def test_forwarded_for_lines_are_one_list_read_from_the_end():
    proxies = TrustedProxies(["10.0.0.0/8"])
    # A client's own header line comes first; its proxy appends the real address after.
    assert proxies.client("10.0.0.5", ["6.6.6.6", "198.51.100.1"]) == "198.51.100.1"
    assert proxies.client("10.0.0.5", ["198.51.100.1", "10.0.0.9, 10.0.0.8"]) == "198.51.100.1"


@pytest.mark.parametrize(
    ("address", "counted_as"),
    [
        ("198.51.100.1", "198.51.100.1"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same subscriber's /64
        ("::ffff:198.51.100.1", "198.51.100.1"),
        ("unknown", "unknown"),
    ],
)
def test_rate_limits_count_an_ipv6_client_by_its_64(address, counted_as):
    assert rate_limit_address(address) == counted_as

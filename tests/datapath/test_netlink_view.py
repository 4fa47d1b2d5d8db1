"""The routes' watcher writes each view as one line of JSON: what it writes reads back the
same, a failed read arrives as an error, and garbage is refused."""

from __future__ import annotations

import pytest

from espswitch.datapath.netlink import decode_view, encode_view
from espswitch.datapath.tunnel import Route, ip4, ip_addr


def test_a_view_reads_back_as_it_was_written() -> None:
    routes = [Route(prefix=int.from_bytes(ip4("10.0.0.0"), "big"), plen=24, dev="br-phy",
                    src=ip4("10.0.0.2")),
              Route(prefix=0, plen=0, dev="eth0", gw=ip4("10.0.0.1")),
              Route(prefix=int.from_bytes(ip_addr("fd00::"), "big"), plen=64, dev="br-phy",
                    src=ip_addr("fd00::2"), v6=True)]
    addresses = {"br-phy": [ip4("10.0.0.2"), ip_addr("fd00::2")], "lo": [ip4("127.0.0.1")]}
    line = encode_view((routes, addresses))
    assert "\n" not in line
    assert decode_view(line) == (routes, addresses)


def test_a_failed_read_arrives_as_an_error() -> None:
    with pytest.raises(OSError, match="NetlinkError: boom"):
        decode_view('{"error": "NetlinkError: boom"}')


@pytest.mark.parametrize("line", ["", "not json", '{"routes": 1}', '{"addresses": {}}',
                                  '{"routes": [[1, 2]], "addresses": {}}'])
def test_what_is_not_a_view_is_refused(line: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode_view(line)

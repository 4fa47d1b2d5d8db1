"""Open vSwitch's selectors between two IKE cores (issue 12): a VXLAN or Geneve tunnel has
two CHILD_SAs, UDP to each side's port; the responder matches each offered CHILD_SA to the
configuration that holds it whole (its "in" to our "out"), never narrows it into the other."""

from __future__ import annotations

import pytest

from espswitch.ike import ChildConfig, IkeCore
from espswitch.ike.ts import format_ts

from .helpers import A_ADDR, B_ADDR, Link, peer


def ovs_children(port: int) -> tuple[ChildConfig, ...]:
    return (ChildConfig(name="out", local_ts="dynamic[udp]", remote_ts=f"dynamic[udp/{port}]",
                        mode="transport"),
            ChildConfig(name="in", local_ts=f"dynamic[udp/{port}]", remote_ts="dynamic[udp]",
                        mode="transport"))


def selectors(link: Link, core: IkeCore) -> dict[str, tuple[str, str]]:
    return {e.child: (" ".join(map(format_ts, e.local_ts)),
                      " ".join(map(format_ts, e.remote_ts))) for e in link.installed(core)}


@pytest.mark.parametrize("port", [4789, 6081])
@pytest.mark.parametrize("who", ["a", "b", "both"])
def test_two_child_sas_match_in_to_out(port, who):
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", children=ovs_children(port))])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", children=ovs_children(port))])
    link = Link(a, b)
    if who in ("a", "both"):
        a.initiate("b", 0.0)
    if who in ("b", "both"):
        b.initiate("a", 0.0)
    link.run()
    link.advance(5.0)
    sa, sb = selectors(link, a), selectors(link, b)
    udp = f"[17/{port}]"
    assert sa["out"] == (f"{A_ADDR}/32[17]", f"{B_ADDR}/32{udp}"), sa
    assert sa["in"] == (f"{A_ADDR}/32{udp}", f"{B_ADDR}/32[17]"), sa
    assert sb["out"] == (f"{B_ADDR}/32[17]", f"{A_ADDR}/32{udp}"), sb
    assert sb["in"] == (f"{B_ADDR}/32{udp}", f"{A_ADDR}/32[17]"), sb
    # Each CHILD_SA is one pair: a's "out" is b's "in".
    live = {(s.peer, c.name): c for core in (a, b) for s in core.ike_sas()
            if s.state == "established" for c in s.children}
    assert live[("b", "out")].spi_out == live[("a", "in")].spi_in
    assert live[("a", "out")].spi_out == live[("b", "in")].spi_in


def test_gre_child_is_protocol_47_between_the_endpoints():
    gre = (ChildConfig(name="gre", local_ts="dynamic[gre]", remote_ts="dynamic[gre]",
                       mode="transport"),)
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", children=gre)])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", children=gre)])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert selectors(link, b) == {"gre": (f"{B_ADDR}/32[47]", f"{A_ADDR}/32[47]")}
    assert link.installed(b)[0].mode == "transport"

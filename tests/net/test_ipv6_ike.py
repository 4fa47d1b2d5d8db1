"""Two espswitch hypervisors over an IPv6 underlay, their tunnel keyed by IKEv2 with a PSK
(issue 12): `vxlanipsec` in transport and tunnel mode, and Open vSwitch's `vxlan`, `geneve`
and `gre` with `options:psk` (ovs-monitor-ipsec's selectors, as IPv6 ranges).

IKE travels as espswitchd's IPv4 IKE does: the daemon's UDP 500/4500 sockets (IPv6 here)
in the hypervisor's namespace, through br-phy's internal port and the datapath's own NIC.
Shown: the tunnel comes up, pings and iperf3 both ways, `ike/show` names the IPv6
endpoints and /128 selectors, a CHILD_SA and an IKE SA rekey on the wire over IPv6 UDP 500
with the tunnel still working, and the underlay carries only IKE and ESP over IPv6 (never
the ping payload, never a clear tunnel packet).
"""

from __future__ import annotations

import pytest

from espswitch.cli.lab import UNDERLAY6, Lab

from .ipsec_helpers import PATTERN, established, iperf3, received, scapy, status, wait_for

pytestmark = pytest.mark.net

PSK = "ike-ipv6-lab-psk-51f3"
CLEAR_PROTO = {"vxlanipsec": (17, 4789), "vxlan": (17, 4789), "geneve": (17, 6081),
               "gre": (47, 0)}
CASES = [("vxlanipsec", "transport"), ("vxlanipsec", "tunnel"), ("vxlan", "transport"),
         ("geneve", "transport"), ("gre", "transport")]


def underlay6(pcap: str) -> list:
    """The IPv6 packets between the two tunnel endpoints (no neighbour discovery)."""
    s = scapy()
    ends = set(UNDERLAY6)
    return [p for p in s.rdpcap(pcap) if p.haslayer(s.IPv6)
            and {p[s.IPv6].src, p[s.IPv6].dst} == ends and p[s.IPv6].nh != 58]


def spi_changed(lab: Lab, before: str) -> bool:
    return status(lab, 0).get("spi_out", before) != before


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_ike_keyed_tunnel_over_an_ipv6_underlay(netlab_ok, tmp_path, kind, mode):
    s = scapy()
    opts = {"psk": PSK, "ipsec_mode": mode}
    lab = Lab(underlay_ips=UNDERLAY6, tunnel_type=kind, tunnel_options=(dict(opts), dict(opts)))
    with lab:
        st1, st2 = established(lab, 30)
        assert st1["ipsec_keying"] == "ikev2" and st1["ipsec_mode"] == mode
        assert "ike_error" not in st1 and "ike_error" not in st2
        assert lab.wait_for_ping(20), "the VMs never reached each other"
        show = lab.appctl(lab.hvs[0], "ike/show").stdout
        a6, b6 = UNDERLAY6
        assert f"{a6}" in show and f"{b6}" in show and "established" in show, show
        assert f"{a6}/128" in show and f"{b6}/128" in show, show
        assert PSK not in show

        pcap = str(tmp_path / "underlay.pcap")
        with lab.capture(0, pcap):
            before = st1["spi_out"]
            lab.appctl(lab.hvs[0], "ike/rekey", "tun0", "child")
            assert wait_for(lambda: spi_changed(lab, before), 20), status(lab, 0)
            lab.appctl(lab.hvs[1], "ike/rekey", "tun0", "ike")
            ping = lab.ping(50, 0.02, extra=["-p", PATTERN.hex()])
            back = lab.ping(20, 0.02, src=1)
        assert received(ping) == 50, ping.stdout
        assert received(back) == 20, back.stdout
        with open(pcap, "rb") as f:
            assert PATTERN not in f.read(), "the ping payload is visible on the underlay"
        pkts = underlay6(pcap)
        ike = [p for p in pkts if p.haslayer(s.UDP) and 500 in (p[s.UDP].sport,
                                                                 p[s.UDP].dport)]
        esp = [p for p in pkts if p[s.IPv6].nh == 50]
        assert len(ike) >= 4, "no IKE (the rekeys) on IPv6 UDP 500"
        assert len(esp) >= 2 * 70, len(esp)
        proto, port = CLEAR_PROTO[kind]
        clear = [p for p in pkts if p[s.IPv6].nh == proto and (
            proto == 47 or p[s.UDP].dport == port)]
        assert clear == [], "a clear tunnel packet on the underlay"
        # The IKE SA rekey left one IKE SA, still established, on both sides.
        for i in (0, 1):
            text = lab.appctl(lab.hvs[i], "ike/show").stdout
            assert wait_for(lambda i=i: lab.appctl(lab.hvs[i], "ike/show").stdout.count(
                "IKE SA #") == 1, 15), text

        for src in (0, 1):
            res = iperf3(lab, src, ("-t", "2"))
            assert "error" not in res, res.get("error")
            got = res["end"]["sum_received"]
            assert got["bytes"] > 1_000_000, got
            print(f"{kind} {mode} IKE over IPv6, hv{src + 1} -> hv{2 - src}: "
                  f"{got['bits_per_second'] / 1e6:.0f} Mbit/s")
        assert established(lab)

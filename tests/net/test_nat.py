"""An IKE-keyed `vxlanipsec` tunnel through a NAT (RFC 3947/3948).

hv1 sits behind a Linux NAT router (nftables masquerade): its underlay address 10.1.0.2 is
private, and hv2 sees it as the router's public address 198.18.0.1. IKEv2 must detect the
NAT and move ESP into UDP/4500 although `ipsec_encapsulation` is `no`; VXLAN traffic then
flows both ways through the NAT's mappings, in transport mode and in tunnel mode (where the
inner IPv4 header carries hv1's private address, taken from the CHILD_SA's selectors).
"""

from __future__ import annotations

import re
import shutil

import pytest

from .ipsec_helpers import wait_for
from .lab import no_tx_offload, run, wait_until

pytestmark = pytest.mark.net

PSK = "nat-lab-psk-3e9a"
PRIVATE, ROUTER_IN, ROUTER_OUT, PUBLIC = "10.1.0.2", "10.1.0.1", "198.18.0.1", "198.18.0.2"


def veth(a_ns: str, b_ns: str, name_a: str, name_b: str) -> None:
    run(["ip", "link", "add", name_a, "netns", a_ns, "type", "veth", "peer", "name", name_b,
         "netns", b_ns])


def status(hv, iface: str = "tun0") -> dict[str, str]:
    out = hv.vsctl("get", "interface", iface, "status").stdout
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,}\s]+)', out)}


@pytest.mark.parametrize("mode", ["transport", "tunnel"])
def test_ike_detects_the_nat_and_the_tunnel_works_through_it(lab, mode):
    if shutil.which("nft") is None:
        pytest.skip("needs nft (nftables) for the NAT router")
    hv1, hv2 = lab.hypervisor("nath1"), lab.hypervisor("nath2")
    router = lab.netns("natr")
    hv1.start()
    hv2.start()
    veth(hv1.ns, router, "ul0", "in0")
    veth(hv2.ns, router, "ul0", "out0")
    for cmd in (["ip", "addr", "add", f"{ROUTER_IN}/24", "dev", "in0"],
                ["ip", "addr", "add", f"{ROUTER_OUT}/24", "dev", "out0"],
                ["ip", "link", "set", "in0", "up"], ["ip", "link", "set", "out0", "up"],
                ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                ["nft", "add", "table", "ip", "nat"],
                ["nft", "add chain ip nat post { type nat hook postrouting priority 100 ; }"],
                ["nft", "add", "rule", "ip", "nat", "post", "oifname", "out0", "masquerade"]):
        run(cmd, router)
    # The router's kernel computes checksums itself toward packet sockets (as for any
    # kernel peer on a veth that espswitchd reads).
    for dev in ("in0", "out0"):
        no_tx_offload(router, dev)
    vms = []
    for hv, addr, gw, n in ((hv1, PRIVATE, ROUTER_IN, 1), (hv2, PUBLIC, None, 2)):
        hv.vsctl("add-br", "br-phy", "--", "add-port", "br-phy", "ul0")
        hv.sh("ip", "addr", "add", f"{addr}/24", "dev", "br-phy")
        hv.sh("ip", "link", "set", "br-phy", "up")
        if gw:
            hv.sh("ip", "route", "add", "default", "via", gw)
        vm = lab.vm(f"natvm{n}", n, f"192.168.30.{n}")
        hv.vsctl("add-br", "br-int")
        hv.add_vm("br-int", vm)
        vms.append(vm)
    # hv1 knows hv2 by its public address; hv2 knows hv1 by the router's public address,
    # and (PSK identities being the addresses) by the private address hv1 calls itself.
    hv1.vsctl("add-port", "br-int", "tun0", "--", "set", "interface", "tun0",
              "type=vxlanipsec", f"options:remote_ip={PUBLIC}", "options:key=77",
              f"options:psk={PSK}", f"options:ipsec_mode={mode}")
    hv2.vsctl("add-port", "br-int", "tun0", "--", "set", "interface", "tun0",
              "type=vxlanipsec", f"options:remote_ip={ROUTER_OUT}", "options:key=77",
              f"options:psk={PSK}", f"options:remote_name={PRIVATE}",
              f"options:ipsec_mode={mode}")
    established = wait_for(lambda: all(status(h).get("ipsec_state") == "established"
                                       for h in (hv1, hv2)), 30)
    assert established, (status(hv1), status(hv2),
                         hv1.appctl("ike/show", check=False).stdout)
    for hv in (hv1, hv2):
        assert status(hv)["ipsec_encapsulation"] == "yes", status(hv)  # NAT-T chosen
    assert wait_until(lambda: vms[0].can_reach(vms[1].ip), 10) is not None
    assert "50 received" in vms[0].ping(vms[1].ip, count=50, wait=3).stdout
    assert "50 received" in vms[1].ping(vms[0].ip, count=50, wait=3).stdout
    # What the NAT tracked: UDP to 500 and 4500 only; no raw ESP, no plaintext VXLAN.
    flows = [line.split() for line in run(["cat", "/proc/net/nf_conntrack"], router,
                                          check=False).stdout.splitlines()]
    assert flows, "the router tracked nothing"
    assert all(f[3] == "17" for f in flows), flows
    assert {next(x for x in f if x.startswith("dport=")) for f in flows} <= \
        {"dport=500", "dport=4500"}, flows

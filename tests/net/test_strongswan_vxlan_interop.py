"""espswitch's IKE-keyed `vxlanipsec` against strongSwan carrying a kernel VXLAN device,
over an IPv4 and over an IPv6 underlay (issue 12).

Hypervisor A runs espswitch (br-phy on a veth underlay, 192.0.2.1 or 2001:db8:5::1; br-int
with a VM at 198.51.100.1 and `tun0`, a tunnel-mode, UDP-encapsulated `vxlanipsec` keyed
with a PSK). Host B is a plain namespace (192.0.2.2 or 2001:db8:5::2) with charon +
kernel-libipsec and a kernel VXLAN device `vx0` (VNI 42, 198.51.100.2/24) over the same
family, as in references.md ("strongSwan carrying kernel VXLAN"): `ip rule`s send only
VXLAN to A into libipsec's table 220 (ipsec0).

Traffic selectors: espswitch proposes and accepts one CHILD_SA, UDP between the two
endpoints with any ports (`A/32[udp]` <-> `B/32[udp]`, over IPv6 `A/128[udp]` <->
`B/128[udp]`, vswitchd/ike_peers.py): VXLAN goes both ways in it, from each side's
flow-hashed source port (the kernel's default here). B's side configures the same. Over
IPv6 the identities are ID_IPV6_ADDR, the NAT detection hashes take 16-byte addresses (no
NAT is seen but the forced encapsulation's), and tunnel mode's inner header is IPv6.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

import pytest

from espswitch.cli.lab import CHARON, tcpdump

from .ipsec_helpers import Charon, iface_status, received
from .lab import no_tx_offload, run, wait_until

pytestmark = pytest.mark.net

A_VM, B_VX = "198.51.100.1", "198.51.100.2"
VNI = 42
PSK = "strongswan-vxlan-interop-psk-4f2a9c"
N_PINGS = 20


@dataclass(frozen=True)
class Underlay:
    """The two endpoints of one address family, and what differs with it."""

    a: str
    b: str
    plen: int  # of the underlay subnet
    host: int  # a host's prefix length: /32 or /128
    ip: str  # the ip(8) family flag
    inner_mtu: int  # ipsec0 has MTU 1400; fragments of VXLAN match no selector
    ether: str  # what scapy calls the outer IP layer


UNDERLAYS = {
    "ipv4": Underlay("192.0.2.1", "192.0.2.2", 24, 32, "-4", 1350, "IP"),
    # The VXLAN header over IPv6 is 20 bytes longer.
    "ipv6": Underlay("2001:db8:5::1", "2001:db8:5::2", 64, 128, "-6", 1330, "IPv6"),
}


def swanctl_conf(u: Underlay) -> str:
    return f"""connections {{
  vx {{
    version = 2
    local_addrs = {u.b}
    remote_addrs = {u.a}
    proposals = aes128gcm16-prfsha256-x25519
    encap = yes
    dpd_delay = 0
    rekey_time = 0
    local {{
      auth = psk
      id = {u.b}
    }}
    remote {{
      auth = psk
      id = {u.a}
    }}
    children {{
      vxlan {{
        local_ts = {u.b}/{u.host}[udp]
        remote_ts = {u.a}/{u.host}[udp]
        esp_proposals = aes128gcm16
        mode = tunnel
        rekey_time = 0
      }}
    }}
  }}
}}
secrets {{
  ike-vx {{
    id-a = {u.a}
    id-b = {u.b}
    secret = "{PSK}"
  }}
}}
"""


def _missing() -> str | None:
    if not os.access(CHARON, os.X_OK) or shutil.which("swanctl") is None:
        return "strongSwan (charon, swanctl) is not installed"
    if shutil.which("tcpdump") is None:
        return "needs tcpdump"
    return None


@pytest.fixture(params=sorted(UNDERLAYS))
def topo(lab, tmp_path, request):
    """A (espswitch) and B (charon + kernel VXLAN) over the underlay family of the
    parameter, charon loaded before tun0 exists."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    u = UNDERLAYS[request.param]
    lab.ipv6 = u.host == 128  # the namespaces' IPv6 is off unless it is the underlay's
    a = lab.hypervisor("ssa")
    b = lab.netns("ssb")
    a.start()
    run(["ip", "link", "add", "ul0", "netns", a.ns, "type", "veth", "peer", "name", "ul0",
         "netns", b])
    a.vsctl("add-br", "br-phy", "--", "add-port", "br-phy", "ul0")
    a.sh("ip", "addr", "add", f"{u.a}/{u.plen}", "dev", "br-phy", *nodad(u))
    a.sh("ip", "link", "set", "br-phy", "up")
    # A kernel sending into a veth that a packet socket reads must compute its checksums.
    no_tx_offload(b, "ul0")
    vx = run(["ip", "link", "add", "vx0", "type", "vxlan", "id", str(VNI), "local", u.b,
              "remote", u.a, "dstport", "4789"], b, check=False)
    if vx.returncode:
        pytest.skip(f"no kernel VXLAN devices here: {vx.stderr.strip()}")
    for cmd in (["ip", "addr", "add", f"{u.b}/{u.plen}", "dev", "ul0", *nodad(u)],
                ["ip", "link", "set", "ul0", "up"],
                ["ip", "link", "set", "vx0", "mtu", str(u.inner_mtu), "up"],
                ["ip", "addr", "add", f"{B_VX}/24", "dev", "vx0"],
                # Only VXLAN to A enters libipsec's table 220; IKE and UDP/4500 stay out.
                ["ip", u.ip, "rule", "add", "pref", "218", "to", f"{u.a}/{u.host}", "ipproto",
                 "udp", "dport", "4789", "lookup", "220"],
                # Until the CHILD_SA is installed table 220 is empty: VXLAN (IPv6's MLD
                # reports, as soon as vx0 is up) must not fall through to main in clear.
                ["ip", u.ip, "rule", "add", "pref", "218", "to", f"{u.a}/{u.host}", "ipproto",
                 "udp", "dport", "4789", "blackhole"],
                ["ip", u.ip, "rule", "add", "pref", "219", "to", f"{u.a}/{u.host}", "lookup",
                 "main"]):
        run(cmd, b)
    charon = Charon(b, tmp_path / "charon")
    try:
        charon.start(swanctl_conf(u))
        vm = lab.vm("ssv", 1, A_VM)
        a.vsctl("add-br", "br-int")
        a.add_vm("br-int", vm)
        vm.sh("ip", "link", "set", vm.tap, "mtu", str(u.inner_mtu))
        pcap = str(tmp_path / "underlay.pcap")
        with tcpdump(b, "ul0", pcap):
            yield {"a": a, "b": b, "vm": vm, "charon": charon, "pcap": pcap, "u": u}
    finally:
        charon.stop()


def nodad(u: Underlay) -> list[str]:
    """An IPv6 address usable at once (no duplicate address detection)."""
    return ["nodad"] if u.host == 128 else []


def add_tunnel(t) -> None:
    t["a"].vsctl("add-port", "br-int", "tun0", "--", "set", "Interface", "tun0",
                 "type=vxlanipsec", f"options:remote_ip={t['u'].b}", f"options:key={VNI}",
                 f"options:psk={PSK}", "options:ipsec_mode=tunnel",
                 "options:ipsec_encapsulation=yes")


def diagnostics(t) -> str:
    a, charon = t["a"], t["charon"]
    ike = a.appctl("ike/show", check=False).stdout
    return (f"espswitch status: {iface_status(a)}\nike/show:\n{ike}\n"
            f"swanctl --list-sas:\n{charon.list_sas()}\ncharon.log:\n{charon.log()[-4000:]}")


def wait_established(t, timeout: float = 30) -> str:
    """Both sides up: charon's IKE SA ESTABLISHED with its CHILD_SA INSTALLED, espswitch's
    ipsec_state=established; returns `swanctl --list-sas`."""
    a, charon = t["a"], t["charon"]

    def up() -> bool:
        sas = charon.list_sas()
        return ("ESTABLISHED" in sas and "INSTALLED" in sas
                and iface_status(a).get("ipsec_state") == "established")

    assert wait_until(up, timeout, 0.25) is not None, diagnostics(t)
    return charon.list_sas()


def check_traffic_and_wire(t, sas: str) -> None:
    a, vm, u = t["a"], t["vm"], t["u"]
    assert re.search(r"vx: #\d+, ESTABLISHED, IKEv2", sas), sas
    assert re.search(r"vxlan: #\d+, reqid \d+, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-128",
                     sas), sas
    assert re.search(rf"local  {u.b}/{u.host}\[udp\]\n\s+remote {u.a}/{u.host}\[udp\]\n",
                     sas), sas
    st = iface_status(a)
    assert st.get("ipsec_state") == "established", st
    assert st.get("ipsec_keying") == "ikev2", st
    # The SA pair agrees: espswitch's spi_in is charon's outbound SPI and back.
    m = re.search(r"\n\s+in  ([0-9a-f]{8}),.*\n\s+out ([0-9a-f]{8}),", sas)
    assert m, sas
    charon_in, charon_out = (int(x, 16) for x in m.groups())
    assert int(st["spi_in"], 16) == charon_out and int(st["spi_out"], 16) == charon_in, \
        (st, sas)
    ike = a.appctl("ike/show").stdout
    assert "established" in ike.lower(), ike
    # ARP over the tunnel first, then the measured pings.
    assert wait_until(lambda: vm.can_reach(B_VX), 15) is not None, diagnostics(t)
    ping = vm.ping(B_VX, count=N_PINGS, interval=0.05, wait=2)
    assert received(ping) == N_PINGS, ping.stdout + diagnostics(t)
    back = run(["ping", "-n", "-q", "-c", str(N_PINGS), "-i", "0.05", "-W", "2", A_VM],
               t["b"], check=False, timeout=60)
    assert received(back) == N_PINGS, back.stdout + diagnostics(t)
    # The VXLAN really went through libipsec's ipsec0, not around it.
    tx = int(run(["cat", "/sys/class/net/ipsec0/statistics/tx_packets"], t["b"]).stdout)
    assert tx >= 2 * N_PINGS, tx
    for text in (ike, str(st)):
        assert PSK not in text


def check_underlay(t) -> None:
    """Only IKE (UDP 500) and UDP 4500 (IKE and ESP-in-UDP) between A and B on the wire."""
    s = pytest.importorskip("scapy.all")
    u = t["u"]
    ip = getattr(s, u.ether)
    pkts = [p for p in s.rdpcap(t["pcap"]) if p.haslayer(ip)
            and {p[ip].src, p[ip].dst} == {u.a, u.b} and not p.haslayer(s.ICMPv6ND_NS)
            and not p.haslayer(s.ICMPv6ND_NA)]
    assert pkts, "nothing captured on the underlay"
    others = [p.summary() for p in pkts
              if not (p.haslayer(s.UDP) and {p[s.UDP].sport, p[s.UDP].dport} <= {500, 4500})]
    assert not others, f"neither UDP 500 nor 4500 on the underlay: {others[:5]}"
    proto = "proto" if u.ether == "IP" else "nh"
    assert not [p for p in pkts if getattr(p[ip], proto) == 50], "raw ESP on the underlay"
    assert not [p for p in pkts if p.haslayer(s.UDP) and 4789 in (p[s.UDP].sport,
                                                                  p[s.UDP].dport)]
    ike = [p for p in pkts if p[s.UDP].dport == 500]
    esp = [p for p in pkts if p[s.UDP].dport == 4500
           and bytes(p[s.UDP].payload)[:4] != b"\0\0\0\0"]
    assert ike, "no IKE_SA_INIT on UDP 500"
    # At least the 2 x N_PINGS echo requests and replies each way, ESP-in-UDP.
    assert len(esp) >= 4 * N_PINGS, len(esp)
    with open(t["pcap"], "rb") as f:
        assert PSK.encode() not in f.read()


def test_espswitch_initiates(topo):
    """charon only responds; tun0 is added after charon has loaded its config."""
    add_tunnel(topo)
    sas = wait_established(topo)
    # charon is the responder: its local (starred) SPI is the responder's.
    assert re.search(r"IKEv2, [0-9a-f]{16}_i [0-9a-f]{16}_r\*", sas), sas
    check_traffic_and_wire(topo, sas)
    check_underlay(topo)


def test_strongswan_initiates(topo):
    """charon tears down the SA espswitch made, then initiates a new one itself."""
    charon = topo["charon"]
    add_tunnel(topo)
    wait_established(topo)
    charon.swanctl("--terminate", "--ike", "vx", "--timeout", "10")
    charon.swanctl("--initiate", "--child", "vxlan", "--timeout", "20")
    sas = wait_established(topo)
    assert re.search(r"IKEv2, [0-9a-f]{16}_i\* [0-9a-f]{16}_r\b", sas), sas
    check_traffic_and_wire(topo, sas)
    check_underlay(topo)

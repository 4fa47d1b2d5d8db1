"""espswitch's IKE-keyed `vxlanipsec` against strongSwan carrying a kernel VXLAN device.

Hypervisor A runs espswitch (br-phy on a veth underlay 192.0.2.1; br-int with a VM at
198.51.100.1 and `tun0`, a tunnel-mode, UDP-encapsulated `vxlanipsec` keyed with a PSK).
Host B is a plain namespace (192.0.2.2) with charon + kernel-libipsec and a kernel VXLAN
device `vx0` (VNI 42, 198.51.100.2/24), as in references.md ("strongSwan carrying kernel
VXLAN"): `ip rule`s send only VXLAN to A into libipsec's table 220 (ipsec0).

Traffic selectors: espswitch proposes and accepts one CHILD_SA, UDP between the two
endpoints with any ports (`A/32[udp]` <-> `B/32[udp]`, vswitchd/ike.py): VXLAN goes both
ways in it, from each side's flow-hashed source port (the kernel's default here). B's side
configures the same.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from espswitch.cli.lab import CHARON, tcpdump

from .ipsec_helpers import Charon, iface_status, received
from .lab import no_tx_offload, run, wait_until

pytestmark = pytest.mark.net

A_IP, B_IP = "192.0.2.1", "192.0.2.2"
A_VM, B_VX = "198.51.100.1", "198.51.100.2"
VNI = 42
PSK = "strongswan-vxlan-interop-psk-4f2a9c"
INNER_MTU = 1350  # ipsec0 has MTU 1400; fragments of VXLAN match no selector
N_PINGS = 20


SWANCTL_CONF = f"""connections {{
  vx {{
    version = 2
    local_addrs = {B_IP}
    remote_addrs = {A_IP}
    proposals = aes128gcm16-prfsha256-x25519
    encap = yes
    dpd_delay = 0
    rekey_time = 0
    local {{
      auth = psk
      id = {B_IP}
    }}
    remote {{
      auth = psk
      id = {A_IP}
    }}
    children {{
      vxlan {{
        local_ts = {B_IP}/32[udp]
        remote_ts = {A_IP}/32[udp]
        esp_proposals = aes128gcm16
        mode = tunnel
        rekey_time = 0
      }}
    }}
  }}
}}
secrets {{
  ike-vx {{
    id-a = {A_IP}
    id-b = {B_IP}
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


@pytest.fixture
def topo(lab, tmp_path):
    """A (espswitch) and B (charon + kernel VXLAN), charon loaded before tun0 exists."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    a = lab.hypervisor("ssa")
    b = lab.netns("ssb")
    a.start()
    run(["ip", "link", "add", "ul0", "netns", a.ns, "type", "veth", "peer", "name", "ul0",
         "netns", b])
    a.vsctl("add-br", "br-phy", "--", "add-port", "br-phy", "ul0")
    a.sh("ip", "addr", "add", f"{A_IP}/24", "dev", "br-phy")
    a.sh("ip", "link", "set", "br-phy", "up")
    # A kernel sending into a veth that a packet socket reads must compute its checksums.
    no_tx_offload(b, "ul0")
    vx = run(["ip", "link", "add", "vx0", "type", "vxlan", "id", str(VNI), "local", B_IP,
              "remote", A_IP, "dstport", "4789"], b, check=False)
    if vx.returncode:
        pytest.skip(f"no kernel VXLAN devices here: {vx.stderr.strip()}")
    for cmd in (["ip", "addr", "add", f"{B_IP}/24", "dev", "ul0"],
                ["ip", "link", "set", "ul0", "up"],
                ["ip", "link", "set", "vx0", "mtu", str(INNER_MTU), "up"],
                ["ip", "addr", "add", f"{B_VX}/24", "dev", "vx0"],
                # Only VXLAN to A enters libipsec's table 220; IKE and UDP/4500 stay out.
                ["ip", "rule", "add", "pref", "218", "to", f"{A_IP}/32", "ipproto", "udp",
                 "dport", "4789", "lookup", "220"],
                ["ip", "rule", "add", "pref", "219", "to", f"{A_IP}/32", "lookup", "main"]):
        run(cmd, b)
    charon = Charon(b, tmp_path / "charon")
    try:
        charon.start(SWANCTL_CONF)
        vm = lab.vm("ssv", 1, A_VM)
        a.vsctl("add-br", "br-int")
        a.add_vm("br-int", vm)
        vm.sh("ip", "link", "set", vm.tap, "mtu", str(INNER_MTU))
        pcap = str(tmp_path / "underlay.pcap")
        with tcpdump(b, "ul0", pcap):
            yield {"a": a, "b": b, "vm": vm, "charon": charon, "pcap": pcap}
    finally:
        charon.stop()


def add_tunnel(a) -> None:
    a.vsctl("add-port", "br-int", "tun0", "--", "set", "Interface", "tun0", "type=vxlanipsec",
            f"options:remote_ip={B_IP}", f"options:key={VNI}", f"options:psk={PSK}",
            "options:ipsec_mode=tunnel", "options:ipsec_encapsulation=yes")


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
    a, vm = t["a"], t["vm"]
    assert re.search(r"vx: #\d+, ESTABLISHED, IKEv2", sas), sas
    assert re.search(r"vxlan: #\d+, reqid \d+, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-128",
                     sas), sas
    assert re.search(rf"local  {B_IP}/32\[udp\]\n\s+remote {A_IP}/32\[udp\]\n", sas), sas
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
    pkts = [p for p in s.rdpcap(t["pcap"]) if p.haslayer(s.IP)
            and {p[s.IP].src, p[s.IP].dst} == {A_IP, B_IP}]
    assert pkts, "nothing captured on the underlay"
    others = [p.summary() for p in pkts
              if not (p.haslayer(s.UDP) and {p[s.UDP].sport, p[s.UDP].dport} <= {500, 4500})]
    assert not others, f"neither UDP 500 nor 4500 on the underlay: {others[:5]}"
    assert not [p for p in pkts if p[s.IP].proto == 50], "raw ESP on the underlay"
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
    add_tunnel(topo["a"])
    sas = wait_established(topo)
    # charon is the responder: its local (starred) SPI is the responder's.
    assert re.search(r"IKEv2, [0-9a-f]{16}_i [0-9a-f]{16}_r\*", sas), sas
    check_traffic_and_wire(topo, sas)
    check_underlay(topo)


def test_strongswan_initiates(topo):
    """charon tears down the SA espswitch made, then initiates a new one itself."""
    a, charon = topo["a"], topo["charon"]
    add_tunnel(a)
    wait_established(topo)
    charon.swanctl("--terminate", "--ike", "vx", "--timeout", "10")
    charon.swanctl("--initiate", "--child", "vxlan", "--timeout", "20")
    sas = wait_established(topo)
    assert re.search(r"IKEv2, [0-9a-f]{16}_i\* [0-9a-f]{16}_r\b", sas), sas
    check_traffic_and_wire(topo, sas)
    check_underlay(topo)

"""Certificate-keyed `vxlanipsec` against a stock strongSwan host, with a PKI made by
strongSwan's own `pki` tool, through an underlay that drops IP fragments.

Hypervisor A runs espswitch (192.0.2.1, a VM at 10.77.0.1 behind `tun0`, tunnel mode,
UDP-encapsulated); host B (203.0.113.2) runs charon with kernel-libipsec and a kernel VXLAN
device (10.77.0.2), as in test_strongswan_vxlan_interop.py. Between them router R forwards,
and an nftables rule drops every IPv4 fragment it sees (counted).

`pki` makes a root CA, an intermediate CA and both end-entity certificates (ECDSA or RSA-3072
all the way down): its DNs are PrintableString, espswitch's `remote_name` is the subject
exactly as `pki --print` shows it (parsed into UTF8String), and strongSwan echoes that as its
IDr when espswitch initiates: the names match only as RFC 5280 compares them. Each side
trusts the root only, so each must send its intermediate, and the IKE_AUTH messages with
two certificates do not fit 1280 bytes: they pass only as IKE fragments (RFC 7383).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from espswitch.cli.lab import CHARON, tcpdump

from .ipsec_helpers import Charon, iface_status, received
from .lab import no_tx_offload, run, wait_until

pytestmark = pytest.mark.net

A_IP, R_A, R_B, B_IP = "192.0.2.1", "192.0.2.254", "203.0.113.254", "203.0.113.2"
A_VM, B_VX = "10.77.0.1", "10.77.0.2"
VNI = 77
INNER_MTU = 1350  # libipsec's ipsec0 has MTU 1400
N_PINGS = 20
O = "espswitch interop"  # noqa: E741 - the O of the DNs
# IKE proposals per key type: different DH groups and PRFs on the way.
IKE = {"ecdsa": "aes256gcm16-prfsha384-ecp384", "rsa": "aes128gcm16-prfsha256-modp3072"}


def _missing() -> str | None:
    if not os.access(CHARON, os.X_OK) or shutil.which("swanctl") is None:
        return "strongSwan (charon, swanctl) is not installed"
    if shutil.which("pki") is None:
        return "strongSwan's pki is not installed (Debian package strongswan-pki)"
    for tool in ("nft", "tcpdump"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists("/usr/lib/ipsec/plugins/libstrongswan-openssl.so"):
        return "charon's openssl plugin is missing (libstrongswan-standard-plugins)"
    return None


# -- the PKI, made with strongSwan's pki ---------------------------------------------------


def pki(*args: str, out: Path | None = None) -> str:
    r = subprocess.run(["pki", *args], capture_output=True, timeout=120)
    if r.returncode:
        raise AssertionError(f"pki {' '.join(args)}: {r.stderr.decode(errors='replace')}")
    if out is not None:
        out.write_bytes(r.stdout)
    return r.stdout.decode(errors="replace")


def subject(cert: Path) -> str:
    """The subject DN as `pki --print` shows it."""
    m = re.search(r'subject:\s+"(.*)"', pki("--print", "--in", str(cert)))
    assert m, cert
    return m.group(1)


class Pki:
    """Root CA -> intermediate CA -> espswitch's and strongSwan's certificates."""

    def __init__(self, d: Path, kind: str) -> None:
        self.d, self.kind = d, kind
        d.mkdir(parents=True, exist_ok=True)
        ca_size, ee_size = ("384", "256") if kind == "ecdsa" else ("3072", "3072")
        self.root = self._issue("root", ca_size, f"C=CH, O={O}, CN=Root CA", ca=True)
        self.sub = self._issue("sub", ca_size, f"C=CH, O={O}, OU=Intermediate, CN=Sub CA",
                               ca=True, issuer="root")
        self.es = self._issue("es", ee_size, f"C=CH, O={O}, CN=espswitch hv1", issuer="sub",
                              san="espswitch.example")
        self.sw = self._issue("sw", ee_size, f"C=CH, O={O}, CN=strongswan.example",
                              issuer="sub", san="strongswan.example")

    def _issue(self, name: str, size: str, dn: str, *, ca: bool = False,
               issuer: str | None = None, san: str | None = None) -> Path:
        key, cert = self.d / f"{name}.key", self.d / f"{name}.pem"
        pki("--gen", "--type", self.kind, "--size", size, "--outform", "pem", out=key)
        flags = ["--ca"] if ca else []
        if san:
            flags += ["--san", san]
        if issuer is None:
            pki("--self", "--in", str(key), "--type", self.kind, "--dn", dn, "--lifetime",
                "30", *flags, "--outform", "pem", out=cert)
        else:
            pki("--issue", "--cacert", str(self.d / f"{issuer}.pem"), "--cakey",
                str(self.d / f"{issuer}.key"), "--in", str(key), "--type", self.kind,
                "--dn", dn, "--lifetime", "30", *flags, "--outform", "pem", out=cert)
        return cert

    def key(self, cert: Path) -> Path:
        return cert.with_suffix(".key")


# -- strongSwan on B --------------------------------------------------------------------


def swanctl_conf(p: Pki, *, fragmentation: str = "yes", sw_id: str | None = None) -> str:
    sw_id = sw_id or subject(p.sw)
    return f"""connections {{
  vx {{
    version = 2
    local_addrs = {B_IP}
    remote_addrs = {A_IP}
    proposals = {IKE[p.kind]}
    encap = yes
    dpd_delay = 0
    rekey_time = 0
    fragmentation = {fragmentation}
    local {{
      auth = pubkey
      certs = sw.pem
      id = "{sw_id}"
    }}
    remote {{
      auth = pubkey
      id = "{subject(p.es)}"
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
"""


class PkiCharon(Charon):
    """The shared Charon with a `Pki`'s CAs and strongSwan's certificate and key loaded."""

    def start_with(self, p: Pki, conf: str) -> None:
        keydir = "ecdsa" if p.kind == "ecdsa" else "rsa"
        for sub in ("x509", "x509ca", keydir):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(p.root, self.dir / "x509ca" / "root.pem")
        shutil.copy(p.sub, self.dir / "x509ca" / "sub.pem")
        shutil.copy(p.sw, self.dir / "x509" / "sw.pem")
        shutil.copy(p.key(p.sw), self.dir / keydir / "sw.pem")
        self.start(conf)


# -- the topology -------------------------------------------------------------------------


def fragments_dropped(router: str) -> int:
    """Packets the router's fragment rule dropped so far."""
    out = run(["nft", "list", "chain", "inet", "underlay", "nofrag"], router).stdout
    m = re.search(r"counter packets (\d+)", out)
    assert m, out
    return int(m.group(1))


@pytest.fixture
def topo(lab, tmp_path):
    """A (espswitch) - R (drops IP fragments) - B (charon + kernel VXLAN)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    a = lab.hypervisor("sca")
    r = lab.netns("scr")
    b = lab.netns("scb")
    a.start()
    run(["ip", "link", "add", "ul0", "netns", a.ns, "type", "veth", "peer", "name", "ra0",
         "netns", r])
    run(["ip", "link", "add", "rb0", "netns", r, "type", "veth", "peer", "name", "ul0",
         "netns", b])
    for cmd in (["ip", "addr", "add", f"{R_A}/24", "dev", "ra0"],
                ["ip", "addr", "add", f"{R_B}/24", "dev", "rb0"],
                ["ip", "link", "set", "ra0", "up"], ["ip", "link", "set", "rb0", "up"],
                ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                ["nft", "add", "table", "inet", "underlay"],
                # Before any reassembly (conntrack's defrag hooks in at -400).
                ["nft", "add chain inet underlay nofrag { type filter hook prerouting "
                        "priority -500 ; }"],
                ["nft", "add rule inet underlay nofrag ip frag-off & 0x3fff != 0 counter "
                        "drop"]):
        run(cmd, r)
    # Kernels sending into a veth that a packet socket reads must compute checksums.
    no_tx_offload(r, "ra0")
    a.vsctl("add-br", "br-phy", "--", "add-port", "br-phy", "ul0")
    a.sh("ip", "link", "set", "ul0", "up")
    a.sh("ip", "addr", "add", f"{A_IP}/24", "dev", "br-phy")
    a.sh("ip", "link", "set", "br-phy", "up")
    a.sh("ip", "route", "add", "default", "via", R_A)
    vx = run(["ip", "link", "add", "vx0", "type", "vxlan", "id", str(VNI), "local", B_IP,
              "remote", A_IP, "dstport", "4789"], b, check=False)
    if vx.returncode:
        pytest.skip(f"no kernel VXLAN devices here: {vx.stderr.strip()}")
    for cmd in (["ip", "addr", "add", f"{B_IP}/24", "dev", "ul0"],
                ["ip", "link", "set", "ul0", "up"],
                ["ip", "route", "add", "default", "via", R_B],
                ["ip", "link", "set", "vx0", "mtu", str(INNER_MTU), "up"],
                ["ip", "addr", "add", f"{B_VX}/24", "dev", "vx0"],
                # Only VXLAN to A enters libipsec's table 220; IKE and UDP/4500 stay out.
                ["ip", "rule", "add", "pref", "218", "to", f"{A_IP}/32", "ipproto", "udp",
                 "dport", "4789", "lookup", "220"],
                ["ip", "rule", "add", "pref", "219", "to", f"{A_IP}/32", "lookup", "main"]):
        run(cmd, b)
    charon = PkiCharon(b, tmp_path / "charon")
    try:
        vm = lab.vm("scv", 1, A_VM)
        a.vsctl("add-br", "br-int")
        a.add_vm("br-int", vm)
        vm.sh("ip", "link", "set", vm.tap, "mtu", str(INNER_MTU))
        pcap = str(tmp_path / "underlay.pcap")
        with tcpdump(b, "ul0", pcap):
            yield {"a": a, "r": r, "b": b, "vm": vm, "charon": charon, "pcap": pcap,
                   "dir": tmp_path}
    finally:
        charon.stop()


def configure_espswitch(a, p: Pki, remote_name: str) -> None:
    """Our certificate followed by the intermediate in one file; the root as ca_cert."""
    chain = p.d / "es-chain.pem"
    chain.write_bytes(p.es.read_bytes() + p.sub.read_bytes())
    a.vsctl("set", "Open_vSwitch", ".", f"other_config:certificate={chain}",
            f"other_config:private_key={p.key(p.es)}", f"other_config:ca_cert={p.root}")
    a.vsctl("add-port", "br-int", "tun0", "--", "set", "Interface", "tun0", "type=vxlanipsec",
            f"options:remote_ip={B_IP}", f"options:key={VNI}",
            f"options:remote_name={remote_name}", f"options:ike={IKE[p.kind]}",
            "options:ipsec_mode=tunnel", "options:ipsec_encapsulation=yes")


def diagnostics(t) -> str:
    a, charon = t["a"], t["charon"]
    ike = a.appctl("ike/show", check=False).stdout
    log = a.sh("tail", "-n", "30", os.path.join(a.dir, "espswitchd.log"), check=False).stdout
    return (f"espswitch status: {iface_status(a)}\nike/show:\n{ike}\nespswitchd.log:\n{log}\n"
            f"swanctl --list-sas:\n{charon.list_sas()}\ncharon.log:\n{charon.log()[-5000:]}")


def wait_established(t, timeout: float = 40) -> str:
    a, charon = t["a"], t["charon"]

    def up() -> bool:
        sas = charon.list_sas()
        return ("ESTABLISHED" in sas and "INSTALLED" in sas
                and iface_status(a).get("ipsec_state") == "established")

    assert wait_until(up, timeout, 0.25) is not None, diagnostics(t)
    return charon.list_sas()


def ike_counters(a) -> dict[str, int]:
    line = a.appctl("ike/show").stdout.rsplit("IKE messages:", 1)[1]
    return {k.strip().replace(" ", "_"): int(v) for k, v in
            (re.match(r"\s*(.*?)\s+(\d+)$", x).groups() for x in line.strip().split(","))}


def check_tunnel(t, sas: str, p: Pki, peer_id: str | None = None) -> None:
    """Traffic both ways through libipsec; identities shown as text (`peer_id`: what charon
    calls itself, its subject by default); IKE fragmented both ways and no IP fragment ever
    sent."""
    a, vm, charon = t["a"], t["vm"], t["charon"]
    assert re.search(r"vx: #\d+, ESTABLISHED, IKEv2", sas), sas
    assert re.search(r"vxlan: #\d+, reqid \d+, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-128",
                     sas), sas
    st = iface_status(a)
    assert st.get("ipsec_keying") == "ikev2" and "ike_error" not in st, st
    assert wait_until(lambda: vm.can_reach(B_VX), 15) is not None, diagnostics(t)
    ping = vm.ping(B_VX, count=N_PINGS, interval=0.05, wait=2)
    assert received(ping) == N_PINGS, ping.stdout + diagnostics(t)
    back = run(["ping", "-n", "-q", "-c", str(N_PINGS), "-i", "0.05", "-W", "2", A_VM],
               t["b"], check=False, timeout=60)
    assert received(back) == N_PINGS, back.stdout + diagnostics(t)
    # Identities as strongSwan and pki write them, never DER in hex.
    show = a.appctl("ike/show").stdout
    assert f"peer id {peer_id or subject(p.sw)}, IKE fragmentation" in show, show
    assert f"ids {subject(p.es)} <-> " in show, show
    # charon split its IKE_AUTH and reassembled ours; so did espswitch, the other way.
    log = charon.log()
    split = re.findall(r"splitting IKE message \((\d+) bytes\) into (\d+) fragments", log)
    joined = re.findall(r"reassembled fragmented IKE message \((\d+) bytes\)", log)
    assert split and joined, log[-5000:]
    c = ike_counters(a)
    assert c["fragments_sent"] >= 2 and c["fragments_reassembled"] >= 1, c
    assert c["fragments_forged"] == c["fragments_invalid"] == 0, c
    # Nothing was IP-fragmented on the way: the rule dropped nothing, every IKE datagram
    # fits 1280 bytes.
    assert fragments_dropped(t["r"]) == 0
    print(f"\n[{p.kind}] charon split {split} (bytes, fragments), reassembled {joined} "
          f"bytes; espswitch: {c}")


def check_underlay(t) -> None:
    s = pytest.importorskip("scapy.all")
    pkts = [q for q in s.rdpcap(t["pcap"]) if q.haslayer(s.IP)]
    assert pkts, "nothing captured on the underlay"
    assert not [q for q in pkts if q[s.IP].flags.MF or q[s.IP].frag], "IP fragments seen"
    ike = [len(q[s.IP]) for q in pkts if q.haslayer(s.UDP) and (
        q[s.UDP].dport == 500 or (q[s.UDP].dport == 4500
                                  and bytes(q[s.UDP].payload)[:4] == b"\0\0\0\0"))]
    assert ike and max(ike) <= 1280, ike
    print(f"IKE datagrams on the wire (IP bytes): {sorted(ike, reverse=True)[:8]} ...")


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
@pytest.mark.parametrize("initiator", ["espswitch", "strongswan"])
def test_pki_certificates_chain_and_fragments(topo, kind, initiator):
    p = Pki(topo["dir"] / "pki", kind)
    charon = topo["charon"]
    charon.start_with(p, swanctl_conf(p))
    if initiator == "strongswan":
        # espswitch initiates as soon as tun0 exists: once that SA is up, charon tears it
        # down and initiates itself (espswitch waits 10 s before it tries again).
        configure_espswitch(topo["a"], p, subject(p.sw))
        wait_established(topo)
        charon.swanctl("--terminate", "--ike", "vx", "--timeout", "10")
        charon.swanctl("--initiate", "--child", "vxlan", "--timeout", "30")
        sas = wait_established(topo)
        assert re.search(r"IKEv2, [0-9a-f]{16}_i\* [0-9a-f]{16}_r\b", sas), sas
    else:
        configure_espswitch(topo["a"], p, subject(p.sw))
        sas = wait_established(topo)
        assert re.search(r"IKEv2, [0-9a-f]{16}_i [0-9a-f]{16}_r\*", sas), sas
    check_tunnel(topo, sas, p)
    check_underlay(topo)


@pytest.mark.parametrize("charon_id", ["fqdn", "dn"])
def test_open_vswitch_style_remote_name(topo, charon_id):
    """remote_name as Open vSwitch's IPsec documentation writes it: the peer's CN alone
    (its certificate has the same name as a DNS subjectAltName, as OVS requires).
    ovs-monitor-ipsec configures a strongSwan host with leftid=NAME, an FQDN identity:
    espswitch initiates, and the FQDN is checked against the subjectAltName. A peer that
    identifies itself by its subject DN instead (charon's default) is accepted by the CN:
    it initiates (espswitch's own attempts name it strongswan.example in IDr, which that
    charon refuses)."""
    p = Pki(topo["dir"] / "pki", "ecdsa")
    charon = topo["charon"]
    fqdn = charon_id == "fqdn"
    charon.start_with(p, swanctl_conf(p, sw_id="strongswan.example" if fqdn else None))
    configure_espswitch(topo["a"], p, "strongswan.example")
    if not fqdn:
        charon.swanctl("--initiate", "--child", "vxlan", "--timeout", "30")
    sas = wait_established(topo)
    check_tunnel(topo, sas, p, peer_id="strongswan.example" if fqdn else None)


def test_without_ike_fragmentation_the_underlay_drops_ike_auth(topo):
    """The control: with fragmentation off at charon, espswitch does not fragment either,
    its IKE_AUTH leaves IP-fragmented, the router drops the fragments, and nothing comes
    up (espswitch says why in ike_error)."""
    p = Pki(topo["dir"] / "pki", "rsa")
    topo["charon"].start_with(p, swanctl_conf(p, fragmentation="no"))
    configure_espswitch(topo["a"], p, subject(p.sw))
    r, a = topo["r"], topo["a"]
    # Its first IKE_AUTH and two retransmissions, each in IP fragments (3 of ~3 KB).
    assert wait_until(lambda: ike_counters(a)["retransmits"] >= 2 and
                      fragments_dropped(r) >= 6, 30, 0.25) is not None, diagnostics(topo)
    assert "ESTABLISHED" not in topo["charon"].list_sas()
    assert iface_status(a).get("ipsec_state") == "connecting"
    assert ike_counters(a)["fragments_sent"] == 0
    print(f"\nIP fragments dropped by the router: {fragments_dropped(r)}")


def test_wrong_remote_name_is_reported_as_text(topo):
    """charon initiates as its subject; espswitch expects another name: the refusal names
    both, as text, in status:ike_error and in espswitchd's log (never DER in hex)."""
    p = Pki(topo["dir"] / "pki", "ecdsa")
    charon, a = topo["charon"], topo["a"]
    charon.start_with(p, swanctl_conf(p))
    wanted = f"C=CH, O={O}, CN=someone else"
    configure_espswitch(a, p, wanted)
    charon.swanctl("--initiate", "--child", "vxlan", "--timeout", "30", check=False)
    expected = f"peer identity {subject(p.sw)} is not the configured {wanted}"

    seen: list[str] = []

    def reported() -> bool:
        seen.append(iface_status(a).get("ike_error", ""))
        return expected in seen[-1]

    assert wait_until(reported, 30, 0.25) is not None, diagnostics(topo)
    err = seen[-1]
    log = (Path(a.dir) / "espswitchd.log").read_text(errors="replace")
    assert expected in log, log[-3000:]
    for text in (err, log, a.appctl("ike/show").stdout):
        assert "DER_ASN1_DN" not in text and not re.search(r"3[01]0?[0-9a-f]{40}", text)
    assert f"ids {subject(p.es)} <-> {wanted}" in a.appctl("ike/show").stdout


FRAGMENT_FLOOD = r"""
import os, socket, struct, sys, time
dst, spi_i, spi_r = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
def frag(mid, num, total, body=200, np=0, length=None, flags=0x00):
    n = 28 + 8 + body
    hdr = spi_i + spi_r + bytes([53, 0x20, 37, flags]) + struct.pack("!II", mid, length or n)
    return hdr + struct.pack("!BBHHH", np, 0, 8 + body, num, total) + os.urandom(body)
msgs = []
for mid in range(4):
    for flags in (0x00, 0x20):
        msgs += [frag(mid, n % 3 + 1, 3, flags=flags) for n in range(150)]  # forged
        msgs += [frag(mid, 1, 65535, flags=flags), frag(mid, 0, 2, flags=flags),
                 frag(mid, 3, 2, flags=flags), frag(mid, 1, 0, flags=flags)]  # misnumbered
        msgs.append(frag(mid, 1, 2, flags=flags, length=5000))  # lying length
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for m in msgs:
    s.sendto(b"\0\0\0\0" + m, (dst, 4500))
    s.sendto(m, (dst, 500))
    time.sleep(0.0003)  # a flood, but not one that overruns the daemon's socket buffer
print(2 * len(msgs))
"""


def rss_kb(hv) -> int:
    with open(f"/proc/{hv.pid()}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def test_hostile_fragments_at_the_daemon(topo):
    """Forged, misnumbered and lying fragments with the live IKE SA's SPIs, to both IKE
    ports: counted in ike/show, nothing kept, the SA and the traffic untouched."""
    p = Pki(topo["dir"] / "pki", "ecdsa")
    a, charon = topo["a"], topo["charon"]
    charon.start_with(p, swanctl_conf(p))
    configure_espswitch(a, p, subject(p.sw))
    wait_established(topo)
    before, spi_before, rss_before = ike_counters(a), iface_status(a)["spi_out"], rss_kb(a)
    m = re.search(r"spi_i ([0-9a-f]{16}) spi_r ([0-9a-f]{16})", a.appctl("ike/show").stdout)
    assert m
    out = run(["python3", "-c", FRAGMENT_FLOOD, A_IP, *m.groups()], topo["b"])
    sent = int(out.stdout)
    assert wait_until(lambda: ike_counters(a)["received"] - before["received"] >= sent * 0.9,
                      20, 0.25) is not None, (sent, ike_counters(a))
    c = ike_counters(a)
    delta = {k: c[k] - before.get(k, 0) for k in c}
    # The SA expects a request with ID 0 from charon: those fragments were opened and are
    # forged; the rest were refused before that (unexpected ID, numbering, length).
    assert delta["fragments_forged"] >= 150 and delta["fragments_invalid"] >= 4, delta
    assert delta["fragments_reassembled"] == 0 and delta["dropped"] >= sent * 0.9, delta
    st = iface_status(a)
    assert st["spi_out"] == spi_before and st["ipsec_state"] == "established"
    assert "ESTABLISHED" in charon.list_sas()
    assert received(topo["vm"].ping(B_VX, count=N_PINGS, interval=0.05, wait=2)) == N_PINGS
    assert rss_kb(a) - rss_before < 8 * 1024, (rss_before, rss_kb(a))
    print(f"\n{sent} hostile fragments: {delta}")

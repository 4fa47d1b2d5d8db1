"""Two espswitch hypervisors over an IPv6 underlay (the lab, `Lab(underlay_ips=UNDERLAY6)`):
Geneve and GRE in the clear and `vxlanipsec` with manual keys in transport and tunnel mode.

Pings and iperf3 with IPv4 and IPv6 inside; the tunnel MTU (the largest outer packet fills
the underlay's 1500 bytes, the next inner size is answered with "fragmentation needed" or
ICMPv6 Packet Too Big carrying tunnel_mtu, and IPv6 TCP finds its path MTU through it); the
ESP that espswitch sent, decrypted by scapy and tshark (the VNI inside); ESP that scapy
built, decrypted by espswitch and delivered; hostile ESP and VXLAN over IPv6 counted and
dropped, never delivered, the daemon alive and the tunnel still working.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from espswitch.cli.lab import UNDERLAY6, Lab, tcpdump

from .ipsec_helpers import (
    PATTERN,
    Keys,
    espswitchd_pid,
    mac_of,
    received,
    run,
    scapy,
    send_frames,
    statistics,
    status,
    tshark_available,
    tshark_rows,
    wait_for,
    wait_for_counter,
)

pytestmark = pytest.mark.net

ESP = "aes128gcm16"
VM6 = ("fd10::1", "fd10::2")
CASES = ("geneve", "gre", "transport", "tunnel")
# The clear tunnels' MTU over a 1500-byte IPv6 underlay: IPv6 40, the encapsulation (UDP 8 +
# Geneve 8; GRE 4 + key 4), the inner Ethernet header 14.
CLEAR_MTU = {"geneve": 1500 - 40 - 16 - 14, "gre": 1500 - 40 - 8 - 14}


def make_lab(case: str) -> tuple[Lab, Keys | None]:
    if case in CLEAR_MTU:
        return Lab(underlay_ips=UNDERLAY6, tunnel_type=case), None
    keys = Keys.fresh(ESP)
    keys.underlay = UNDERLAY6
    return Lab(underlay_ips=UNDERLAY6, tunnel_type="vxlanipsec",
               tunnel_options=keys.options(ipsec_mode=case)), keys


def iperf3_to(lab: Lab, src: int, server_ip: str, seconds: int = 3) -> dict:
    """iperf3 TCP from VM `src` to `server_ip` on the other VM: the receiver's summary."""
    client, server = lab.hvs[src], lab.hvs[1 - src]
    srv = subprocess.Popen(["ip", "netns", "exec", server.vm_ns, "iperf3", "-s", "-1",
                            "-B", server_ip],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: ":5201" in run(["ss", "-Hltn"], ns=server.vm_ns).stdout,
                        10, 0.05), "iperf3 server did not start"
        r = run(["iperf3", "-c", server_ip, "-J", "-t", str(seconds)], ns=client.vm_ns,
                check=False, timeout=60 + seconds)
        res = json.loads(r.stdout)
        assert "error" not in res, res.get("error")
        return res["end"]["sum_received"]
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


def vm_sh(lab: Lab, i: int, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
    return run(list(cmd), ns=lab.hvs[i].vm_ns, check=check, timeout=60)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def scapy_sa(keys: Keys, mode: str, direction: int):
    """scapy's SA for hv1 -> hv2 (0) or hv2 -> hv1 (1), as keyed in the lab."""
    s = scapy()
    from scapy.layers.ipsec import ESP as ScapyEsp
    from scapy.layers.ipsec import SecurityAssociation

    src, dst, spi, key = keys.sas()[direction]
    header = s.IPv6(src=src, dst=dst) if mode == "tunnel" else None
    return SecurityAssociation(ScapyEsp, spi=spi, crypt_algo="AES-GCM",
                               crypt_key=bytes.fromhex(key), tunnel_header=header)


@pytest.mark.parametrize("case", CASES)
def test_two_hypervisors_over_an_ipv6_underlay(netlab_ok, tmp_path, case):
    s = scapy()
    lab, keys = make_lab(case)
    with lab:
        for i, hv in enumerate(lab.hvs):
            vm_sh(lab, i, "ip", "addr", "add", f"{VM6[i]}/64", "dev", hv.tap, "nodad",
                  check=True)
            # espswitch lowered the VMs' MTU to the tunnel's; a VM that does not know it
            # must learn it from espswitch's ICMP (path MTU discovery across the tunnel).
            vm_sh(lab, i, "ip", "link", "set", hv.tap, "mtu", "1500", check=True)
        assert lab.wait_for_ping(), "no ping through the IPv6 underlay"
        st = status(lab, 0)
        assert "tunnel_problem" not in st, st
        mtu = int(st["tunnel_mtu"])
        if case in CLEAR_MTU:
            assert mtu == CLEAR_MTU[case]
        else:
            assert st["ipsec_state"] == "manual" and st["ipsec_mode"] == case

        # IPv6 TCP first, while no path MTU is known: the VMs' MTU is 1500, so the first
        # full segments are too big, and only Packet Too Big makes the transfer work.
        assert vm_sh(lab, 0, "ping", "-c", "1", "-W", "5", VM6[1]).returncode == 0 or \
            wait_for(lambda: vm_sh(lab, 0, "ping", "-c", "1", "-W", "1", VM6[1]).returncode
                     == 0, 15)
        assert iperf3_to(lab, 0, VM6[1])["bytes"] > 1_000_000
        assert iperf3_to(lab, 1, VM6[0])["bytes"] > 1_000_000
        route = vm_sh(lab, 0, "ip", "-6", "route", "get", VM6[1]).stdout
        assert f"mtu {mtu}" in route, route  # learned from espswitch's Packet Too Big

        pcap = str(tmp_path / "underlay.pcap")
        with lab.capture(0, pcap):
            ping = lab.ping(count=20, interval=0.05, extra=["-p", PATTERN.hex()])
            assert received(ping) == 20, ping.stdout
            # The largest IPv4 packet the tunnel carries, with DF.
            fits = lab.ping(count=3, interval=0.1, size=mtu - 28, extra=["-M", "do"])
            assert received(fits) == 3, fits.stdout
            ping6 = vm_sh(lab, 0, "ping", "-q", "-c", "20", "-i", "0.05", VM6[1])
            assert received(ping6) == 20, ping6.stdout
        # One byte more: "fragmentation needed" for IPv4, Packet Too Big for IPv6, each
        # with the tunnel MTU.
        big = vm_sh(lab, 0, "ping", "-c", "1", "-W", "2", "-s", str(mtu - 27), "-M", "do",
                    "198.51.100.2")
        assert f"mtu = {mtu}" in big.stdout + big.stderr, big.stdout + big.stderr
        vm_sh(lab, 1, "ip", "-6", "route", "flush", "cache")
        big6 = vm_sh(lab, 1, "ping", "-c", "1", "-W", "2", "-s", str(mtu - 40 - 8 + 1), "-M",
                     "do", VM6[0])
        assert f"mtu={mtu}" in big6.stdout + big6.stderr, big6.stdout + big6.stderr
        assert iperf3_to(lab, 0, "198.51.100.2")["bytes"] > 1_000_000

        pkts = [p for p in s.rdpcap(pcap) if p.haslayer(s.IPv6)
                and {p[s.IPv6].src, p[s.IPv6].dst} == set(UNDERLAY6)]
        with open(pcap, "rb") as f:
            assert case in CLEAR_MTU or PATTERN not in f.read()
        assert len(pkts) >= 2 * 40
        # The largest outer packet fills the underlay's MTU (ESP pads to 4 bytes).
        largest = max(40 + p[s.IPv6].plen for p in pkts)
        assert 1500 - 3 <= largest <= 1500, largest
        if case == "gre":
            assert {p[s.IPv6].nh for p in pkts} == {47}
            return
        if case == "geneve":
            udp = [p for p in pkts if p.haslayer(s.UDP)]
            assert udp and all(p[s.UDP].dport == 6081 and p[s.UDP].chksum for p in udp)
            return
        assert {p[s.IPv6].nh for p in pkts} == {50}, "not only ESP between the endpoints"
        check_esp_capture(lab, keys, case, pkts)
        check_tshark(lab, keys, pcap)
        if case == "transport":
            check_hostile_input(lab, keys, tmp_path)
        # Last: its sequence number, far ahead, moves hv2's replay window past hv1's.
        check_scapy_esp_is_delivered(lab, keys, case, tmp_path)


def check_esp_capture(lab: Lab, keys: Keys, case: str, pkts: list) -> None:
    """scapy decrypts what espswitch sent, both directions: VXLAN with the lab's VNI."""
    s = scapy()
    from scapy.layers.vxlan import VXLAN

    sas = {keys.spi_1to2: scapy_sa(keys, case, 0), keys.spi_2to1: scapy_sa(keys, case, 1)}
    seen = {keys.spi_1to2: 0, keys.spi_2to1: 0}
    for p in pkts:
        esp = p[s.IPv6].payload
        spi = int.from_bytes(bytes(esp)[:4], "big")
        plain = sas[spi].decrypt(s.IPv6(bytes(p[s.IPv6])))
        if case == "tunnel":
            assert plain.haslayer(s.IPv6) and plain[s.IPv6].nh == 17
            assert {plain[s.IPv6].src, plain[s.IPv6].dst} == set(UNDERLAY6)
        assert plain.haslayer(VXLAN) and plain[VXLAN].vni == lab.vni, plain.summary()
        assert plain[s.UDP].dport == 4789
        seen[spi] += 1
    assert min(seen.values()) >= 40, seen


def check_scapy_esp_is_delivered(lab: Lab, keys: Keys, case: str, tmp_path) -> None:
    """ESP over IPv6 built by scapy (hv1's SA, far ahead in sequence) reaches VM 2."""
    s = scapy()
    from scapy.layers.vxlan import VXLAN

    hv1, hv2 = lab.hvs
    sa = scapy_sa(keys, case, 0)
    sa.seq_num = 1_000_000
    marker = b"scapy-esp-over-ipv6-" + os.urandom(4).hex().encode()
    inner = (s.Ether(src=mac_of(hv1.vm_ns, hv1.tap), dst=mac_of(hv2.vm_ns, hv2.tap))
             / s.IP(src=hv1.vm_ip, dst=hv2.vm_ip) / s.ICMP(id=0x4242, seq=1) / s.Raw(marker))
    plain = (s.IPv6(src=UNDERLAY6[0], dst=UNDERLAY6[1])
             / s.UDP(sport=50000, dport=4789) / VXLAN(vni=lab.vni) / inner)
    plain = s.IPv6(bytes(plain))  # checksums and lengths filled in
    frame = (s.Ether(src=mac_of(hv1.ns, "br-phy"), dst=mac_of(hv2.ns, "br-phy"))
             / sa.encrypt(plain))
    assert_delivered_to_vm2(lab, frame, marker, tmp_path, "scapy's ESP")


def assert_delivered_to_vm2(lab: Lab, frame, marker: bytes, tmp_path, what: str) -> None:
    """`frame`, sent from hv1's underlay device, reaches VM 2 with `marker` in an ICMP
    packet."""
    s = scapy()
    hv1, hv2 = lab.hvs
    out = str(tmp_path / "scapy-esp.pcap")
    s.wrpcap(out, [frame])
    got = str(tmp_path / "vm2.pcap")
    with tcpdump(hv2.vm_ns, hv2.tap, got, ["icmp"]):
        assert send_frames(hv1.ns, hv1.underlay_dev, out) == 1
        assert wait_for(lambda: marker in read(got), 10, 0.1), \
            f"{what} was not delivered to VM 2"


def check_tshark(lab: Lab, keys: Keys, pcap: str) -> None:
    if not tshark_available():
        return
    rows = tshark_rows(pcap, keys, ("esp.spi", "esp.icv_good", "vxlan.vni"))
    assert len(rows) >= 80
    assert {int(r["esp.spi"], 16) for r in rows} == {keys.spi_1to2, keys.spi_2to1}
    assert all(r["esp.icv_good"] in ("1", "True") for r in rows), rows[:3]
    assert all(r["vxlan.vni"] == str(lab.vni) for r in rows), rows[:3]


def check_hostile_input(lab: Lab, keys: Keys, tmp_path) -> None:
    """Forged and truncated ESP, clear VXLAN, cut IPv6 packets and outer fragments, all to
    hv2 over IPv6: counted, dropped, never delivered; the daemon lives, the tunnel works."""
    s = scapy()
    from scapy.layers.vxlan import VXLAN

    hv1, hv2 = lab.hvs
    pid = espswitchd_pid(lab, 1)
    before = statistics(lab, 1)
    eth = s.Ether(src=mac_of(hv1.ns, "br-phy"), dst=mac_of(hv2.ns, "br-phy"))
    ip6 = s.IPv6(src=UNDERLAY6[0], dst=UNDERLAY6[1], nh=50)
    any6 = s.IPv6(src=UNDERLAY6[0], dst=UNDERLAY6[1])  # next header from what follows
    spi = keys.spi_1to2.to_bytes(4, "big")
    marker = b"hostile-" + os.urandom(4).hex().encode()
    inner = (s.Ether(src=mac_of(hv1.vm_ns, hv1.tap), dst=mac_of(hv2.vm_ns, hv2.tap))
             / s.IP(src=hv1.vm_ip, dst=hv2.vm_ip) / s.ICMP() / s.Raw(marker * 4))
    frames = []
    for i in range(20):  # forged: the right SPI, a fresh sequence number, a random rest
        body = spi + (5_000_000 + i).to_bytes(4, "big") + os.urandom(8 + 64 + 16 + 4 * i)
        frames.append(eth / ip6.copy() / s.Raw(body))
    for n in (0, 3, 7, 8, 12, 30):  # truncated ESP
        frames.append(eth / ip6.copy() / s.Raw((spi + os.urandom(30))[:n]))
    for p in list(frames[:6]):
        frames.append(p)
    # Clear VXLAN from the peer: plaintext on a protected tunnel.
    frames.append(eth / any6.copy() / s.UDP(sport=4242, dport=4789) / VXLAN(vni=lab.vni)
                  / inner)
    # IPv6 whose payload length runs past the frame's end.
    cut = bytes(eth / ip6.copy() / s.Raw(spi + os.urandom(60)))
    frames.append(s.Ether(cut[:-20]))
    # Outer fragments of ESP: one too small to be a real path's, and a forged packet in
    # two fragments (reassembled, then refused by its ICV).
    frames.append(eth / any6.copy() / s.IPv6ExtHdrFragment(nh=50, id=7, m=1)
                  / s.Raw(spi + bytes(100)))
    forged = spi + (6_000_000).to_bytes(4, "big") + os.urandom(900)
    frames.append(eth / any6.copy() / s.IPv6ExtHdrFragment(nh=50, id=8, m=1)
                  / s.Raw(forged[:512]))
    frames.append(eth / any6.copy() / s.IPv6ExtHdrFragment(nh=50, id=8, offset=64)
                  / s.Raw(forged[512:]))
    hostile = str(tmp_path / "hostile.pcap")
    s.wrpcap(hostile, frames)
    got = str(tmp_path / "vm2-hostile.pcap")
    with tcpdump(hv2.vm_ns, hv2.tap, got, ["icmp"]):
        assert send_frames(hv1.ns, hv1.underlay_dev, hostile) == len(frames)
        auth = wait_for_counter(lab, 1, "esp_auth_failures",
                                before.get("esp_auth_failures", 0) + 21)
        assert auth >= before.get("esp_auth_failures", 0) + 21
        plain = wait_for_counter(lab, 1, "esp_plaintext_drops",
                                 before.get("esp_plaintext_drops", 0) + 1)
        assert plain >= before.get("esp_plaintext_drops", 0) + 1
        # The tunnel still carries pings (with the pattern-free payload).
        assert received(lab.ping(count=5, interval=0.1)) == 5
    with open(got, "rb") as f:
        assert marker not in f.read(), "a hostile packet reached the VM"
    drops = lab.appctl(hv2, "dpif/show").stdout
    counts = dict(re.findall(r"(\w+)=(\d+)", drops.split("drops:", 1)[1].splitlines()[0]))
    assert int(counts.get("esp_malformed", 0)) >= 1, drops
    assert int(counts.get("ipv6_malformed", 0)) >= 1, drops
    assert int(counts.get("ipfrag_too_small", 0)) >= 1, drops
    assert espswitchd_pid(lab, 1) == pid and hv2.alive()

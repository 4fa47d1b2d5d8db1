"""Two hypervisors, VXLAN between them: the traffic and the state an operator sees."""

from __future__ import annotations

import os
import re
import time

import pytest

from .lab import iperf3, wait_until

pytestmark = pytest.mark.net


def test_ping_100_of_100(tunnel):
    vma, vmb = tunnel["vma"], tunnel["vmb"]
    assert wait_until(lambda: vma.can_reach(vmb.ip), 5) is not None
    r = vma.ping(vmb.ip, count=100, interval=0.01)
    assert "100 received" in r.stdout, r.stdout


def test_ovs_vsctl_waits_and_db_state(tunnel):
    a, vma, vmb = tunnel["a"], tunnel["vma"], tunnel["vmb"]
    # Without --no-wait: returns only once espswitchd has applied the change.
    t0 = time.monotonic()
    a.vsctl("set", "Interface", "vx0", "options:ttl=32")
    assert time.monotonic() - t0 < 10
    assert a.vsctl("get", "Open_vSwitch", ".", "cur_cfg").stdout == a.vsctl(
        "get", "Open_vSwitch", ".", "next_cfg").stdout
    assert int(a.iface("vx0", "ofport")) > 0
    assert a.iface("vx0", "error") == "[]"
    assert a.iface("vx0", "status:tunnel_egress_iface").strip('"') == "br-phy"
    assert int(a.iface("br-int", "ofport")) == 65534
    assert re.fullmatch(r'"?([0-9a-f]{2}:){5}[0-9a-f]{2}"?', a.iface("br-phy", "mac_in_use"))
    assert a.iface("ul0", "link_state") == "up"

    def stat(name, key):
        out = a.iface(name, "statistics")
        m = re.search(rf"\b{key}=(\d+)", out)
        return int(m.group(1)) if m else 0

    before = stat("vx0", "tx_packets"), stat("ul0", "rx_packets")
    assert "50 received" in vma.ping(vmb.ip, count=50).stdout
    # Statistics are written every 5 s.
    assert wait_until(lambda: stat("vx0", "tx_packets") >= before[0] + 50, 12, 0.5) is not None
    assert stat("ul0", "rx_packets") >= before[1] + 50


def test_iperf3_tcp_5s(tunnel):
    vma, vmb, lab = tunnel["vma"], tunnel["vmb"], tunnel["a"].lab
    got = iperf3(lab, vma, vmb.ns, vmb.ip, 5)
    assert got["seconds"] >= 4.5
    assert got["bits_per_second"] > 1e6
    print(f"iperf3 TCP over espswitch vxlan: {got['bits_per_second'] / 1e6:.0f} Mbit/s")


def test_underlay_carries_only_vxlan(tunnel, tmp_path):
    scapy = pytest.importorskip("scapy.all")
    a, vma, vmb, vni = tunnel["a"], tunnel["vma"], tunnel["vmb"], tunnel["vni"]
    pcap = str(tmp_path / "ul0.pcap")
    dump = a.lab.spawn(a.ns, "tcpdump", "-i", "ul0", "-U", "-n", "-w", pcap)
    assert wait_until(lambda: os.path.exists(pcap), 5) is not None
    time.sleep(0.5)
    assert "20 received" in vma.ping(vmb.ip, count=20).stdout
    vma.sh("ping", "-c", "2", "-b", "-W", "1", "192.168.10.255", check=False)
    time.sleep(0.3)
    dump.terminate()
    dump.wait(timeout=10)
    pkts = scapy.rdpcap(pcap)
    assert len(pkts) >= 40
    vm_ips = {vma.ip, vmb.ip}
    vxlan = 0
    for p in pkts:
        if p.haslayer(scapy.ARP):
            assert {p[scapy.ARP].psrc, p[scapy.ARP].pdst} <= {"10.0.0.1", "10.0.0.2"}
            continue
        assert p.haslayer(scapy.IP), p.summary()
        ip = p[scapy.IP]
        assert ip.src not in vm_ips and ip.dst not in vm_ips, p.summary()
        if ip.proto == 17 and ip[scapy.UDP].dport == 4789:
            payload = bytes(ip[scapy.UDP].payload)
            assert payload[0] & 0x08 and int.from_bytes(payload[4:7], "big") == vni
            vxlan += 1
        else:
            # Only the hypervisors' own traffic may be something else.
            assert {ip.src, ip.dst} <= {"10.0.0.1", "10.0.0.2"}, p.summary()
    assert vxlan >= 40


def test_appctl_shows_learned_state_and_flush_relearns(tunnel):
    a, vma, vmb = tunnel["a"], tunnel["vma"], tunnel["vmb"]
    assert "5 received" in vma.ping(vmb.ip, count=5).stdout
    fdb = a.appctl("fdb/show", "br-int").stdout
    assert vma.mac in fdb and vmb.mac in fdb
    vx_ofport = a.iface("vx0", "ofport")
    assert re.search(rf"^\s+{vx_ofport}\s+0\s+{vmb.mac}", fdb, re.M), fdb
    dpif = a.appctl("dpif/show").stdout
    assert re.search(r"vx0 \d+: \(vxlan: remote_ip=10\.0\.0\.2, key=5000\)", dpif), dpif
    assert "ul0" in dpif and "br-phy 65534: (internal)" in dpif
    routes, neighbours = a.appctl("ovs/route/show").stdout, a.appctl("tnl/arp/show").stdout
    assert re.search(r"10\.0\.0\.0/24 dev br-phy SRC 10\.0\.0\.1", routes), routes
    assert re.search(r"10\.0\.0\.2\s+[0-9a-f:]{17}\s+br-phy", neighbours), neighbours
    a.appctl("tnl/arp/flush")
    assert "10.0.0.2" not in a.appctl("tnl/arp/show").stdout
    assert "3 received" in vma.ping(vmb.ip, count=3).stdout
    assert "10.0.0.2" in a.appctl("tnl/neigh/show").stdout
    assert a.appctl("version").stdout.strip().startswith("espswitchd")
    assert "espswitchd" in a.appctl("vlog/list").stdout


def test_appctl_set_commands_and_errors(tunnel):
    a = tunnel["a"]
    a.appctl("tnl/neigh/set", "br-phy", "10.0.0.77", "aa:bb:cc:dd:ee:ff")
    neighbours = a.appctl("tnl/arp/show").stdout
    assert re.search(r"10\.0\.0\.77\s+aa:bb:cc:dd:ee:ff\s+br-phy", neighbours), neighbours
    a.appctl("ovs/route/add", "10.77.0.0/16", "br-phy", "10.0.0.77")
    routes = a.appctl("ovs/route/show").stdout
    assert "User: 10.77.0.0/16 dev br-phy GW 10.0.0.77 SRC 10.0.0.1" in routes, routes
    a.appctl("ovs/route/del", "10.77.0.0/16")
    assert "10.77.0.0" not in a.appctl("ovs/route/show").stdout
    for bad in (["tnl/neigh/set", "br-nope", "10.0.0.1", "aa:bb:cc:dd:ee:ff"],
                ["tnl/neigh/set", "br-phy", "10.0.0.300", "aa:bb:cc:dd:ee:ff"],
                ["ovs/route/add", "10.0.0.0/40", "br-phy"],
                ["ovs/route/del", "10.99.0.0/16"],
                ["fdb/show", "br-nope"],
                ["fdb/show"],
                ["exit", "--bogus"]):
        r = a.appctl(*bad, check=False)
        assert r.returncode != 0, bad
        assert "Traceback" not in r.stderr and r.stderr.strip(), bad
    assert a.alive()


@pytest.mark.parametrize(
    ("name", "settings", "words"),
    [
        ("bad1", ["type=geneve-x"], "unknown interface type 'geneve-x'"),
        ("bad2", ["type=vxlan", "options:key=7"], "needs options:remote_ip"),
        ("bad3", ["type=vxlan", "options:remote_ip=10.0.0.9", "options:key=99999999"],
         "out of range"),
        ("bad4", ["type=system"], "system device 'bad4' does not exist"),
    ],
)
def test_bad_config_sets_error_and_others_keep_working(tunnel, name, settings, words):
    a, vma, vmb = tunnel["a"], tunnel["vma"], tunnel["vmb"]
    a.vsctl("add-port", "br-int", name, "--", "set", "Interface", name, *settings)
    try:
        assert words in a.iface(name, "error")
        assert a.iface(name, "ofport") == "-1"
        assert name not in a.appctl("dpif/show").stdout
        assert "20 received" in vma.ping(vmb.ip, count=20).stdout
        assert a.alive()
    finally:
        a.vsctl("del-port", "br-int", name)

"""`vxlanipsec` end to end: two hypervisors, a VM on each, VXLAN protected by ESP between them.

What issue 4 asks to show, on the lab of `espswitch.cli.lab` (the demo's topology): traffic
for each transform, what an eavesdropper on the underlay sees (and that tshark or
`espswitch esp decrypt` recover it with the keys), and the security rules at work: wrong key,
replay, plaintext VXLAN, path MTU, hard lifetime and re-keying.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from espswitch.cli.lab import Lab, run, tcpdump
from espswitch.ipsec import parse_transform

from .ipsec_helpers import (
    PATTERN,
    Keys,
    espswitchd_pid,
    iperf3,
    ipsec_show,
    keyed_lab,
    mac_of,
    pin_neighbours,
    received,
    rekey,
    sa_rows,
    scapy,
    send_frames,
    statistics,
    status,
    tcp_transfer,
    tshark_available,
    tshark_rows,
    underlay_ipv4,
    wait_for,
    wait_for_counter,
)

pytestmark = pytest.mark.net

TRANSFORMS = ("aes128gcm16", "aes256gcm16-esn", "chacha20poly1305", "aes128-sha256")
TSHARK_TRANSFORMS = ("aes128gcm16", "aes128-sha256")  # tshark 4.0: no ESN, no ChaCha20
ESPSWITCH_DECRYPT_TRANSFORMS = ("chacha20poly1305", "aes256gcm16-esn")
N_PINGS = 100


# -- one lab per transform, shared by the traffic and capture tests ---------------------------


@dataclass
class Keyed:
    """A running lab keyed for one transform, and an underlay capture of 100 pings."""

    lab: Lab
    keys: Keys
    ping: subprocess.CompletedProcess[str]
    pcap: str
    tmp: str


@dataclass
class LabPool:
    """Builds each transform's lab on first use; the module's finalizer takes all down."""

    tmp_factory: pytest.TempPathFactory
    labs: dict[str, Keyed] = field(default_factory=dict)
    _open: list[Lab] = field(default_factory=list)

    def get(self, esp: str) -> Keyed:
        if esp not in self.labs:
            keys = Keys.fresh(esp)
            lab = keyed_lab(keys)
            self._open.append(lab)
            lab.__enter__()
            assert lab.wait_for_ping(), f"{esp}: the VMs never reached each other"
            tmp = str(self.tmp_factory.mktemp(esp))
            pcap = os.path.join(tmp, "underlay.pcap")
            hv = lab.hvs[0]
            with tcpdump(hv.ns, hv.underlay_dev, pcap):
                ping = lab.ping(N_PINGS, 0.01, extra=["-p", PATTERN.hex()])
            self.labs[esp] = Keyed(lab, keys, ping, pcap, tmp)
        return self.labs[esp]

    def close(self) -> None:
        for lab in self._open:
            lab.__exit__(None, None, None)


@pytest.fixture(scope="module")
def pool(netlab_ok, tmp_path_factory):
    p = LabPool(tmp_path_factory)
    yield p
    p.close()




def icmp_echo_requests(pcap: str, src: str) -> int:
    s = scapy()
    return sum(1 for p in s.rdpcap(pcap) if p.haslayer(s.ICMP) and p[s.IP].src == src
               and p[s.ICMP].type == 8)


# -- traffic for every transform ----------------------------------------------------------------


@pytest.mark.parametrize("esp", TRANSFORMS)
def test_100_of_100_pings_between_vms(pool, esp):
    k = pool.get(esp)
    assert received(k.ping) == N_PINGS, k.ping.stdout
    st = status(k.lab, 0)
    assert st["ipsec_state"] == "manual", st
    assert st["esp"] == esp.removesuffix("-esn") or st["esp"] == esp, st


@pytest.mark.parametrize("esp", TRANSFORMS)
def test_iperf3_tcp_5s_without_errors(pool, esp):
    k = pool.get(esp)
    res = iperf3(k.lab, 0, ("-t", "5"))
    assert "error" not in res, res.get("error")
    end = res["end"]
    assert end["sum_received"]["bytes"] > 0, end
    assert end["sum_received"]["seconds"] >= 4.5, end
    print(f"{esp}: {end['sum_received']['bits_per_second'] / 1e6:.0f} Mbit/s")


@pytest.mark.parametrize("esp", TRANSFORMS)
def test_underlay_carries_only_esp_no_payload_bytes_no_plain_vxlan(pool, esp):
    s = scapy()
    k = pool.get(esp)
    with open(k.pcap, "rb") as f:
        raw = f.read()
    assert PATTERN not in raw, "the ping payload is visible on the underlay"
    pkts = underlay_ipv4(k.pcap)
    esp_pkts = [p for p in pkts if p[s.IP].proto == 50]
    assert len(esp_pkts) >= 2 * N_PINGS, f"only {len(esp_pkts)} ESP packets"
    udp_4789 = [p.summary() for p in pkts if p.haslayer(s.UDP)
                and 4789 in (p[s.UDP].sport, p[s.UDP].dport)]
    assert udp_4789 == []
    other = [p.summary() for p in pkts if p[s.IP].proto != 50]
    assert other == [], "non-ESP IPv4 between the tunnel endpoints"


@pytest.mark.skipif(not tshark_available(), reason="needs tshark")
@pytest.mark.parametrize("esp", TSHARK_TRANSFORMS)
def test_tshark_decrypts_capture_every_icv_good_with_vni_and_icmp(pool, esp):
    k = pool.get(esp)
    rows = tshark_rows(k.pcap, k.keys, ("esp.spi", "esp.icv_good", "vxlan.vni", "icmp.type"))
    assert len(rows) >= 2 * N_PINGS
    spis = {int(r["esp.spi"], 16) for r in rows}
    assert spis == {k.keys.spi_1to2, k.keys.spi_2to1}, spis
    bad = [r for r in rows if r["esp.icv_good"] not in ("1", "True")]
    assert bad == [], f"{len(bad)} packets without a good ICV: {bad[:3]}"
    no_vni = [r for r in rows if r["vxlan.vni"] != str(k.lab.vni)]
    assert no_vni == [], no_vni[:3]
    types = [r["icmp.type"] for r in rows]
    assert types.count("8") == N_PINGS, types
    assert types.count("0") == N_PINGS, types


@pytest.mark.parametrize("esp", ESPSWITCH_DECRYPT_TRANSFORMS)
def test_espswitch_esp_decrypt_recovers_capture(pool, esp):
    s = scapy()
    k = pool.get(esp)
    src = k.pcap
    for i, (_, _, spi, key) in enumerate(k.keys.sas()):
        out = os.path.join(k.tmp, f"decrypted{i}.pcap")
        r = subprocess.run(["espswitch", "esp", "decrypt", "--esp", esp, "--spi", hex(spi),
                            "--key", key, src, out], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        src = out
    pkts = underlay_ipv4(src)
    assert [p.summary() for p in pkts if p[s.IP].proto == 50] == [], "ESP left undecrypted"
    vxlan = [p for p in pkts if p.haslayer(s.UDP) and p[s.UDP].dport == 4789]
    assert len(vxlan) >= 2 * N_PINGS
    assert all(p[s.VXLAN].vni == k.lab.vni for p in vxlan)
    vm1, vm2 = (hv.vm_ip for hv in k.lab.hvs)
    requests = [p for p in vxlan if p.haslayer(s.ICMP) and p[s.ICMP].type == 8]
    replies = [p for p in vxlan if p.haslayer(s.ICMP) and p[s.ICMP].type == 0]
    assert len(requests) == len(replies) == N_PINGS
    for p in requests:
        inner = p[s.VXLAN].payload
        assert (inner[s.IP].src, inner[s.IP].dst) == (vm1, vm2), p.summary()
        assert PATTERN in bytes(inner[s.ICMP].payload), "payload not recovered"


def test_udp_encapsulation_sends_only_udp_4500(netlab_ok, tmp_path):
    s = scapy()
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys, ipsec_encapsulation="yes") as lab:
        assert lab.wait_for_ping()
        hv = lab.hvs[0]
        pcap = str(tmp_path / "underlay.pcap")
        with tcpdump(hv.ns, hv.underlay_dev, pcap):
            ping = lab.ping(20, 0.01, extra=["-p", PATTERN.hex()])
        assert received(ping) == 20, ping.stdout
        assert status(lab, 0)["ipsec_encapsulation"] == "yes"
    with open(pcap, "rb") as f:
        assert PATTERN not in f.read()
    pkts = underlay_ipv4(pcap)
    nat_t = [p for p in pkts if p.haslayer(s.UDP) and p[s.UDP].sport == 4500
             and p[s.UDP].dport == 4500]
    assert len(nat_t) >= 40
    assert [p.summary() for p in pkts if p not in nat_t] == [], "not only UDP/4500"
    assert not any(p[s.IP].proto == 50 for p in pkts)


# -- security rules ----------------------------------------------------------------------------


def test_wrong_key_on_one_side_drops_everything_and_counts_auth_failures(netlab_ok):
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys) as lab:
        assert lab.wait_for_ping()
        pin_neighbours(lab)
        # hv2 now expects another key for what hv1 sends.
        wrong = Keys(keys.esp, keys.spi_1to2, keys.spi_2to1,
                     keys.key_1to2[:-2] + f"{int(keys.key_1to2[-2:], 16) ^ 1:02x}",
                     keys.key_2to1)
        hv2_opts = wrong.options()[1]
        lab.tunnel_options = (lab.tunnel_options[0], hv2_opts)
        lab.vsctl(lab.hvs[1], "set", "interface", "tun0", *lab.tunnel_args(lab.hvs[1],
                                                                            lab.hvs[0]))
        before = statistics(lab, 1).get("esp_auth_failures", 0)
        ping = lab.ping(20, 0.05)
        assert received(ping) == 0, ping.stdout
        got = wait_for_counter(lab, 1, "esp_auth_failures", before + 20)
        assert got >= before + 20, f"esp_auth_failures {before} -> {got}"
        assert sa_rows(lab, 1)["in"]["auth_failed"] >= 20
        show = ipsec_show(lab, 1, "tun0")
        m = re.search(r"auth_failed (\d+)", show)
        assert m and int(m.group(1)) >= 20, show
        assert keys.key_1to2 not in show and wrong.key_1to2 not in show
        # The right key again: the same tunnel carries traffic.
        lab.tunnel_options = keys.options()
        lab.vsctl(lab.hvs[1], "set", "interface", "tun0", *lab.tunnel_args(lab.hvs[1],
                                                                            lab.hvs[0]))
        assert received(lab.ping(5, 0.05)) == 5


def test_replayed_esp_is_dropped_and_counted_vm_sees_nothing(netlab_ok, tmp_path):
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys) as lab:
        hv1, hv2 = lab.hvs
        assert lab.wait_for_ping()
        esp_pcap = str(tmp_path / "esp.pcap")
        vm_pcap = str(tmp_path / "vm2-original.pcap")
        with (tcpdump(hv2.vm_ns, hv2.tap, vm_pcap, ["icmp"]),
              tcpdump(hv2.ns, hv2.underlay_dev, esp_pcap,
                      ["ip proto 50 and src host 192.0.2.1"])):
            assert received(lab.ping(10, 0.05)) == 10
        assert icmp_echo_requests(vm_pcap, hv1.vm_ip) == 10  # the VM capture does count
        before = statistics(lab, 1).get("esp_replay_drops", 0)
        replay_vm_pcap = str(tmp_path / "vm2-replay.pcap")
        with tcpdump(hv2.vm_ns, hv2.tap, replay_vm_pcap, ["icmp"]):
            sent = send_frames(hv1.ns, hv1.underlay_dev, esp_pcap)
        assert sent >= 10
        got = wait_for_counter(lab, 1, "esp_replay_drops", before + sent)
        assert got >= before + sent, f"esp_replay_drops {before} -> {got} after {sent} replays"
        assert icmp_echo_requests(replay_vm_pcap, hv1.vm_ip) == 0
        assert sa_rows(lab, 1)["in"]["replayed"] >= sent
        assert received(lab.ping(5, 0.05)) == 5  # the genuine flow goes on


def test_plaintext_vxlan_from_remote_endpoint_is_dropped_and_counted(netlab_ok, tmp_path):
    s = scapy()
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys) as lab:
        hv1, hv2 = lab.hvs
        assert lab.wait_for_ping()
        frame = (s.Ether(src=mac_of(hv1.ns, "br-phy"), dst=mac_of(hv2.ns, "br-phy"))
                 / s.IP(src=hv1.underlay_ip, dst=hv2.underlay_ip)
                 / s.UDP(sport=49200, dport=4789)
                 / s.VXLAN(vni=lab.vni, flags=0x08)
                 / s.Ether(src=mac_of(hv1.vm_ns, hv1.tap), dst=mac_of(hv2.vm_ns, hv2.tap))
                 / s.IP(src=hv1.vm_ip, dst=hv2.vm_ip) / s.ICMP(type=8, id=0x4242)
                 / s.Raw(PATTERN * 3))
        crafted = str(tmp_path / "crafted.pcap")
        s.wrpcap(crafted, [frame] * 20)

        def inject(counter: str) -> tuple[str, int]:
            """Send the 20 frames while capturing on the VM's device; the capture ends once
            hv2's tunnel counted them under `counter` (or after the deadline), so that a
            slow hypervisor on a busy machine does not end it early."""
            vm_pcap = str(tmp_path / f"vm2-{lab.tunnel_type}.pcap")
            before = statistics(lab, 1).get(counter, 0)
            with tcpdump(hv2.vm_ns, hv2.tap, vm_pcap, ["icmp"]):
                assert send_frames(hv1.ns, hv1.underlay_dev, crafted) == 20
                got = wait_for_counter(lab, 1, counter, before + 20)
            return vm_pcap, got - before

        vm_pcap, dropped = inject("esp_plaintext_drops")
        assert dropped >= 20, f"esp_plaintext_drops went up by {dropped}"
        assert icmp_echo_requests(vm_pcap, hv1.vm_ip) == 0
        # Control: the same frames are delivered by a plain `vxlan` tunnel.
        lab.tunnel_type = "vxlan"
        lab.tunnel_options = ({}, {})
        lab.vsctl(hv2, "clear", "interface", "tun0", "options", "--", "set", "interface",
                  "tun0", *lab.tunnel_args(hv2, hv1))
        vm_pcap, carried = inject("rx_packets")
        assert carried >= 20
        assert icmp_echo_requests(vm_pcap, hv1.vm_ip) == 20


# -- MTU -------------------------------------------------------------------------------------------


def expected_inner_mtu(esp: str, underlay_mtu: int = 1500) -> int:
    """The largest inner IPv4 packet a transport-mode tunnel carries in `underlay_mtu`,
    computed here from RFC 4303 / RFC 7348 rather than taken from espswitch."""
    t = parse_transform(esp)
    best = 0
    for ip_len in range(576, underlay_mtu):
        plain = 8 + 8 + 14 + ip_len  # UDP, VXLAN, inner Ethernet, inner IP packet
        padded = -(-(plain + 2) // t.block_size) * t.block_size  # + pad length, next header
        if 20 + 8 + t.iv_len + padded + t.icv_len <= underlay_mtu:
            best = ip_len
    return best


def set_vm_mtu(lab: Lab, idx: int, mtu: int) -> None:
    hv = lab.hvs[idx]
    run(["ip", "link", "set", hv.tap, "mtu", str(mtu)], ns=hv.vm_ns)


def vm_mtu(lab: Lab, idx: int) -> int:
    hv = lab.hvs[idx]
    out = run(["cat", f"/sys/class/net/{hv.tap}/mtu"], ns=hv.vm_ns).stdout
    return int(out)


def test_path_mtu_frag_needed_and_10mb_tcp_at_mtu_1500(netlab_ok):
    esp = "aes128gcm16"
    with keyed_lab(Keys.fresh(esp)) as lab:
        assert lab.wait_for_ping()
        mtu = int(status(lab, 0)["tunnel_mtu"])
        assert mtu == expected_inner_mtu(esp)
        assert vm_mtu(lab, 0) == mtu  # espswitchd lowered the VM's MTU
        for i in (0, 1):
            set_vm_mtu(lab, i, 1500)
        # The largest packet that fits goes through with DF ...
        fits = lab.ping(3, 0.1, size=mtu - 28, extra=["-M", "do"])
        assert received(fits) == 3, fits.stdout
        # ... one byte more gets "fragmentation needed" with the tunnel's MTU.
        vm1, vm2 = lab.hvs
        big = run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s",
                   str(mtu - 28 + 1), vm2.vm_ip], ns=vm1.vm_ns, check=False)
        text = big.stdout + big.stderr
        m = re.search(r"Frag needed and DF set \(mtu = (\d+)\)", text)
        assert m, text
        assert int(m.group(1)) == mtu, text
        assert received(big) == 0, text
        # The VM's kernel took the MTU from that ICMP into its route cache.
        route = run(["ip", "route", "get", vm2.vm_ip], ns=vm1.vm_ns).stdout
        assert re.search(rf"\bmtu {mtu}\b", route), route
        # TCP with both VMs at 1500 finds the path MTU by itself.
        for hv in lab.hvs:
            run(["ip", "route", "flush", "cache"], ns=hv.vm_ns)
        sent, got = tcp_transfer(lab, 10 * 1024 * 1024)
        assert sent.startswith(f"{10 * 1024 * 1024} ")
        assert got == sent, "the receiver did not get the 10 MB intact"
        too_big = wait_for_counter(lab, 0, "tx_too_big", 1)
        assert too_big >= 1, "no full-size TCP segment ever hit the tunnel MTU"
        assert vm_mtu(lab, 0) == vm_mtu(lab, 1) == 1500


# -- lifetime and re-keying ----------------------------------------------------------------------


def test_lifetime_packets_expires_tunnel_and_rekey_revives_it_in_place(netlab_ok):
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys, lifetime_packets="100") as lab:
        assert lab.wait_for_ping()
        pin_neighbours(lab)
        pids = [espswitchd_pid(lab, i) for i in (0, 1)]
        first = lab.ping(150, 0.01)
        n = received(first)
        assert 0 < n < 100, first.stdout
        out = sa_rows(lab, 0)["out"]
        assert out["packets"] == 100, out
        assert out["state"] == "expired", out
        # A status change is written back within about a second, not with the 5 s statistics.
        assert wait_for(lambda: status(lab, 0)["ipsec_state"] == "expired", 2.5), \
            status(lab, 0)
        before = statistics(lab, 0).get("esp_expired_drops", 0)
        dead = lab.ping(10, 0.05)
        assert received(dead) == 0, dead.stdout
        got = wait_for_counter(lab, 0, "esp_expired_drops", before + 10)
        assert got >= before + 10, f"esp_expired_drops {before} -> {got}"
        assert "expired" in ipsec_show(lab, 0, "tun0")

        fresh = Keys.fresh("aes128gcm16", spi_1to2=0x3001, spi_2to1=0x4001)
        rekey(lab, fresh, lifetime_packets="100")
        for i in (0, 1):
            st = status(lab, i)
            assert st["ipsec_state"] == "manual", st
        assert status(lab, 0)["spi_out"] == "0x00003001"
        assert wait_for(lambda: received(lab.ping(1, 0.1)) == 1, 10)
        assert received(lab.ping(20, 0.01)) == 20
        assert [espswitchd_pid(lab, i) for i in (0, 1)] == pids  # no restart
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_manually_keyed_tunnel_resumes_at_once_after_the_daemon_is_killed(netlab_ok):
    """The restarted SA starts past every sequence number it used before, so the peer's
    replay window (far ahead) does not drop its packets as replays."""
    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys) as lab:
        hv1, _ = lab.hvs
        assert lab.wait_for_ping()
        assert received(lab.ping(200, 0.005)) == 200
        time.sleep(1.0)  # espswitchd notes where the VM's TAP device went every 0.5 s
        os.kill(espswitchd_pid(lab, 0), signal.SIGKILL)
        time.sleep(0.5)
        hv1.start()
        assert wait_for(lambda: received(lab.ping(1, 0.1)) == 1, 5), "no traffic after restart"
        assert received(lab.ping(20, 0.01)) == 20
        assert sa_rows(lab, 1)["in"]["replayed"] == 0
        assert sa_rows(lab, 0)["out"]["seq"] > 200
        path = os.path.join(hv1.dir, "espswitchd.seq")
        with open(path) as f:
            marks = f.read()
        assert "192.0.2.2" in marks and str(keys.spi_1to2) in marks
        assert keys.key_1to2 not in marks and keys.key_2to1 not in marks
        assert os.stat(path).st_mode & 0o077 == 0

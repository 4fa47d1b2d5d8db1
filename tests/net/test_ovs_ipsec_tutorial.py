"""Open vSwitch's IPsec tutorial (Documentation/tutorials/ipsec.rst), typed as it prints
it, between two espswitch hypervisors, for `gre`, `geneve` and `vxlan` (issue 12).

The tutorial's three ways, one after the other on the same tunnel, as an operator moving
from one to the next would type them:

1. pre-shared key: `add-port br-ipsec tun -- set interface tun type=gre
   options:remote_ip=1.1.1.2 options:psk=swordfish`;
2. self-signed certificates (`ovs-pki req -u host_1`, `ovs-pki self-sign host_1`):
   `set Open_vSwitch . other_config:certificate=... other_config:private_key=...`,
   `set Interface tun options:remote_cert=.../host_2-cert.pem`,
   `remove Interface tun options psk`;
3. CA-signed certificates (`ovs-pki init`, `ovs-pki req -u host_1`, `ovs-pki sign host_1
   switch`): `set Open_vSwitch . other_config:certificate=... other_config:private_key=...
   other_config:ca_cert=.../cacert.pem`, `set Interface tun options:remote_name=host_2`,
   `remove Interface tun options remote_cert`.

Each time: both sides `established`, VM-to-VM pings, the CHILD_SAs Open vSwitch's
ovs-monitor-ipsec would make (`ike/show`), and what crosses the underlay is ESP only.
The bridge is the lab's `br-int` (the tutorial's `br-ipsec`), the VMs are namespaces
behind it rather than its internal port's address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from espswitch.cli.lab import Lab

from .ipsec_helpers import (
    BackgroundPing,
    iperf3,
    received,
    scapy,
    statistics,
    status,
    underlay_ipv4,
    wait_for,
)

pytestmark = pytest.mark.net

TUN = "tun"
UDP_PORT = {"vxlan": 4789, "geneve": 6081}


def ovs_pki(cwd: str, *args: str) -> None:
    subprocess.run(["ovs-pki", *args], cwd=cwd, check=True, capture_output=True, text=True,
                   timeout=120)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The tutorial's files, made by ovs-pki as the tutorial makes them: per host a
    self-signed pair, and a CA-signed pair with the CA certificate."""
    if shutil.which("ovs-pki") is None:
        pytest.skip("needs ovs-pki")
    d = str(tmp_path_factory.mktemp("keys"))
    self_signed, signed = os.path.join(d, "self"), os.path.join(d, "signed")
    os.makedirs(self_signed)
    os.makedirs(signed)
    pki = os.path.join(d, "pki")
    ovs_pki(signed, "-d", pki, "init", "--force")
    for host in ("host_1", "host_2"):
        ovs_pki(self_signed, "-d", pki, "req", "-u", host)
        ovs_pki(self_signed, "-d", pki, "self-sign", host)
        ovs_pki(signed, "-d", pki, "req", "-u", host)
        ovs_pki(signed, "-d", pki, "-b", "sign", host, "switch")
    shutil.copy(os.path.join(pki, "switchca", "cacert.pem"), signed)
    return self_signed, signed


def child_selectors(lab: Lab, hv: int) -> dict[str, tuple[str, str]]:
    """ike/show --json of tun: the installed CHILD_SAs of its established IKE SA by name,
    with their negotiated (local, remote) selectors."""
    out = json.loads(lab.appctl(lab.hvs[hv], "ike/show", "--json", TUN).stdout)
    return {c["name"]: (c["local_ts"], c["remote_ts"])
            for peer in out["peers"] for sa in peer["ike_sas"] if sa["state"] == "established"
            for c in sa["children"] if c["state"] == "installed"}


def expected_selectors(lab: Lab, kind: str, hv: int) -> dict[str, tuple[str, str]]:
    """What ovs-monitor-ipsec gives strongSwan for this tunnel, seen from hypervisor hv."""
    me, peer = lab.hvs[hv].underlay_ip, lab.hvs[1 - hv].underlay_ip
    if kind == "gre":
        return {"gre": (f"{me}/32[47]", f"{peer}/32[47]")}
    port = UDP_PORT[kind]
    return {"out": (f"{me}/32[17]", f"{peer}/32[17/{port}]"),
            "in": (f"{me}/32[17/{port}]", f"{peer}/32[17]")}


def ike_sas(lab: Lab, hv: int) -> list[dict]:
    out = json.loads(lab.appctl(lab.hvs[hv], "ike/show", "--json", TUN).stdout)
    return [sa for peer in out["peers"] for sa in peer["ike_sas"]]


def both_established(lab: Lab, timeout: float = 30.0) -> None:
    """Both sides established, and the IKE SA of crossing initiations that RFC 7296's rule
    retires gone (until then a packet may still go on its CHILD_SAs as they are deleted)."""
    def ok():
        return all(status(lab, i, TUN).get("ipsec_state") == "established"
                   and len(ike_sas(lab, i)) == 1 for i in (0, 1))
    assert wait_for(ok, timeout), (status(lab, 0, TUN), status(lab, 1, TUN),
                                   lab.appctl(lab.hvs[0], "ike/show").stdout)


def pings(lab: Lab) -> None:
    assert lab.wait_for_ping(20.0), lab.appctl(lab.hvs[0], "ike/show").stdout
    assert received(lab.ping(20, 0.05)) == 20


@pytest.mark.parametrize("kind", ["gre", "geneve", "vxlan"])
def test_ovs_ipsec_tutorial(netlab_ok, keys, kind, tmp_path):
    self_signed, signed = keys
    with Lab(tunnel_type=kind) as lab:
        hosts = ("host_1", "host_2")
        # The lab's own tunnel goes: the tutorial's is added as the tutorial adds it.
        for i, hv in enumerate(lab.hvs):
            peer = lab.hvs[1 - i]
            lab.vsctl(hv, "del-port", "br-int", "tun0")
            lab.vsctl(hv, "add-port", "br-int", TUN, "--", "set", "interface", TUN,
                      f"type={kind}", f"options:remote_ip={peer.underlay_ip}",
                      "options:psk=swordfish")
            assert lab.vsctl(hv, "get", "interface", TUN, "error",
                             check=False).stdout.strip() in ("[]", "")
        # 1. PSK.
        both_established(lab)
        pings(lab)
        for i in (0, 1):
            assert wait_for(lambda i=i: child_selectors(lab, i) == expected_selectors(
                lab, kind, i), 10), (child_selectors(lab, i), expected_selectors(lab, kind, i))
        ike = lab.appctl(lab.hvs[0], "ike/show").stdout
        assert ", psk, " in ike, ike
        # What the underlay carries: ESP only (IKE on UDP 500 aside), never the tunnel.
        with lab.capture(0, str(tmp_path / "u.pcap")) as pcap:
            assert received(lab.ping(10, 0.05)) == 10
        pkts = underlay_ipv4(pcap)
        protos = {p.proto for p in pkts}
        assert 50 in protos and 47 not in protos, protos
        scapy_udp = scapy().UDP
        assert not [p for p in pkts if p.haslayer(scapy_udp)
                    and p[scapy_udp].dport in (4789, 6081)]
        # TCP both ways (path MTU across the tunnel's ESP and encapsulation overhead).
        for src in (0, 1):
            r = iperf3(lab, src, ("-t", "2"))
            assert "error" not in r and r["end"]["sum_received"]["bytes"] > 0, r
        # A rekey of the CHILD_SA in use ("out" for vxlan and geneve) under pings.
        spi = status(lab, 0, TUN)["spi_out"]
        with BackgroundPing(lab, 100, 0.02) as bg:
            lab.appctl(lab.hvs[0], "ike/rekey", TUN, "child")
            ping = bg.result()
        assert received(ping) >= 98, ping.stdout
        assert wait_for(lambda: status(lab, 0, TUN).get("spi_out") not in (None, spi), 10)
        st = statistics(lab, 0, TUN)
        assert st.get("esp_auth_failures", 0) == 0 and st.get("esp_selector_drops", 0) == 0
        # 2. Self-signed certificates, pinned with remote_cert.
        for i, hv in enumerate(lab.hvs):
            me, peer = hosts[i], hosts[1 - i]
            lab.vsctl(hv, "set", "Open_vSwitch", ".",
                      f"other_config:certificate={self_signed}/{me}-cert.pem",
                      f"other_config:private_key={self_signed}/{me}-privkey.pem")
            lab.vsctl(hv, "set", "Interface", TUN,
                      f"options:remote_cert={self_signed}/{peer}-cert.pem")
            lab.vsctl(hv, "remove", "Interface", TUN, "options", "psk")
        both_established(lab)
        pings(lab)
        ike = lab.appctl(lab.hvs[0], "ike/show").stdout
        assert "host_2" in ike and "certificates" in ike, ike
        # 3. CA-signed certificates, the peer named by its CN with remote_name.
        for i, hv in enumerate(lab.hvs):
            me, peer = hosts[i], hosts[1 - i]
            lab.vsctl(hv, "set", "Open_vSwitch", ".",
                      f"other_config:certificate={signed}/{me}-cert.pem",
                      f"other_config:private_key={signed}/{me}-privkey.pem",
                      f"other_config:ca_cert={signed}/cacert.pem")
            lab.vsctl(hv, "set", "Interface", TUN, f"options:remote_name={peer}")
            lab.vsctl(hv, "remove", "Interface", TUN, "options", "remote_cert")
        both_established(lab)
        pings(lab)
        ike = lab.appctl(lab.hvs[1], "ike/show").stdout
        assert "host_1" in ike and "certificates" in ike, ike
        # A name that is not the peer's: no SA, no traffic.
        lab.vsctl(lab.hvs[0], "set", "Interface", TUN, "options:remote_name=host_3")
        assert wait_for(lambda: status(lab, 0, TUN).get("ipsec_state") == "connecting", 15)
        assert received(lab.ping(3, 0.2)) == 0

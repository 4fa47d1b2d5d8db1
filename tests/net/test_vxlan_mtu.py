"""Plain `vxlan` tunnels size the VMs' MTU and answer too-big packets, as vxlanipsec does."""

from __future__ import annotations

import re

import pytest

from espswitch.cli.lab import Lab, run

pytestmark = pytest.mark.net


@pytest.fixture(scope="module")
def lab(netlab_ok: None):
    with Lab(tunnel_type="vxlan") as lab:
        assert lab.wait_for_ping()
        yield lab


def _vm_mtu(lab: Lab, i: int) -> int:
    hv = lab.hvs[i]
    out = run(["ip", "-o", "link", "show", hv.tap], ns=hv.vm_ns).stdout
    return int(re.search(r"mtu (\d+)", out).group(1))


def test_vm_mtu_is_lowered_to_what_the_tunnel_carries(lab: Lab) -> None:
    status = lab.vsctl(lab.hvs[0], "get", "interface", "tun0", "status:tunnel_mtu").stdout
    assert status.strip().strip('"') == "1450"  # 1500 - outer IPv4, UDP, VXLAN, Ethernet
    assert _vm_mtu(lab, 0) == 1450 and _vm_mtu(lab, 1) == 1450


def test_too_big_with_df_gets_frag_needed_and_without_df_is_fragmented(lab: Lab) -> None:
    for hv in lab.hvs:
        run(["ip", "link", "set", hv.tap, "mtu", "1500"], ns=hv.vm_ns)
    try:
        fits = lab.ping(count=2, interval=0.2, size=1450 - 28, extra=["-M", "do"])
        assert fits.returncode == 0, fits.stdout
        big = lab.ping(count=2, interval=0.2, size=1450 - 27, extra=["-M", "do"])
        assert big.returncode != 0
        # The ICMP "fragmentation needed" reached the VM: its route cache has the MTU.
        hv, peer = lab.hvs
        cached = run(["ip", "route", "get", peer.vm_ip], ns=hv.vm_ns).stdout
        assert "mtu 1450" in cached, cached
        # Without DF the inner packet is fragmented before encapsulation and gets through.
        frag = lab.ping(count=3, interval=0.2, size=3000, extra=["-M", "dont"])
        assert frag.returncode == 0, frag.stdout
    finally:
        for hv in lab.hvs:
            run(["ip", "link", "set", hv.tap, "mtu", "1450"], ns=hv.vm_ns)
            run(["ip", "route", "flush", "cache"], ns=hv.vm_ns)

"""Jumbo frames through an encrypted tunnel, configured as an OVS-DPDK operator does it:
`Interface.mtu_request` on the NIC, the bridge's internal port and the VMs' ports; or the
kernel devices' MTU raised by hand. The NIC's receive ring is opened again for bigger
frames, tunnels size themselves from their egress device, and a refused request is shown
in `Interface.status` without touching the port."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from espswitch.cli.lab import Lab, run

pytestmark = pytest.mark.net

KEYS = ({"spi_out": "0x1001", "spi_in": "0x1002", "esp_key_out": "11" * 20,
         "esp_key_in": "22" * 20},
        {"spi_out": "0x1002", "spi_in": "0x1001", "esp_key_out": "22" * 20,
         "esp_key_in": "11" * 20})
JUMBO = 9000


def _mtu(ns: str, dev: str) -> int:
    out = run(["ip", "-o", "link", "show", dev], ns=ns).stdout
    return int(re.search(r"mtu (\d+)", out).group(1))


def _tunnel_mtu(lab: Lab, i: int) -> int:
    hv = lab.hvs[i]
    return int(lab.vsctl(hv, "get", "interface", hv.tunnel,
                         "status:tunnel_mtu").stdout.strip().strip('"'))


def _wait(pred, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def _jumbo_ping(lab: Lab, inner_mtu: int) -> subprocess.CompletedProcess[str]:
    # The largest ICMP echo the VMs' MTU carries, with DF: through in one piece or not at all.
    return lab.ping(count=3, interval=0.2, size=inner_mtu - 28, extra=["-M", "do"])


@pytest.fixture
def lab(netlab_ok: None):
    with Lab(tunnel_type="vxlanipsec", tunnel_options=KEYS) as lab:
        assert lab.wait_for_ping()
        yield lab


def test_mtu_request_carries_jumbo_frames_through_the_encrypted_tunnel(lab: Lab) -> None:
    small = _tunnel_mtu(lab, 0)
    for hv in lab.hvs:
        lab.vsctl(hv, "set", "interface", hv.underlay_dev, f"mtu_request={JUMBO}",
                  "--", "set", "interface", "br-phy", f"mtu_request={JUMBO}")
    assert _wait(lambda: all(_tunnel_mtu(lab, i) > small for i in (0, 1)))
    inner = _tunnel_mtu(lab, 0)
    assert inner == small + JUMBO - 1500, (small, inner)
    for hv in lab.hvs:
        # The VM's port: its device now lives in the VM's namespace.
        lab.vsctl(hv, "set", "interface", hv.tap, f"mtu_request={inner}")
        assert _mtu(hv.vm_ns, hv.tap) == inner
        assert _mtu(hv.ns, hv.underlay_dev) == JUMBO and _mtu(hv.ns, "br-phy") == JUMBO
        assert _wait(lambda hv=hv: hv.iface(hv.underlay_dev, "mtu") == str(JUMBO))
        assert _wait(lambda hv=hv: hv.iface(hv.tap, "mtu") == str(inner))
    p = _jumbo_ping(lab, inner)
    assert p.returncode == 0, p.stdout + p.stderr
    # Sealed whole: no ESP packet larger than the underlay's MTU, none fragmented.
    st = lab.vsctl(lab.hvs[1], "get", "interface", lab.hvs[1].tunnel, "statistics").stdout
    assert "esp_auth_failures=0" in st and "esp_malformed=0" in st, st


def test_an_mtu_raised_by_hand_is_followed(lab: Lab) -> None:
    small = _tunnel_mtu(lab, 0)
    for hv in lab.hvs:
        hv.sh("ip", "link", "set", hv.underlay_dev, "mtu", str(JUMBO))
        hv.sh("ip", "link", "set", "br-phy", "mtu", str(JUMBO))
    assert _wait(lambda: all(_tunnel_mtu(lab, i) == small + JUMBO - 1500 for i in (0, 1)))
    inner = _tunnel_mtu(lab, 0)
    for hv in lab.hvs:
        run(["ip", "link", "set", hv.tap, "mtu", str(inner)], ns=hv.vm_ns)
    # The NIC's ring is opened again for the bigger frames within its next check.
    assert _wait(lambda: _jumbo_ping(lab, inner).returncode == 0, timeout=20)


def test_a_refused_mtu_request_is_shown_and_the_port_keeps_working(lab: Lab) -> None:
    hv = lab.hvs[0]
    before = _mtu(hv.vm_ns, hv.tap)
    for bad in ("70000", "10"):
        lab.vsctl(hv, "set", "interface", hv.tap, f"mtu_request={bad}")
        err = hv.iface(hv.tap, "status:mtu_error").strip('"')
        assert "out of range" in err and bad in err, err
        assert hv.iface(hv.tap, "error") == "[]"
        assert _mtu(hv.vm_ns, hv.tap) == before
        assert lab.ping(count=2).returncode == 0
    lab.vsctl(hv, "clear", "interface", hv.tap, "mtu_request")
    assert "mtu_error" not in hv.iface(hv.tap, "status")
    assert hv.alive()
